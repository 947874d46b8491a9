"""What a batch of streams carries between frames, for the PyTorch backends."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from soundreactor.model.soundreactor import SoundReactor
from soundreactor.model.transformer import KVCache
from soundreactor.noise import NoiseSource


@dataclass
class StreamState:
    """Per-slot state of B streams: KV cache, previous DINOv2 grid, VAE conv states, previous latent, frame
    counter and seeded noise. Tensors have the slot as their first dimension (the cache: second)."""

    cache: KVCache
    prev_grid: Tensor  # [B, h, w, C]
    vae_state: list[Tensor]
    prev_latent: Tensor  # [B, latent]
    frame_index: Tensor  # [B] int64: frames completed so far
    noise: NoiseSource

    @classmethod
    def allocate(cls, model: SoundReactor, seeds: list[int], device: torch.device) -> StreamState:
        cfg = model.config
        slots = len(seeds)
        dtype = next(model.parameters()).dtype
        return cls(
            cache=KVCache(cfg.transformer, slots, device, dtype),
            prev_grid=torch.zeros(slots, *cfg.grid_hw, cfg.dinov2.dim, device=device, dtype=dtype),
            vae_state=model.vae.decoder.init_state(slots, device, next(model.vae.parameters()).dtype),
            prev_latent=torch.zeros(slots, cfg.vae.latent_dim, device=device, dtype=dtype),
            frame_index=torch.zeros(slots, dtype=torch.long, device=device),
            noise=NoiseSource(seeds, model.noise_shape()),
        )

    @property
    def slots(self) -> int:
        return len(self.noise.seeds)

    def ring_slots(self, offsets: tuple[int, ...] = (0, 1)) -> Tensor:
        """[B, len(offsets)] ring indices of positions 2i + offset: the frame's audio-slot token (offset 0) and
        its vision token (offset 1)."""
        pos = 2 * self.frame_index
        return torch.remainder(torch.stack([pos + o for o in offsets], dim=1), self.cache.k.shape[3])

    def save_ring(self, offsets: tuple[int, ...] = (0, 1)) -> tuple[Tensor, Tensor]:
        """Copies of the cache entries this frame will overwrite, so a skipped or failed frame can undo them."""
        index = self._ring_index(offsets)
        return self.cache.k.gather(3, index), self.cache.v.gather(3, index)

    def restore_ring(
        self, saved: tuple[Tensor, Tensor], slots: Tensor, offsets: tuple[int, ...] = (0, 1)
    ) -> None:
        """Put back the saved entries for the slots in the bool mask `slots` (others keep the new ones)."""
        index = self._ring_index(offsets)
        for buffer, old in zip((self.cache.k, self.cache.v), saved, strict=True):
            new = buffer.gather(3, index)
            buffer.scatter_(3, index, torch.where(slots.view(1, -1, 1, 1, 1), old, new))

    def _ring_index(self, offsets: tuple[int, ...]) -> Tensor:
        layers, slots, heads, _, head_dim = self.cache.k.shape
        index = self.ring_slots(offsets).view(1, slots, 1, len(offsets), 1)
        return index.expand(layers, slots, heads, len(offsets), head_dim)

    def commit(self, active: Tensor, grid: Tensor, latent: Tensor, vae_state: list[Tensor]) -> None:
        """Adopt a finished frame's results for the active slots; idle slots keep what they had. In place, so
        buffers that a CUDA graph captured keep their addresses."""
        olds, news = (self.prev_grid, self.prev_latent, *self.vae_state), (grid, latent, *vae_state)
        for old, new in zip(olds, news, strict=True):
            # out= the tensor read element by element: one kernel, no temporary
            torch.where(active.view(-1, *([1] * (new.dim() - 1))), new, old, out=old)
        self.frame_index.add_(active.long())

    def clear(self, slots: Tensor) -> None:
        """Zero the device state of the slots in the bool mask `slots` [B], in place (static shapes, no host
        sync: capturable in a CUDA graph). The noise generators are the caller's."""
        for tensor in (self.prev_grid, self.prev_latent, self.frame_index, *self.vae_state):
            tensor.masked_fill_(slots.view(-1, *([1] * (tensor.dim() - 1))), 0)
        for tensor in (self.cache.k, self.cache.v):
            tensor.masked_fill_(slots.view(1, -1, 1, 1, 1), 0)

    def reset(self, slot: int | None = None) -> None:
        """Start slot `slot` (or every slot) afresh without touching the others."""
        slots = torch.zeros(self.slots, dtype=torch.bool, device=self.frame_index.device)
        slots[slice(None) if slot is None else slot] = True
        self.clear(slots)
        for s in range(self.slots) if slot is None else [slot]:
            self.noise.reset(s)
