"""Eager PyTorch backend: the reference model stepped frame by frame with its caches."""

from __future__ import annotations

import numpy as np
import torch
from torch.profiler import record_function

from soundreactor.model.soundreactor import SoundReactor
from soundreactor.runtime.session import Streams, check_active, check_frames
from soundreactor.runtime.state import StreamState
from soundreactor.triton_kernels import attention_for


class TorchStreams(Streams):
    """B streams on the eager reference model (any device, fp32 by default).

    On CUDA the transformer's attention step is the fused Triton kernel unless SOUNDREACTOR_TRITON=0.
    """

    def __init__(
        self,
        model: SoundReactor,
        slots: int = 1,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        model.transformer.attention_fn = attention_for(self.device)
        self.slots = slots
        self.frame_hw = model.input_hw
        self.samples_per_frame = model.config.samples_per_frame
        self.sample_rate = model.config.vae.sample_rate
        self.state = StreamState.allocate(model, [seed + k for k in range(slots)], self.device)

    @torch.no_grad()
    def step(self, frames: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        frames = check_frames(frames, self.slots, self.frame_hw)
        active_np = check_active(active, self.slots)
        active_t = torch.from_numpy(active_np).to(self.device)
        model, state = self.model, self.state
        saved_noise = state.noise.snapshot()
        saved_ring = state.save_ring()
        try:
            noise = torch.from_numpy(state.noise.draw(active_np)).to(self.device)
            pos = 2 * state.frame_index
            is_first = state.frame_index == 0
            # Stage labels show up in torch.profiler traces; perf/bench_cpu.py reads them per component.
            with record_function("audio_step"):
                h_audio = model.transformer.audio_step(state.prev_latent, is_first, state.cache, pos)
            with record_function("vision"):
                frames_t = torch.from_numpy(frames).to(self.device)
                token, grid = model.vision(frames_t, state.prev_grid, ~is_first)
            with record_function("vision_step"):
                guidance = model.config.sampler.guidance
                h_vision = model.transformer.vision_step(token, state.cache, pos + 1, guidance)
            with record_function("sampler"):
                latent = model.sample_latent(h_audio, h_vision, noise)
            with record_function("vae_decode"):
                audio, vae_state = model.vae.decoder.step(latent, state.vae_state)
        except BaseException:
            state.noise.restore(saved_noise)
            state.restore_ring(saved_ring, torch.ones_like(active_t))
            raise
        state.restore_ring(saved_ring, ~active_t)
        state.commit(active_t, grid, latent, vae_state)
        audio = torch.where(active_t[:, None, None], audio, torch.zeros_like(audio))
        return audio.float().cpu().numpy()

    def reset(self, slot: int | None = None) -> None:
        if slot is not None and not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} out of range for {self.slots} slots")
        self.state.reset(slot)
