"""Easy Consistency Tuning (the paper's Algorithm 2; Geng et al., ECT, 2024) of transformer, aggregator and head.

Starts from the diffusion-pretrained weights. Per frame: ln t ~ N(P_mean, P_std); r from the ECT mapping
    r = t * (1 - q^-(stage+1) * (1 + k * sigmoid(-b t))),  clamped to >= 0,
whose gap t - r shrinks by q at every stage (`ect_stage_steps` steps each); the same eps for both points,
x_t = x_0 + t eps and x_r = x_0 + r eps. Loss: w(t) * d(D(x_t, t, z), sg D(x_r, r, z)) with
w(t) = (t^2 + sigma_d^2) / (t sigma_d)^2 and the pseudo-Huber d(a, b) = sqrt(||a - b||^2 + c^2) - c.
The target comes from the same weights under stop-gradient and sees the same z (same dropout mask); at r = 0 it
is x_0 itself (the boundary condition D(x, 0) = x).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from soundreactor.model.soundreactor import SoundReactor
from soundreactor.training.diffusion import Conditioner, edm_weight
from soundreactor.training.train_config import TrainConfig


def ect_r(t: Tensor, stage: int, q: float, k: float, b: float) -> Tensor:
    """The ECT reference mapping t -> r at an annealing stage (0-based)."""
    ratio = 1.0 - q ** -(stage + 1) * (1.0 + k * torch.sigmoid(-b * t))
    return (t * ratio).clamp(min=0.0)


def huber_c(cfg: TrainConfig, latent_dim: int) -> float:
    """Pseudo-Huber c: the configured value, else iCT's 0.00054 * sqrt(dim)."""
    return cfg.huber_c if cfg.huber_c > 0 else 0.00054 * math.sqrt(latent_dim)


class ECTTrainee(Conditioner):
    """forward(latents [B, N, C], vision (grids [B, N, h, w, C']), drop bool [B], t, r [B, N], eps [B, N, C])."""

    def __init__(self, model: SoundReactor, cfg: TrainConfig) -> None:
        super().__init__(model)
        self.c = huber_c(cfg, model.config.vae.latent_dim)

    def forward(
        self, latents: Tensor, vision: Tensor, drop: Tensor, t: Tensor, r: Tensor, eps: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.condition(latents, vision, drop).flatten(0, 1)
        x0 = self.to_head_space(latents).flatten(0, 1)
        t, r, eps = t.flatten(), r.flatten(), eps.flatten(0, 1)
        d_t = self.head.denoise(x0 + t[:, None] * eps, t, z).float()
        with torch.no_grad():
            d_r = self.head.denoise(x0 + r[:, None] * eps, r.clamp(min=1e-6), z.detach()).float()
            target = torch.where(r[:, None] > 0, d_r, x0.float())
        distance = torch.sqrt((d_t - target).square().sum(-1) + self.c**2) - self.c
        loss = (edm_weight(t, self.head.cfg.sigma_data) * distance).mean()
        return loss, {"distance": distance.mean()}


def draw_ect(
    cfg: TrainConfig, gen: torch.Generator, step: int, batch: int, frames: int, dim: int
) -> dict[str, Tensor]:
    """One step's random draws for the global batch: guidance drop, t, its r at this step's stage, noise."""
    t = torch.exp(cfg.ect_p_mean + cfg.ect_p_std * torch.randn(batch, frames, generator=gen))
    stage = step // cfg.ect_stage_steps
    return {
        "drop": torch.rand(batch, generator=gen) < cfg.p_uncond,
        "t": t,
        "r": ect_r(t, stage, cfg.ect_q, cfg.ect_k, cfg.ect_b),
        "eps": torch.randn(batch, frames, dim, generator=gen),
    }
