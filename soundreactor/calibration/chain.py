"""The per-frame graphs of an export directory stepped on ONNX Runtime CPU with numpy state, every graph's inputs
and outputs in view, and the frames that drive them (a video file, or the built-in demo scene).

This is the reference streaming session as the graphs run it: the same frame order, state passing and seeded
noise as `OrtStreams`, but each frame returns what every graph was fed and produced, which calibration (real
inputs: frames with their previous grid, ar_* inputs with the real KV caches, sampler inputs, VAE states) and the
accuracy report need.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import onnxruntime as ort

from soundreactor.export.manifest import Manifest, load_manifest
from soundreactor.noise import NoiseSource

# name -> array, for one graph call
Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class GraphCall:
    inputs: Feeds
    outputs: Feeds


def open_session(
    path: Path, fused: bool = False, options: ort.SessionOptions | None = None
) -> ort.InferenceSession:
    """An ORT CPU session on the graph at `path`; `options` (threads, profiling) get the optimization level.

    fused=False (graph optimizations off, `ORT_DISABLE_ALL`): every QuantizeLinear/DequantizeLinear pair runs as
    written (round and clip to the grid, scale back to float) and every product is fp32 math, which is the
    arithmetic the Q/DQ graph specifies and TensorRT implements; the result is the same on every x86-64 CPU up to
    fp32 rounding. fused=True (ORT's default): Q/DQ pairs are folded into integer kernels (QLinearMatMul,
    MatMulIntegerToFloat, QLinearConv) whose u8s8 path saturates on CPUs without VNNI (onnxruntime issues #6004,
    #14642), so their results describe the CPU, not the graph. fp32 graphs differ between the two only in rounding.
    """
    options = options or ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class GraphChain:
    """All slots see the same frame (each with its own noise seed, seed + slot), all active.

    `fused` picks how ORT runs the graphs (see `open_session`): False, the default, for the graphs' own arithmetic;
    True for what `OrtStreams` runs with its default options.
    """

    def __init__(self, directory: str | Path, seed: int = 0, fused: bool = False) -> None:
        self.directory = Path(directory)
        self.manifest: Manifest = load_manifest(directory)
        self.sessions = {g.name: open_session(self.directory / g.file, fused) for g in self.manifest.graphs}
        specs = {t.name: t for g in self.manifest.graphs for t in g.inputs}
        self.values: Feeds = {name: np.zeros(t.shape, t.dtype) for name, t in specs.items()}
        self.values["active"][:] = True
        self.values["guidance"][:] = self.manifest.guidance
        slots = self.manifest.slots
        self.noise = NoiseSource([seed + k for k in range(slots)], specs["noise"].shape[1:])
        self.frame_index = 0

    def step(self, frame: np.ndarray) -> dict[str, GraphCall]:
        """Run one frame (uint8 [H, W, 3]) through every graph; returns each graph's call, in frame order."""
        values = self.values
        values["frames"] = np.broadcast_to(frame, values["frames"].shape).copy()
        values["noise"] = self.noise.draw()
        values["frame_index"] = np.full_like(values["frame_index"], self.frame_index)
        calls = {}
        for graph in self.manifest.graphs:
            inputs = {t.name: values[t.name] for t in graph.inputs}
            outputs = self.run(graph.name, inputs)
            values.update(outputs)
            for output, state in graph.state.items():
                values[state] = outputs[output]
            calls[graph.name] = GraphCall(inputs, outputs)
        self.frame_index += 1
        return calls

    def run(self, graph: str, inputs: Feeds) -> Feeds:
        """One graph on the given inputs, outside the chain's state: its outputs by name."""
        arrays = self.sessions[graph].run(None, inputs)
        return {t.name: a for t, a in zip(self.manifest.graph(graph).outputs, arrays, strict=True)}


@dataclass(frozen=True)
class FrameSource:
    """The frames calibration and the report run on, and how to name them in a manifest."""

    frames: tuple[np.ndarray, ...]
    description: dict[str, object]


def load_frames(
    video: str | Path | None, count: int, frame_hw: tuple[int, int], fps: int = 30, seed: int = 0
) -> FrameSource:
    """The first `count` frames at `fps` of `video`, or of the demo scene (seeded) when `video` is None.

    Raises ValueError when the video can't be read, holds fewer frames, or has another size than the graphs take.
    """
    from soundreactor.demo_video import demo_frames
    from soundreactor.media import read_frames

    if count < 2:
        raise ValueError(
            f"calibration needs at least 2 frames (the temporal difference starts at frame 2), got {count}"
        )
    h, w = frame_hw
    if video is None:
        frames = tuple(demo_frames(count, frame_hw, seed=seed, fps=fps))
        source = {"video": None, "demo_scene_seed": seed}
    else:
        try:
            frames = tuple(islice(read_frames(video, fps=fps), count))
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"calibration video {video} is unreadable: {err}") from err
        if len(frames) < count:
            raise ValueError(
                f"calibration video {video} has {len(frames)} frames at {fps} fps, fewer than the {count} asked for: "
                f"pass --frames {len(frames)} or less, or a longer video"
            )
        if frames[0].shape[:2] != (h, w):
            fh, fw = frames[0].shape[:2]
            raise ValueError(
                f"calibration video {video} is {fh}x{fw}, the graphs take {h}x{w} frames: calibrate with a {h}x{w} "
                f"video, or export for {fh}x{fw} (`soundreactor export --frame-size {fh}x{fw}`)"
            )
        source = {"video": str(video)}
    digest = hashlib.sha256(b"".join(f.tobytes() for f in frames)).hexdigest()
    return FrameSource(frames, {**source, "frames": count, "fps": fps, "frame_hw": [h, w], "sha256": digest})
