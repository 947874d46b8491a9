"""Seeded per-stream noise, identical in every backend (numpy PCG64: no torch needed at run time)."""

from __future__ import annotations

from typing import Any

import numpy as np


class NoiseSource:
    """One Gaussian generator per stream slot, drawing `shape` float32 noise per frame.

    Slot k of a run seeded with `seeds` always yields the same sequence, whatever the backend or batch size, so
    backends can be compared frame by frame and a reset stream replays exactly.
    """

    def __init__(self, seeds: list[int], shape: tuple[int, ...]) -> None:
        self.seeds = list(seeds)
        self.shape = shape
        self.generators = [np.random.default_rng(s) for s in self.seeds]

    def draw(self, active: np.ndarray | None = None) -> np.ndarray:
        """Noise [B, *shape]; only active slots advance their generator (idle slots get zeros)."""
        active = np.ones(len(self.seeds), dtype=bool) if active is None else active
        out = np.zeros((len(self.seeds), *self.shape), dtype=np.float32)
        for k, generator in enumerate(self.generators):
            if active[k]:
                out[k] = generator.standard_normal(self.shape, dtype=np.float32)
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        return [g.bit_generator.state for g in self.generators]

    def restore(self, states: list[dict[str, Any]]) -> None:
        for g, state in zip(self.generators, states, strict=True):
            g.bit_generator.state = state

    def reset(self, slot: int | None = None) -> None:
        for k in range(len(self.seeds)) if slot is None else [slot]:
            self.generators[k] = np.random.default_rng(self.seeds[k])
