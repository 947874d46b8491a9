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
            vae_state=model.vae.decoder.init_state(slots, device, dtype),
            prev_latent=torch.zeros(slots, cfg.vae.latent_dim, device=device, dtype=dtype),
            frame_index=torch.zeros(slots, dtype=torch.long, device=device),
            noise=NoiseSource(seeds, model.noise_shape()),
        )

    @property
    def slots(self) -> int:
        return len(self.noise.seeds)

    def ring_slots(self) -> Tensor:
        """[B, 2] ring indices a frame writes: its audio-slot token (2i) and its vision token (2i+1)."""
        pos = 2 * self.frame_index
        return torch.remainder(torch.stack((pos, pos + 1), dim=1), self.cache.k.shape[3])

    def save_ring(self) -> tuple[Tensor, Tensor]:
        """Copies of the cache entries this frame will overwrite, so a skipped or failed frame can undo them."""
        index = self._ring_index()
        return self.cache.k.gather(3, index), self.cache.v.gather(3, index)

    def restore_ring(self, saved: tuple[Tensor, Tensor], slots: Tensor) -> None:
        """Put back the saved entries for the slots in the bool mask `slots` (others keep the new ones)."""
        index = self._ring_index()
        for buffer, old in zip((self.cache.k, self.cache.v), saved, strict=True):
            new = buffer.gather(3, index)
            buffer.scatter_(3, index, torch.where(slots.view(1, -1, 1, 1, 1), old, new))

    def _ring_index(self) -> Tensor:
        layers, slots, heads, _, head_dim = self.cache.k.shape
        return self.ring_slots().view(1, slots, 1, 2, 1).expand(layers, slots, heads, 2, head_dim)

    def commit(self, active: Tensor, grid: Tensor, latent: Tensor, vae_state: list[Tensor]) -> None:
        """Adopt a finished frame's results for the active slots; idle slots keep what they had."""

        def keep(new: Tensor, old: Tensor) -> Tensor:
            mask = active.view(-1, *([1] * (new.dim() - 1)))
            return torch.where(mask, new, old)

        self.prev_grid = keep(grid, self.prev_grid)
        self.prev_latent = keep(latent, self.prev_latent)
        self.vae_state = [keep(n, o) for n, o in zip(vae_state, self.vae_state, strict=True)]
        self.frame_index = self.frame_index + active.long()

    def reset(self, slot: int | None = None) -> None:
        """Start slot `slot` (or every slot) afresh without touching the others."""
        slots = range(self.slots) if slot is None else [slot]
        for s in slots:
            self.cache.reset(torch.tensor([s]))
            self.prev_grid[s] = 0
            self.prev_latent[s] = 0
            for tensor in self.vae_state:
                tensor[s] = 0
            self.frame_index[s] = 0
            self.noise.reset(s)
