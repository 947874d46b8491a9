"""ONNX Runtime backend: the exported per-frame graphs stepped over explicit state. numpy + onnxruntime only.

Every tensor lives in an OrtValue allocated once on the session's device and bound with IOBinding, so state
never round-trips through the host or new allocations. Graphs pass values by name in frame order (an output
feeds the later graphs' input of the same name, and a state output replaces its state input from then on).
Each state has a committed buffer; a graph writes its state outputs to its own buffers, and after a successful
frame the final buffer and the committed one swap (ping-pong). A failed frame leaves the committed state
untouched; skipped slots are handled inside the graphs (`active`).

    streams = OrtStreams("exported/", seed=0)                  # slots as exported
    audio = streams.step(frames)                               # uint8 [B, H, W, 3] -> float32 [B, 2, 1600]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from soundreactor.config import ModelConfig, check_guidance
from soundreactor.export.manifest import (
    REEXPORT,
    ExportDirError,
    GraphSpec,
    check_checkpoint,
    check_single_stream,
    io_mismatches,
    load_manifest,
    version_mismatch,
)
from soundreactor.noise import NoiseSource
from soundreactor.runtime.session import Session, Streams, check_active, check_frames
from soundreactor.threads import pick_threads

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
    "tensor(int64)": "int64",
}
HOST_INPUTS = ("frames", "frame_index", "noise", "active", "guidance")  # what the host writes each frame


def resolve_providers(requested: Sequence[str]) -> list[str]:
    """ORT provider names for `requested` (aliases cpu/cuda allowed) that this onnxruntime has, CPU last.

    Warns for each requested provider that is missing, e.g. CUDA without the onnxruntime-gpu package.
    """
    available = ort.get_available_providers()
    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
    for name in names:
        if name not in available:
            hint = (
                " (install onnxruntime-gpu instead of onnxruntime)" if name == "CUDAExecutionProvider" else ""
            )
            warnings.warn(
                f"{name} was requested but this onnxruntime {ort.__version__} lacks it{hint}; "
                f"falling back to {', '.join(n for n in names if n in available) or 'CPUExecutionProvider'}",
                RuntimeWarning,
                stacklevel=3,
            )
    chosen = [n for n in names if n in available and n != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def default_options(threads: int = 0) -> ort.SessionOptions:
    """`threads` intra-op threads per session (0: ONNX Runtime's choice, one per physical core), workers that
    sleep instead of spinning when idle. Each of the five sessions owns a thread pool, and
    while one runs, the others' spinning workers take its cores: 235 ms per paper frame without spinning, 330 ms
    with it, on 2 otherwise idle cores (and far worse next to torch or any other busy process)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OrtStreams(Streams):
    """B streams (B = the exported slot count) on the graphs of an export directory."""

    def __init__(
        self,
        directory: str | Path,
        seed: int = 0,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        checkpoint: str | Path | None = None,
        guidance: float | None = None,
        options: ort.SessionOptions | None = None,
        threads: int | None = None,
    ) -> None:
        """`checkpoint`, when given, must be the one exported from. `options` replaces `default_options()`, whose
        thread count is `threads` or else `pick_threads`' choice for the exported model."""
        guidance = None if guidance is None else check_guidance(guidance)
        self.directory = Path(directory)
        self.manifest = manifest = load_manifest(directory)
        if checkpoint is not None:
            check_checkpoint(manifest, checkpoint)
        if manifest.precision == "bf16":
            raise ExportDirError(
                f"{directory} holds bf16 graphs, which are for TensorRT: ONNX Runtime's CPU provider has no bf16 "
                "kernels and numpy no bf16 type. Export with --precision fp32 or fp16 for this backend."
            )
        exported = manifest.tools.get("onnxruntime", "unknown")
        if version_mismatch(exported, ort.__version__):
            warnings.warn(
                f"{directory} was exported next to onnxruntime {exported}, this is {ort.__version__}: the graphs "
                f"are standard opset-{manifest.opset} ONNX and should run, but kernels may round differently; "
                "re-export to pin the pair",
                RuntimeWarning,
                stacklevel=2,
            )
        self.slots = manifest.slots
        self.frame_hw = manifest.frame_hw
        self.sample_rate = manifest.config["vae"]["sample_rate"]
        self.samples_per_frame = manifest.graph("vae_decoder").output("audio").shape[-1]

        providers = resolve_providers(providers)
        if options is None:
            parameters = ModelConfig.from_dict(manifest.config).parameter_estimate()
            options = default_options(pick_threads(parameters, threads))
        self.sessions = {g.name: self._open(g, providers, options) for g in manifest.graphs}
        self.providers = self.sessions["ar_audio"].get_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        self.bindings = {name: session.io_binding() for name, session in self.sessions.items()}

        # host-written inputs, committed state (by state input name), and every graph's output buffers
        specs = {t.name: t for g in manifest.graphs for t in g.inputs}
        self.host = {name: self._zeros(specs[name].shape, specs[name].dtype) for name in HOST_INPUTS}
        self.state_specs = {i: specs[i] for g in manifest.graphs for i in g.state.values()}
        self.state = {name: self._zeros(t.shape, t.dtype) for name, t in self.state_specs.items()}
        self.outputs = {
            g.name: {t.name: self._zeros(t.shape, t.dtype) for t in g.outputs} for g in manifest.graphs
        }

        self.frame_index = np.zeros(self.slots, dtype=np.int64)
        self.guidance = np.full(self.slots, manifest.guidance if guidance is None else guidance, np.float32)
        self.host["guidance"].update_inplace(self.guidance)
        noise_shape = manifest.graph("sampler").input("noise").shape[1:]
        self.noise = NoiseSource([seed + k for k in range(self.slots)], noise_shape)

    def _open(
        self, graph: GraphSpec, providers: list[str], options: ort.SessionOptions
    ) -> ort.InferenceSession:
        path = self.directory / graph.file
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise ExportDirError(
                f"onnxruntime {ort.__version__} cannot load {path} (opset {self.manifest.opset}, exported "
                f"next to onnxruntime {self.manifest.tools.get('onnxruntime')}): {err}"
            ) from err

        def described(args: list[ort.NodeArg]) -> list[tuple[str, tuple[int, ...], str]]:
            return [(a.name, tuple(a.shape), ORT_TYPES.get(a.type, a.type)) for a in args]

        problems = io_mismatches(graph, described(session.get_inputs()), described(session.get_outputs()))
        if problems:
            raise ExportDirError(f"{path} does not match the manifest: {'; '.join(problems)}; {REEXPORT}")
        return session

    def _zeros(self, shape: tuple[int, ...], dtype: str) -> ort.OrtValue:
        value = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(dtype), self.device, 0)
        value.update_inplace(np.zeros(shape, dtype))
        return value

    def step(self, frames: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        frames = check_frames(
            frames,
            self.slots,
            self.frame_hw,
            f"resize frames to {self.frame_hw[0]}x{self.frame_hw[1]}, or re-export {self.directory} with "
            "`soundreactor export --frame-size HxW` for the video's size",
        )
        active = check_active(active, self.slots)
        saved_noise = self.noise.snapshot()
        try:
            self.host["frames"].update_inplace(frames)
            self.host["frame_index"].update_inplace(self.frame_index)
            self.host["noise"].update_inplace(self.noise.draw(active))
            self.host["active"].update_inplace(active)
            values, producers = self._run_frame()
        except BaseException:
            self.noise.restore(saved_noise)
            raise
        for state, (graph, output) in producers.items():
            self.outputs[graph][output], self.state[state] = self.state[state], values[state]
        self.frame_index += active
        return values["audio"].numpy().copy()  # on CPU numpy() is a view of the buffer the next frame reuses

    def _run_frame(self) -> tuple[dict[str, ort.OrtValue], dict[str, tuple[str, str]]]:
        """Run every graph once; returns the values by name and, per state, the (graph, output) holding it."""
        values = {**self.host, **self.state}
        producers = {}
        for graph in self.manifest.graphs:
            binding = self.bindings[graph.name]
            for t in graph.inputs:
                binding.bind_ortvalue_input(t.name, values[t.name])
            for t in graph.outputs:
                binding.bind_ortvalue_output(t.name, self.outputs[graph.name][t.name])
            self.sessions[graph.name].run_with_iobinding(binding)
            for t in graph.outputs:
                values[t.name] = self.outputs[graph.name][t.name]
                if t.name in graph.state:
                    values[graph.state[t.name]] = values[t.name]
                    producers[graph.state[t.name]] = (graph.name, t.name)
        return values, producers

    def reset(self, slot: int | None = None) -> None:
        if slot is not None and not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} out of range for {self.slots} slots")
        slots = range(self.slots) if slot is None else [slot]
        for name, spec in self.state_specs.items():
            # numpy() is a view on CPU and a host copy on CUDA: copying makes both the same
            array = self.state[name].numpy().copy()
            for s in slots:
                array[(slice(None),) * spec.slot_axis + (s,)] = 0
            self.state[name].update_inplace(array)
        for s in slots:
            self.frame_index[s] = 0
            self.noise.reset(s)


def ort_session_from_dir(
    engines_dir: str | Path,
    seed: int = 0,
    providers: Sequence[str] = ("cpu",),
    checkpoint: str | Path | None = None,
    nfe: int | None = None,
    guidance: float | None = None,
    threads: int | None = None,
) -> Session:
    """One stream on the ONNX Runtime backend, checked against the checkpoint and NFE the caller expects."""

    streams = OrtStreams(
        engines_dir, seed=seed, providers=providers, checkpoint=checkpoint, guidance=guidance, threads=threads
    )
    check_single_stream(streams.manifest, engines_dir, nfe)
    return Session(streams)
