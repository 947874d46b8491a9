"""Diffusion head: MAR-style MLP with adaptive LayerNorm, wrapped in EDM preconditioning (SPEC 2.5).

`forward` is the raw network F(x_in, c_noise, z); `denoise` is the preconditioned denoiser
D(x, t) = c_skip * x + c_out * F(c_in * x, ln(t) / 4, z) that the samplers call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from soundreactor.config import HeadConfig

MAX_PERIOD = 10_000.0  # slowest frequency of the sinusoidal c_noise embedding
LN_EPS = 1e-6


def sinusoidal_embedding(c_noise: Tensor, dim: int) -> Tensor:
    """[B] -> [B, dim]: cos and sin of c_noise at `dim // 2` geometrically spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=c_noise.device) / half)
    angles = c_noise.float()[:, None] * freqs[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def edm_scalings(t: float | Tensor, sigma_data: float) -> tuple[float | Tensor, ...]:
    """EDM's c_skip, c_out and c_in at noise level t (a float or a tensor)."""
    norm = (t**2 + sigma_data**2) ** 0.5
    return sigma_data**2 / norm**2, t * sigma_data / norm, 1 / norm


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift (addcmul: one kernel and one rounding for the multiply-add)."""
    return torch.addcmul(shift, x, 1 + scale)


class ResBlock(nn.Module):
    """x + gate * MLP(adaLN(x)), with shift/scale/gate predicted from the condition."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=LN_EPS, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift, scale, gate = self.ada(cond).chunk(3, dim=-1)
        return torch.addcmul(x, gate, self.mlp(modulate(self.norm(x), shift, scale)))  # x + gate * MLP


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=LN_EPS, elementwise_affine=False)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift, scale = self.ada(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiffusionHead(nn.Module):
    # Default PyTorch init everywhere (no zero-init of the output layers): random-weight tests then exercise
    # the whole network instead of a trivial D = c_skip * x. Trained weights always come from a checkpoint.
    def __init__(self, cfg: HeadConfig, latent_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.latent_dim, self.cond_dim = latent_dim, cond_dim
        self.input_proj = nn.Linear(latent_dim, cfg.width)
        self.cond_proj = nn.Linear(cond_dim, cfg.width)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.freq_dim, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width)
        )
        self.blocks = nn.ModuleList(ResBlock(cfg.width) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.width, latent_dim)

    def forward(self, x_in: Tensor, c_noise: Tensor, z: Tensor) -> Tensor:
        """Raw network F: x_in [B, latent], c_noise [B], z [B, cond] -> [B, latent]."""
        time = self.time_mlp(sinusoidal_embedding(c_noise, self.cfg.freq_dim).to(x_in.dtype))
        cond = self.cond_proj(z) + time
        x = self.input_proj(x_in)
        for block in self.blocks:
            x = block(x, cond)
        return self.final(x, cond)

    def denoise(self, x: Tensor, t: float | Tensor, z: Tensor) -> Tensor:
        """EDM-preconditioned denoiser D(x, t) on head-space latents; t is a float or a tensor [B]."""
        if x.dim() != 2 or x.shape[1] != self.latent_dim or z.shape != (x.shape[0], self.cond_dim):
            raise ValueError(
                f"expected x [B, {self.latent_dim}] and z [B, {self.cond_dim}], "
                f"got {tuple(x.shape)} and {tuple(z.shape)}"
            )
        # Preconditioning runs in fp32 or better whatever the weights' dtype: in bf16, t = 24.4 would round to
        # 24.375. A float t (every sampler step) gives Python scalars: no kernels, folded into the launches.
        if isinstance(t, Tensor):
            t = t.float().expand(x.shape[0])
            c_skip, c_out, c_in = (c[:, None] for c in edm_scalings(t, self.cfg.sigma_data))
            c_noise = t.log() / 4
        else:
            c_skip, c_out, c_in = edm_scalings(t, self.cfg.sigma_data)
            # a fill kernel, no host-to-device copy: a float t stays CUDA-graph capturable
            c_noise = x.new_full((x.shape[0],), math.log(t) / 4, dtype=torch.float32)
        network = self((c_in * x.float()).to(x.dtype), c_noise, z)
        return (c_skip * x.float() + c_out * network.float()).to(x.dtype)
