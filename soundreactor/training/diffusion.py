"""Diffusion pretraining (the paper's Algorithm 1): aggregator + transformer + head with the EDM2 loss.

Teacher forcing over one clip's interleaved sequence S, v_0, x_0, v_1, ..., v_(N-1) (clean latents in the audio
slots) under the streaming sliding window, with a guidance null query at every vision slot that sees the prefix
and itself and that no later position sees (`CausalTransformer.forward_train`). Frame i's condition is
z_i = concat(h_a,i, h_v,i) with h_v,i the vision-slot output, or, for clips drawn with probability p_uncond, the
null query's output: the unconditional branch that hidden-space CFG uses at inference.

Loss (EDM2, Karras et al. 2024, eq. 17 with a learned log-variance u(t)), per frame with its own noise level
ln t ~ N(P_mean, P_std) and x_t = x_0 + t * eps in head space (latent / latent_scale):
    lambda(t) / exp(u(t)) * mean_c (D(x_t, t, z) - x_0)^2 + u(t),  lambda(t) = (t^2 + sigma_d^2) / (t sigma_d)^2.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from soundreactor.model.frames import FramePreprocess
from soundreactor.model.head import sinusoidal_embedding
from soundreactor.model.soundreactor import SoundReactor
from soundreactor.model.transformer import interleave, vision_position
from soundreactor.training.train_config import TrainConfig


def edm_weight(t: Tensor, sigma_data: float) -> Tensor:
    """lambda(t) = (t^2 + sigma_d^2) / (t * sigma_d)^2: unit-variance loss at every noise level (EDM)."""
    return (t.square() + sigma_data**2) / (t * sigma_data).square()


class Uncertainty(nn.Module):
    """EDM2's learned log-variance u(t): a linear map of the sinusoidal embedding of c_noise = ln(t) / 4.

    Zero-initialised, so training starts from the plain EDM loss. Training only: not in the exported model.
    """

    def __init__(self, freq_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.linear = nn.Linear(freq_dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        return self.linear(sinusoidal_embedding(t.log().flatten() / 4, self.freq_dim)).view_as(t)


class Conditioner(nn.Module):
    """The trained model minus the frozen VAE: aggregator, transformer, head (shared, not copied), and DINOv2 when
    it trains too (`frames_hw` given: the clips' frame size); else DINOv2 is frozen and its grids come cached."""

    def __init__(self, model: SoundReactor, frames_hw: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.tokenizer = model.vision.tokenizer
        self.transformer = model.transformer
        self.head = model.head
        self.dinov2 = model.vision.dinov2 if frames_hw else None
        self.preprocess = FramePreprocess(frames_hw, model.config.vision_hw) if frames_hw else None

    def grids(self, vision: Tensor) -> Tensor:
        """DINOv2 grids [B, N, h, w, C']: `vision` itself when DINOv2 is frozen, else computed from it, the
        clips' uint8 frames [B, N, H, W, 3]."""
        if self.dinov2 is None:
            return vision
        frames = self.preprocess(vision.flatten(0, 1))
        return self.dinov2(frames).unflatten(0, vision.shape[:2])

    def condition(self, latents: Tensor, vision: Tensor, drop: Tensor) -> Tensor:
        """z [B, N, 2 d] for every frame of a clip, teacher-forced.

        latents: raw VAE latents [B, N, C] (the transformer reads x_(i-1) as the stream does); vision: what
        `grids` takes; drop: bool [B], clips whose h_v comes from the guidance null query.
        """
        grids = self.grids(vision)
        batch, frames = latents.shape[:2]
        prev_grids = torch.cat((torch.zeros_like(grids[:, :1]), grids[:, :-1]), dim=1)
        has_prev = (torch.arange(frames, device=grids.device) > 0).expand(batch, -1)
        vision = self.tokenizer(grids.flatten(0, 1), prev_grids.flatten(0, 1), has_prev.flatten())
        vision = vision.view(batch, frames, -1)
        prev = torch.cat((torch.zeros_like(latents[:, :1]), latents[:, :-1]), dim=1)
        audio = self.transformer.audio_token(prev.flatten(0, 1), ~has_prev.flatten())
        sequence = interleave(audio.view(batch, frames, -1), vision)
        nulls = vision_position(torch.arange(frames, device=grids.device))
        hidden, null_hidden = self.transformer.forward_train(sequence, nulls)
        h_vision = torch.where(drop[:, None, None], null_hidden, hidden[:, 1::2])
        return torch.cat((hidden[:, 0::2], h_vision), dim=-1)

    def to_head_space(self, latents: Tensor) -> Tensor:
        return latents / self.head.cfg.latent_scale


class DiffusionTrainee(Conditioner):
    """forward(latents [B, N, C], vision (Conditioner.grids), drop bool [B], t [B, N], eps [B, N, C])."""

    def __init__(self, model: SoundReactor, frames_hw: tuple[int, int] | None = None) -> None:
        super().__init__(model, frames_hw)
        self.uncertainty = Uncertainty(model.config.head.freq_dim)

    def forward(
        self, latents: Tensor, vision: Tensor, drop: Tensor, t: Tensor, eps: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.condition(latents, vision, drop)
        x0 = self.to_head_space(latents)
        denoised = self.head.denoise((x0 + t[..., None] * eps).flatten(0, 1), t.flatten(), z.flatten(0, 1))
        error = (denoised.float().view_as(x0) - x0).square().mean(-1)  # [B, N]
        weighted = edm_weight(t, self.head.cfg.sigma_data) * error
        u = self.uncertainty(t).float()
        loss = (weighted / u.exp() + u).mean()
        return loss, {"edm": weighted.mean()}


def draw_pretrain(
    cfg: TrainConfig, gen: torch.Generator, batch: int, frames: int, dim: int
) -> dict[str, Tensor]:
    """One step's random draws for the global batch: guidance drop, noise levels, noise."""
    return {
        "drop": torch.rand(batch, generator=gen) < cfg.p_uncond,
        "t": torch.exp(cfg.p_mean + cfg.p_std * torch.randn(batch, frames, generator=gen)),
        "eps": torch.randn(batch, frames, dim, generator=gen),
    }


@torch.no_grad()
def measure_latent_scale(latents: Tensor, sigma_data: float) -> float:
    """latent_scale so that head-space latents (latent / scale) have standard deviation sigma_data."""
    std = latents.float().std().item()
    if not std > 0:
        raise ValueError("the VAE latents of the data are constant (std 0): is the VAE or the data empty?")
    return std / sigma_data
