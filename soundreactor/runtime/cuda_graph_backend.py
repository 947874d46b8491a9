"""CUDA-graph backend: all per-frame work of B stream slots replayed from fixed, preallocated buffers.

A step writes the frame's inputs (frames, seeded noise, masks) into pinned staging buffers, enqueues their upload
and the graph replays on the backend's own CUDA stream, and waits only for the audio coming back. The captured
functions run over buffers allocated once: no host syncs, no `.item()`, no branches on values, and every state
update in place (`copy_`, `torch.where`, `masked_fill_`), so a replay is exactly the eager function. Skipped and
reset slots are bool masks in device memory: nothing is ever recaptured.

Three functions, each captured once after a warm-up on the capture stream (with every mask false, so the warm-up
leaves the state untouched), sharing one memory pool:

* frame: vision, guided vision step, sampler, VAE decode and the commit of the active slots (plus the audio-slot
  step when not pipelined), into the audio buffer. One replay per frame.
* prepare (pipelined): the audio-slot step of each slot's next frame. It needs only x_i, so it runs right after
  frame i and is done before frame i+1 arrives. Results equal the unpipelined order exactly.
* reset: zero the slots marked for reset and restart them at frame 0. Replayed in the step that follows
  `reset()`, just before the frame: zeroing the KV cache under a mask is a full pass over it (as much memory
  traffic as the frame's two attention steps), too much to pay in every frame.

SOUNDREACTOR_CUDA_GRAPHS=0 runs the same functions eagerly; off CUDA they always run eagerly, which is how the CPU
tests check the very buffer logic the graphs replay.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from soundreactor.model.dinov2 import fold_layer_scales
from soundreactor.model.soundreactor import SoundReactor
from soundreactor.model.transformer import fuse_feed_forwards
from soundreactor.model.vae import FoldedSnakeBeta, fold_snakes
from soundreactor.runtime.session import Streams, check_active, check_frames
from soundreactor.runtime.state import StreamState
from soundreactor.triton_kernels import kernels_enabled

SWITCH = "SOUNDREACTOR_CUDA_GRAPHS"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tables that `.to(dtype)` would round: RoPE angles and the resize / normalization matrices stay fp32.
FP32_BUFFERS = (
    "transformer.rope_cos",
    "transformer.rope_sin",
    "vision.preprocess.rows",
    "vision.preprocess.cols_t",
    "vision.preprocess.scale",
    "vision.preprocess.shift",
)
RESET, ACTIVE, PREPARE = range(3)  # rows of the mask buffer
FRAME_STAGES = ("vision", "vision_step", "sampler", "vae_decode")  # after the audio step, in frame order


def graphs_enabled(device: torch.device | str) -> bool:
    """True on CUDA devices unless SOUNDREACTOR_CUDA_GRAPHS is 0/false/off/no."""
    off = os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "off", "no")
    return torch.device(device).type == "cuda" and not off


def cast_model(
    model: SoundReactor, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype | None = None
) -> SoundReactor:
    """A frozen copy of `model` on `device` with weights in `dtype` (the VAE in `vae_dtype`, default `dtype`);
    the FP32_BUFFERS tables stay fp32.

    RMSNorm, LayerNorm and softmax accumulate in fp32 in torch's kernels. Weight-only work is folded in fp32
    before the cast, so no frame repeats it: the VAE's Snake scales, DINOv2's LayerScale gammas, and the
    transformer's two SwiGLU input projections stacked into one matmul.
    """
    vae_dtype = vae_dtype or dtype
    for name, value in (("dtype", dtype), ("vae_dtype", vae_dtype)):
        if value not in DTYPES:
            raise TypeError(f"{name} must be one of {DTYPES}, got {value}")
    model = copy.deepcopy(model).to(device)
    fold_snakes(model.vae)
    fold_layer_scales(model.vision)
    fuse_feed_forwards(model.transformer)
    tables = {name: b.float() for name, b in model.named_buffers() if name in FP32_BUFFERS}
    model.to(dtype)
    model.vae.to(vae_dtype)
    for name, table in tables.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, table)
    return model.requires_grad_(False).eval()


def check_buffer(name: str, value: object, buffer: Tensor) -> None:
    """Raise unless `value` fits the captured `buffer` as it is, naming what changed."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    pairs = (("shape", tuple(buffer.shape), tuple(value.shape)), ("dtype", buffer.dtype, value.dtype))
    changes = [f"{what} {old} -> {new}" for what, old, new in pairs if old != new]
    if changes:
        raise ValueError(
            f"{name} differ from the buffers the graphs were captured for: {'; '.join(changes)}. Graphs replay "
            f"fixed shapes: pass {buffer.dtype} {tuple(buffer.shape)}, or build a new GraphStreams for the new "
            "slot count or frame size"
        )


class Staged:
    """A device buffer and its host twin (pinned on CUDA, so copies between them run asynchronously)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.host = torch.zeros(shape, dtype=dtype, pin_memory=device.type == "cuda")
        self.array = self.host.numpy()  # writable view of the host memory

    def upload(self) -> None:
        self.buffer.copy_(self.host, non_blocking=True)

    def download(self) -> None:
        self.host.copy_(self.buffer, non_blocking=True)


class Fence:
    """A point on the backend stream that the host or another stream can wait for (no-op on CPU: eager is
    synchronous there)."""

    def __init__(self, device: torch.device) -> None:
        self.event = torch.cuda.Event() if device.type == "cuda" else None

    def record(self) -> None:
        if self.event is not None:
            self.event.record()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class StageClock:
    """Named marks on the backend stream, read back as milliseconds between two of them.

    On CUDA the marks are `external` events (torch >= 2.9), so a mark inside a captured function becomes an
    event-record node that every replay records again; on CPU eager execution is synchronous and the host
    clock serves.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, torch.cuda.Event | float] = {}

    def mark(self, name: str) -> None:
        if not self.cuda:
            self.marks[name] = time.perf_counter()
            return
        if (
            name not in self.marks
        ):  # first marks come from eager calls or warm-up, never from inside a capture
            self.marks[name] = torch.cuda.Event(enable_timing=True, external=True)
        self.marks[name].record()

    def ms(self, start: str, end: str) -> float:
        first, last = self.marks[start], self.marks[end]
        return first.elapsed_time(last) if self.cuda else (last - first) * 1e3


class Replay:
    """`fn()` over fixed buffers: run eagerly, or captured once into a CUDA graph on `stream` and replayed."""

    def __init__(
        self,
        fn: Callable[[], None],
        stream: torch.cuda.Stream | None,
        pool: tuple[int, int] | None = None,
        warmup: int = 2,
    ) -> None:
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        if stream is None:
            return
        # The warm-up runs for real (cuBLAS workspaces, Triton JIT, allocator) on the capture stream.
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            fn()

    def __call__(self) -> None:
        if self.graph is None:
            self.fn()
        else:
            self.graph.replay()


class GraphStreams(Streams):
    """B streams whose every frame is one CUDA-graph replay (see the module docstring); same results as
    `TorchStreams` frame for frame, with the same seeded per-slot noise.

    dtype: weights, activations and state (fp32, fp16 or bf16); norm statistics, softmax and RoPE stay fp32.
    vae_dtype: the VAE decoder's weights, activations and state; None = `dtype`. The decoder is where bf16
        costs the most accuracy (tiny preset: 7.5e-3 of peak amplitude from fp32, 1.3e-3 with an fp32 decoder;
        see the tests), so a bf16 model may keep it fp32.
    pipelined: run each slot's next audio-slot step right after its frame (identical results, lower latency).
    use_triton: route the transformer's cached attention and the VAE's Snake activations to the Triton kernels;
        None = `kernels_enabled`.
    graphs: capture CUDA graphs; None = on CUDA unless SOUNDREACTOR_CUDA_GRAPHS=0; False runs eagerly.
    timing: record stage marks; after each `step`, `timings` holds that frame's milliseconds per stage and
        token_level / waveform_level (from x_(i-1) to x_i sampled / decoded, audio step included) and
        frame_arrival (upload to audio on the host, which excludes the audio step when pipelined).
    """

    def __init__(
        self,
        model: SoundReactor,
        slots: int = 1,
        seed: int = 0,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.float32,
        *,
        vae_dtype: torch.dtype | None = None,
        pipelined: bool = True,
        use_triton: bool | None = None,
        graphs: bool | None = None,
        timing: bool = False,
    ) -> None:
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.graphs = graphs_enabled(self.device) if graphs is None else graphs
        if self.graphs and not on_cuda:
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}; pass graphs=None or False")
        self.use_triton = kernels_enabled(self.device) if use_triton is None else use_triton
        self.model = cast_model(model, self.device, dtype, vae_dtype)
        if self.use_triton:
            self._use_kernels()
        cfg = self.model.config
        self.slots, self.dtype, self.pipelined = slots, dtype, pipelined
        self.frame_hw = model.input_hw
        self.samples_per_frame = cfg.samples_per_frame
        self.sample_rate = cfg.vae.sample_rate

        self.state = StreamState.allocate(self.model, [seed + k for k in range(slots)], self.device)
        self.frames = Staged((slots, *self.frame_hw, 3), torch.uint8, self.device)
        self.noise = Staged((slots, *self.model.noise_shape()), torch.float32, self.device)
        self.masks = Staged((3, slots), torch.bool, self.device)  # rows RESET, ACTIVE, PREPARE
        self.audio = Staged(
            (slots, cfg.vae.audio_channels, self.samples_per_frame), torch.float32, self.device
        )
        self.prepare_mask = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self.h_audio = torch.zeros(slots, cfg.transformer.d_model, dtype=dtype, device=self.device)
        self.pending_reset = np.zeros(slots, dtype=bool)
        self.unprepared = np.ones(slots, dtype=bool)  # pipelined: slots whose next audio step has not run
        self.clock = StageClock(self.device) if timing else None
        self.timings: dict[str, float] = {}
        # prepare marks alternate between two pairs, so the next prepare never overwrites unread ones
        self._free_pair, self._latest_pair, self._frame_pair = 0, 1, 1
        self.stream = torch.cuda.Stream(self.device) if on_cuda else None
        self._uploaded, self._audio_ready = Fence(self.device), Fence(self.device)

        capture = self.stream if self.graphs else None
        pool = torch.cuda.graph_pool_handle() if self.graphs else None
        # One pool for all graphs: each keeps its results in the buffers above, so any intermediate is dead when
        # its graph ends, and the graphs never run concurrently; any replay order is then safe.
        with torch.no_grad():
            self._reset_graph = Replay(self._reset, capture, pool)
            self._prepare_graph = Replay(self._prepare, capture, pool) if pipelined else None
            self._frame_graph = Replay(self._frame, capture, pool)

    @property
    def host_frames(self) -> np.ndarray:
        """The pinned staging array [B, H, W, 3] uint8: frames written here skip one host copy in `step`."""
        return self.frames.array

    @torch.no_grad()
    def step(self, frames: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        frames = check_frames(frames, self.slots, self.frame_hw)
        active = check_active(active, self.slots)
        self._uploaded.wait()  # the staging buffers are free again (always, after the previous step returned)
        if frames is not self.frames.array:
            np.copyto(self.frames.array, frames)
        with self._on_stream():
            self._run(active, self.frames.upload)
            self.audio.download()
            self._mark("downloaded")
            self._audio_ready.record()
            self._prepare_next(active)
        self._audio_ready.wait()
        if self.clock is not None:
            self.timings = self._read_timings()
        return self.audio.array.copy()

    @torch.no_grad()
    def step_device(self, frames: Tensor, active: np.ndarray | None = None) -> Tensor:
        """Step from frames already on the device (a GPU video decoder): uint8 [B, H, W, 3], the captured shape.

        Returns the device audio buffer [B, 2, samples], valid until the next step; work queued afterwards on the
        caller's current stream sees it complete. No host sync and no `timings`.
        """
        check_buffer("frames", frames, self.frames.buffer)
        active = check_active(active, self.slots)
        self._uploaded.wait()  # noise and masks staging: back-pressure if the device is a whole step behind
        caller = torch.cuda.current_stream(self.device) if self.stream is not None else None
        with self._on_stream():
            if caller is not None:
                self.stream.wait_stream(caller)  # frames were produced on the caller's stream
            if frames.is_cuda:
                frames.record_stream(self.stream)  # the caller may free them before the copy has run
            self._run(active, lambda: self.frames.buffer.copy_(frames, non_blocking=True))
            self._audio_ready.record()
            self._prepare_next(active)
        if caller is not None:
            caller.wait_event(self._audio_ready.event)
        return self.audio.buffer

    def reset(self, slot: int | None = None) -> None:
        """Restart one slot (or all): its noise now, its device state in the next step's replay."""
        if slot is not None and not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} out of range for {self.slots} slots")
        chosen = slice(None) if slot is None else slot
        self.pending_reset[chosen] = True
        self.unprepared[chosen] = True
        for s in range(self.slots) if slot is None else [slot]:
            self.state.noise.reset(s)

    def _use_kernels(self) -> None:
        """Route the transformer's cached attention and the VAE's Snake activations to the Triton kernels."""
        from soundreactor.triton_kernels.decode_attention import decode_attention
        from soundreactor.triton_kernels.snake import snake_beta

        self.model.transformer.attention_fn = decode_attention
        for module in self.model.vae.modules():
            if isinstance(module, FoldedSnakeBeta):
                module.fused = snake_beta

    # ---- host side of a step -------------------------------------------------------------------------------

    def _run(self, active: np.ndarray, load_frames: Callable[[], None]) -> None:
        """Upload this step's noise and masks, then reset, pending prepares and the frame on the backend stream."""
        noise = self.state.noise
        saved_noise = noise.snapshot()
        self.noise.array[...] = noise.draw(active)
        self.masks.array[RESET] = self.pending_reset
        self.masks.array[ACTIVE] = active
        self.masks.array[PREPARE] = self.unprepared
        self._mark("step_start")
        load_frames()
        self.noise.upload()
        self.masks.upload()
        self._uploaded.record()
        self._mark("uploaded")
        try:
            if self.pending_reset.any():
                self._reset_graph()
            if self.pipelined and self.unprepared.any():
                self._prepare_slots(PREPARE)
            self._frame_pair = self._latest_pair
            self._frame_graph()
        except BaseException:  # only an eager run can fail here; its ring writes were undone in `_frame`
            noise.restore(saved_noise)
            raise
        self.pending_reset[:] = False
        self.unprepared[:] = False

    def _prepare_next(self, active: np.ndarray) -> None:
        """Pipelined: the next audio step of every slot that just advanced. Should it fail (eager only), the frame
        stays committed and the next step retries the audio step first."""
        if not self.pipelined:
            return
        self.unprepared |= active
        self._prepare_slots(ACTIVE)
        self.unprepared[:] = False

    def _prepare_slots(self, row: int) -> None:
        self.prepare_mask.copy_(self.masks.buffer[row])
        pair = self._free_pair
        self._mark(f"prepare_start{pair}")
        self._prepare_graph()
        self._mark(f"prepare_done{pair}")
        self._latest_pair, self._free_pair = pair, 1 - pair

    def _on_stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _mark(self, name: str) -> None:
        if self.clock is not None:
            self.clock.mark(name)

    def _read_timings(self) -> dict[str, float]:
        clock = self.clock
        stages = FRAME_STAGES if self.pipelined else ("audio_step", *FRAME_STAGES)
        out = {"upload": clock.ms("step_start", "uploaded")}
        previous = "frame_start"
        for stage in stages:
            out[stage] = clock.ms(previous, stage)
            previous = stage
        out["commit"] = clock.ms(previous, "frame_done")
        out["download"] = clock.ms("frame_done", "downloaded")
        ahead = 0.0
        if self.pipelined:
            pair = self._frame_pair
            ahead = out["audio_step"] = clock.ms(f"prepare_start{pair}", f"prepare_done{pair}")
        out["token_level"] = ahead + clock.ms("frame_start", "sampler")
        out["waveform_level"] = ahead + clock.ms("frame_start", "frame_done")
        out["frame_arrival"] = clock.ms("step_start", "downloaded")
        return out

    # ---- the captured functions: device work only, fixed buffers, state updated in place ---------------------

    def _reset(self) -> None:
        self.state.clear(self.masks.buffer[RESET])

    def _audio_step(self) -> Tensor:
        s = self.state
        return self.model.transformer.audio_step(
            s.prev_latent, s.frame_index == 0, s.cache, 2 * s.frame_index
        )

    def _prepare(self) -> None:
        """h_audio of the current frame for the slots in `prepare_mask`; the other slots keep theirs exactly."""
        mask = self.prepare_mask
        with self._ring_guard((0,), mask):
            h_audio = self._audio_step()
        torch.where(mask[:, None], h_audio, self.h_audio, out=self.h_audio)

    def _vision(self) -> tuple[Tensor, Tensor]:
        """v_i and the grid: resize and normalization in fp32, DINOv2 and the aggregator in the model dtype."""
        vision, s = self.model.vision, self.state
        grid = vision.dinov2(vision.preprocess(self.frames.buffer).to(self.dtype))
        return vision.tokenizer(grid, s.prev_grid, s.frame_index > 0), grid

    def _frame(self) -> None:
        s, model, active = self.state, self.model, self.masks.buffer[ACTIVE]
        self._mark("frame_start")
        with self._ring_guard((1,) if self.pipelined else (0, 1), active):
            if not self.pipelined:
                self.h_audio.copy_(self._audio_step())
                self._mark("audio_step")
            token, grid = self._vision()
            self._mark("vision")
            guidance = model.config.sampler.guidance
            h_vision = model.transformer.vision_step(token, s.cache, 2 * s.frame_index + 1, guidance)
            self._mark("vision_step")
            latent = model.sample_latent(self.h_audio, h_vision, self.noise.buffer.to(self.dtype))
            self._mark("sampler")
            audio, vae_state = model.vae.decoder.step(latent.to(s.vae_state[0].dtype), s.vae_state)
            self._mark("vae_decode")
        s.commit(active, grid, latent, vae_state)
        self.audio.buffer.copy_(torch.where(active[:, None, None], audio, 0.0))
        self._mark("frame_done")

    @contextlib.contextmanager
    def _ring_guard(self, offsets: tuple[int, ...], keep: Tensor) -> Iterator[None]:
        """Save the ring entries (positions 2i + offset) the body overwrites; afterwards put them back for the
        slots outside `keep`, or for every slot if the body raises (only an eager run can)."""
        saved = self.state.save_ring(offsets)
        try:
            yield
        except BaseException:
            self.state.restore_ring(saved, torch.ones_like(keep), offsets)
            raise
        self.state.restore_ring(saved, ~keep, offsets)
