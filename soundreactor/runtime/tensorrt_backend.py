"""TensorRT backend: the engines built for an export directory (`soundreactor build --engines DIR`), stepped
from caller-owned device buffers, one CUDA graph launch per frame. numpy + tensorrt + cuda-python only.

    streams = TrtStreams("exported/", seed=0)                  # slots as exported
    audio = streams.step(frames)                               # uint8 [B, H, W, 3] -> float32 [B, 2, 1600]

Every value has a fixed device buffer (engine/bindings.py): the ar_* engines update the KV caches in place
(ONNX TensorScatter -> IKVCacheUpdateLayer, engine/kv_scatter.py), so no frame copies a cache; the other state
ping-pongs between two buffers. A captured CUDA graph holds fixed addresses, so there are two graphs, one per
parity, each with: the host inputs' copies from pinned memory, the five engines' execute_async_v3 on a
non-default stream (each return value checked during capture), and the audio's copy back. A frame fills the
pinned inputs, launches its parity's graph, synchronizes and flips the parity.

Semantics match the torch and ONNX Runtime backends: the same NoiseSource noise per slot; skipped slots keep
their state (the graphs write it back) and give silence; reset(slot) zeroes that slot of every state buffer. A
failed step leaves the state as it was: inputs are checked before anything runs, a graph launch that fails
runs nothing, and the noise generators are restored. (A fault while a graph runs is a sticky CUDA error that
makes this process's CUDA context unusable, so no half-updated session can step on.)
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from soundreactor.config import check_guidance
from soundreactor.engine.bindings import BindingPlan, plan_bindings
from soundreactor.engine.tensorrt_env import (
    check_cuda,
    current_gpu,
    load_engine,
    require_cudart,
    require_tensorrt,
)
from soundreactor.export.manifest import check_checkpoint, check_single_stream, load_manifest
from soundreactor.noise import NoiseSource
from soundreactor.runtime.session import Session, Streams, check_active, check_frames

HOST_INPUTS = {"frames", "frame_index", "active", "guidance", "noise"}  # what the host writes
HOST_OUTPUTS = {"audio"}


class EngineRunError(RuntimeError):
    """TensorRT refused to run an engine (execute_async_v3 or set_tensor_address returned False)."""


class DeviceBuffers:
    """Device memory for every buffer of a binding plan, and pinned host memory (with numpy views) for the
    values copied in and out each frame. All zeroed."""

    def __init__(self, plan: BindingPlan, cudart: Any) -> None:
        self.cudart = cudart
        self.device: dict[str, int] = {}
        self.pinned: dict[str, int] = {}
        self.host: dict[str, np.ndarray] = {}
        try:
            for name, buffer in plan.buffers.items():
                self.device[name] = int(check_cuda(cudart.cudaMalloc(buffer.nbytes), f"cudaMalloc({name})"))
                check_cuda(cudart.cudaMemset(self.device[name], 0, buffer.nbytes), f"cudaMemset({name})")
            for name in (*plan.host_inputs, *plan.host_outputs):
                buffer = plan.buffers[name]
                self.pinned[name] = int(
                    check_cuda(cudart.cudaMallocHost(buffer.nbytes), f"cudaMallocHost({name})")
                )
                raw = (ctypes.c_ubyte * buffer.nbytes).from_address(self.pinned[name])
                self.host[name] = np.frombuffer(raw, np.uint8).view(buffer.dtype).reshape(buffer.shape)
                self.host[name][...] = 0
        except BaseException:
            self.free()
            raise

    def free(self) -> None:
        self.host.clear()
        for pointer in self.device.values():
            self.cudart.cudaFree(pointer)
        for pointer in self.pinned.values():
            self.cudart.cudaFreeHost(pointer)
        self.device.clear()
        self.pinned.clear()


class TrtStreams(Streams):
    """B streams (B = the exported slot count) on the TensorRT engines of an export directory."""

    def __init__(
        self,
        directory: str | Path,
        seed: int = 0,
        checkpoint: str | Path | None = None,
        guidance: float | None = None,
        device: int = 0,
    ) -> None:
        guidance = None if guidance is None else check_guidance(guidance)  # before any GPU work
        self.graphs: list[Any] = []
        self.buffers: DeviceBuffers | None = None
        self.stream: Any = None
        trt, self.cudart = require_tensorrt(), require_cudart()
        self.directory = Path(directory)
        self.manifest = manifest = load_manifest(directory)
        if checkpoint is not None:
            check_checkpoint(manifest, checkpoint)
        self.slots = manifest.slots
        self.frame_hw = manifest.frame_hw
        self.sample_rate = manifest.config["vae"]["sample_rate"]
        self.samples_per_frame = manifest.graph("vae_decoder").output("audio").shape[-1]

        cudart = self.cudart
        check_cuda(cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
        gpu = current_gpu(cudart, device)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, aliases = {}, {}
        for graph in manifest.graphs:
            self.engines[graph.name], aliases[graph.name] = load_engine(
                trt, self.runtime, directory, manifest, graph.name, gpu
            )
        self.plan = plan_bindings(manifest, aliases)
        if set(self.plan.host_inputs) != HOST_INPUTS or set(self.plan.host_outputs) != HOST_OUTPUTS:
            raise ValueError(
                f"{directory}: the graphs take {sorted(self.plan.host_inputs)} from the host and give "
                f"{sorted(self.plan.host_outputs)}; this backend fills {sorted(HOST_INPUTS)} and reads "
                f"{sorted(HOST_OUTPUTS)}: re-export with this version of soundreactor"
            )
        self.contexts = {name: engine.create_execution_context() for name, engine in self.engines.items()}
        if any(context is None for context in self.contexts.values()):
            raise EngineRunError(
                f"TensorRT could not create an execution context (out of GPU memory?) in {directory}"
            )

        self.frame_index = np.zeros(self.slots, dtype=np.int64)
        self.noise = NoiseSource(
            [seed + k for k in range(self.slots)], manifest.graph("sampler").input("noise").shape[1:]
        )
        try:
            self.buffers = DeviceBuffers(self.plan, cudart)
            self.buffers.host["guidance"][...] = manifest.guidance if guidance is None else guidance
            self.stream = check_cuda(
                cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate"
            )
            self.graphs = [self._capture(parity) for parity in (0, 1)]
            self._zero(range(self.slots))
        except BaseException:
            self.close()
            raise
        self.parity = 0

    def _enqueue_frame(self) -> list[str]:
        """Queue a whole frame on the stream: input copies, every engine, the audio copy. Returns the engines
        whose execute_async_v3 returned False."""
        cudart, buffers, stream = self.cudart, self.buffers, self.stream
        for name in self.plan.host_inputs:
            nbytes = self.plan.buffers[name].nbytes
            kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            check_cuda(
                cudart.cudaMemcpyAsync(buffers.device[name], buffers.pinned[name], nbytes, kind, stream),
                f"copy {name}",
            )
        failed = [
            name for name, context in self.contexts.items() if not context.execute_async_v3(int(stream))
        ]
        for name in self.plan.host_outputs:
            nbytes = self.plan.buffers[name].nbytes
            kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            check_cuda(
                cudart.cudaMemcpyAsync(buffers.pinned[name], buffers.device[name], nbytes, kind, stream),
                f"copy {name}",
            )
        return failed

    def _capture(self, parity: int) -> Any:
        """Bind the parity's addresses, run the frame once (TensorRT sets itself up on a first enqueue), then
        capture it into an instantiated CUDA graph."""
        cudart = self.cudart
        for graph, bound in self.plan.bindings[parity].items():
            context = self.contexts[graph]
            for tensor, buffer in bound.items():
                if not context.set_tensor_address(tensor, self.buffers.device[buffer]):
                    raise EngineRunError(f"{graph}: TensorRT refused the address of {tensor!r}")
        self.buffers.host["active"][...] = False  # every slot skipped: the state is written back unchanged
        failed = self._enqueue_frame()
        check_cuda(cudart.cudaStreamSynchronize(self.stream), "warm-up frame")
        if failed:
            raise EngineRunError(f"execute_async_v3 returned False for {failed} on the warm-up frame")
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check_cuda(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        try:
            failed = self._enqueue_frame()
        finally:
            captured = check_cuda(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        try:
            if failed:
                raise EngineRunError(
                    f"execute_async_v3 returned False for {failed} during CUDA graph capture"
                )
            return check_cuda(cudart.cudaGraphInstantiate(captured, 0), "cudaGraphInstantiate")
        finally:
            cudart.cudaGraphDestroy(captured)

    def _zero(self, slots: range | list[int]) -> None:
        """Zero these slots of every state buffer: an empty history (frame_index 0 makes the graphs start over)."""
        for name in self.plan.state_buffers:
            buffer = self.plan.buffers[name]
            for slot in slots:
                offset, pitch, width, height = buffer.slot_span(slot)
                address = self.buffers.device[name] + offset
                check_cuda(
                    self.cudart.cudaMemset2DAsync(address, pitch, 0, width, height, self.stream),
                    f"zero {name}",
                )
        check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "reset")

    def step(self, frames: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        frames = check_frames(
            frames,
            self.slots,
            self.frame_hw,
            f"resize frames to {self.frame_hw[0]}x{self.frame_hw[1]}, or re-export {self.directory} for the "
            "video's size and rebuild the engines",
        )
        active = check_active(active, self.slots)
        host, cudart = self.buffers.host, self.cudart
        saved_noise = self.noise.snapshot()
        try:
            host["frames"][...] = frames
            host["frame_index"][...] = self.frame_index
            host["active"][...] = active
            host["noise"][...] = self.noise.draw(active)
            check_cuda(cudart.cudaGraphLaunch(self.graphs[self.parity], self.stream), "cudaGraphLaunch")
            check_cuda(cudart.cudaStreamSynchronize(self.stream), "frame")
        except BaseException:
            self.noise.restore(saved_noise)
            raise
        self.frame_index += active
        self.parity ^= 1
        return host["audio"].copy()

    def reset(self, slot: int | None = None) -> None:
        if slot is not None and not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} out of range for {self.slots} slots")
        slots = range(self.slots) if slot is None else [slot]
        self._zero(slots)
        for s in slots:
            self.frame_index[s] = 0
            self.noise.reset(s)

    def close(self) -> None:
        """Release the CUDA graphs, buffers and stream (also done when the object is collected)."""
        for graph in self.graphs:
            self.cudart.cudaGraphExecDestroy(graph)
        self.graphs = []
        if self.buffers is not None:
            self.buffers.free()
            self.buffers = None
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def trt_session_from_dir(
    engines_dir: str | Path,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    nfe: int | None = None,
    guidance: float | None = None,
) -> Session:
    """One stream on the TensorRT backend, checked against the checkpoint and NFE the caller expects."""

    check_single_stream(load_manifest(engines_dir), engines_dir, nfe, rebuild=" and rebuild")
    return Session(TrtStreams(engines_dir, seed=seed, checkpoint=checkpoint, guidance=guidance))
