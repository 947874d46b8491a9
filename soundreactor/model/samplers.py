"""Samplers that turn a condition z_i into a latent x_i with the diffusion head (SPEC 2.5).

Step times are Python floats, so every loop unrolls into a static graph under export or CUDA-graph capture.
The head works on latents divided by `latent_scale`; the samplers return latents multiplied back by it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

from torch import Tensor

from soundreactor.config import HeadConfig, SamplerConfig


class Denoiser(Protocol):
    cfg: HeadConfig

    def denoise(self, x: Tensor, t: float | Tensor, z: Tensor) -> Tensor: ...


def consistency_times(cfg: SamplerConfig) -> tuple[float, ...]:
    """The nfe step times (SamplerConfig guarantees nfe of them, decreasing)."""
    return cfg.consistency_steps[cfg.nfe]


def noise_shape(cfg: SamplerConfig, latent_dim: int) -> tuple[int, int]:
    """Noise one frame consumes: one draw per consistency step, or the single starting draw of Heun."""
    if cfg.kind == "consistency":
        return (len(consistency_times(cfg)), latent_dim)
    return (1, latent_dim)


def consistency_sample(head: Denoiser, z: Tensor, noise: Tensor, step_times: Sequence[float]) -> Tensor:
    """ECT few-step sampling, noise [B, nfe, latent].

    x = t_0 eps_0; per step k: x0 = D(x, t_k), then x = x0 + t_(k+1) eps_(k+1) if a next step exists.
    """
    if noise.dim() != 3 or noise.shape[1] != len(step_times):
        raise ValueError(
            f"noise must be [B, {len(step_times)}, latent], one draw per step; got {tuple(noise.shape)}"
        )
    x = step_times[0] * noise[:, 0]
    for k, t in enumerate(step_times):
        x0 = head.denoise(x, t, z)
        if k + 1 < len(step_times):
            x = x0 + step_times[k + 1] * noise[:, k + 1]
    return x0 * head.cfg.latent_scale


def karras_times(n: int, t_min: float, t_max: float, rho: float) -> tuple[float, ...]:
    """EDM schedule: n noise levels from t_max down to t_min (rho-spaced), then a final 0. Length n + 1."""
    if n < 1 or not 0 < t_min <= t_max:
        raise ValueError(f"need n >= 1 and 0 < t_min <= t_max, got n={n}, t_min={t_min}, t_max={t_max}")
    if n == 1:
        return (t_max, 0.0)
    lo, hi = t_min ** (1 / rho), t_max ** (1 / rho)
    return (*((hi + i / (n - 1) * (lo - hi)) ** rho for i in range(n)), 0.0)


def heun_sample(head: Denoiser, z: Tensor, noise: Tensor, cfg: SamplerConfig) -> Tensor:
    """Deterministic EDM Heun on the Karras schedule, 2 * heun_steps - 1 head calls; noise [B, 1, latent]."""
    if noise.dim() != 3 or noise.shape[1] != 1:
        raise ValueError(f"Heun noise must be [B, 1, latent], got {tuple(noise.shape)}")
    times = karras_times(cfg.heun_steps, cfg.t_min, cfg.t_max, cfg.rho)
    x = times[0] * noise[:, 0]
    for t, t_next in itertools.pairwise(times):
        slope = (x - head.denoise(x, t, z)) / t
        x_next = x + (t_next - t) * slope
        if t_next > 0:  # second-order correction; the last step to t = 0 stays Euler
            slope_next = (x_next - head.denoise(x_next, t_next, z)) / t_next
            x_next = x + (t_next - t) * (slope + slope_next) / 2
        x = x_next
    return x * head.cfg.latent_scale


def sample(head: Denoiser, z: Tensor, noise: Tensor, cfg: SamplerConfig) -> Tensor:
    """x_i [B, latent] from z_i [B, cond] and this frame's noise [B, *noise_shape(cfg, latent)]."""
    if cfg.kind == "consistency":
        return consistency_sample(head, z, noise, consistency_times(cfg))
    return heun_sample(head, z, noise, cfg)
