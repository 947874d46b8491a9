"""SoundReactor: the composed model, its checkpoint I/O, and the cache-free offline reference.

`generate_offline` is the definition every streaming backend is tested against: it re-runs the whole
transformer over the interleaved sequence for every frame (no KV cache), then decodes all latents at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from soundreactor.checkpoint import (
    check_finite,
    check_state_dict,
    load_checkpoint,
    read_tensor_file,
    read_weights,
    save_checkpoint,
)
from soundreactor.config import ModelConfig, preset
from soundreactor.model.head import DiffusionHead
from soundreactor.model.samplers import noise_shape, sample
from soundreactor.model.transformer import CausalTransformer
from soundreactor.model.vae import AudioVAE, vae_state_from_official
from soundreactor.model.video_tokens import VisionEncoder
from soundreactor.noise import NoiseSource


class SoundReactor(nn.Module):
    """Vision encoder -> causal transformer -> diffusion head -> causal VAE decoder.

    `input_hw` is the size of the frames fed in (e.g. 480x854); they are resized to `config.vision_hw` inside.
    """

    def __init__(self, config: ModelConfig, input_hw: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config, input_hw or config.vision_hw)
        self.transformer = CausalTransformer(config.transformer, config.vae.latent_dim)
        self.head = DiffusionHead(config.head, config.vae.latent_dim, 2 * config.transformer.d_model)
        self.vae = AudioVAE(config.vae)

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.vision.preprocess.input_hw

    def sample_latent(self, h_audio: Tensor, h_vision: Tensor, noise: Tensor) -> Tensor:
        """x_i from z_i = concat(h_a, h_v); noise [B, *noise_shape]."""
        return sample(self.head, torch.cat((h_audio, h_vision), dim=-1), noise, self.config.sampler)

    def noise_shape(self) -> tuple[int, ...]:
        return noise_shape(self.config.sampler, self.config.vae.latent_dim)

    def save(self, path: str | Path) -> None:
        save_checkpoint(path, self.config, self.state_dict())

    @classmethod
    def load(cls, path: str | Path, input_hw: tuple[int, int] | None = None) -> SoundReactor:
        """Model from a checkpoint; the stored config is validated and every key, shape and dtype checked (all
        mismatches named at once) before any weight memory is allocated."""
        config, tensors = load_checkpoint(path)
        with torch.device("meta"):
            expected = cls(config, input_hw).state_dict()
        check_state_dict(expected, tensors, f"checkpoint {path}")
        model = cls(config, input_hw)
        model.load_state_dict(tensors, strict=True)
        return model.eval()

    def configure_sampling(self, nfe: int | None = None, guidance: float | None = None) -> None:
        """Pick the head's step count and the guidance weight (validated by SamplerConfig)."""
        changes = {"nfe": nfe, "guidance": guidance}
        self.config = self.config.replace(sampler={k: v for k, v in changes.items() if v is not None})


def init_model(
    preset_name: str,
    seed: int = 0,
    dinov2: str | Path | None = None,
    vae: str | Path | None = None,
    input_hw: tuple[int, int] | None = None,
    vae_prefix: str | None = None,
    vae_weights: str = "ema",
) -> tuple[SoundReactor, list[str]]:
    """A model of the named preset with seeded random weights, taking the official DINOv2 / VAE weights where given.

    `vae_prefix` / `vae_weights` pick the VAE copy in a file holding several (see `vae_state_from_official`).
    Returns the model and lines describing what was loaded from where, and in which layout.
    """
    config = preset(preset_name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SoundReactor(config, input_hw)
    notes = [f"seeded random weights (seed {seed}) for every component not loaded below"]
    if dinov2 is not None:
        tensors = read_tensor_file(dinov2)
        check_state_dict(model.vision.dinov2.state_dict(), tensors, f"DINOv2 weights {dinov2}")
        check_finite(tensors, f"DINOv2 weights {dinov2}")
        model.vision.dinov2.load_state_dict(tensors)
        notes.append(f"DINOv2: {len(tensors)} tensors from {dinov2}")
    if vae is not None:
        raw, container = read_weights(vae)
        tensors, layout = vae_state_from_official(raw, config.vae, vae_prefix, vae_weights)
        check_finite(tensors, f"VAE weights {vae}")
        model.vae.load_state_dict(tensors)
        notes.append(f"VAE: {len(tensors)} tensors from {vae} ({container}; {layout.describe()})")
    return model.eval(), notes


@torch.no_grad()
def generate_offline(model: SoundReactor, frames: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Audio for a whole clip without any cache. frames: uint8 [T, H, W, 3] -> (audio [2, T*hop], latents [T, C]).

    Frame i's transformer outputs come from full recomputation over S, v_0, x_0, ..., v_(i-1), x_(i-1), v_i
    (and the same with null in place of v_i), under the same sliding window as streaming.
    """
    cfg = model.config
    n = frames.shape[0]
    grids = []
    prev_grid = None
    tokens = []
    for i in range(n):
        has_prev = torch.tensor([i > 0])
        grid_prev = prev_grid if prev_grid is not None else torch.zeros(1, *cfg.grid_hw, cfg.dinov2.dim)
        v, grid = model.vision(frames[i : i + 1], grid_prev, has_prev)
        tokens.append(v)
        grids.append(grid)
        prev_grid = grid
    source = NoiseSource([seed], model.noise_shape())
    noise = torch.from_numpy(np.concatenate([source.draw() for _ in range(n)]))  # [T, *noise_shape]

    tf = model.transformer
    sequence = [tf.start[None, None, :]]  # [1, 1, d]
    latents = []
    for i in range(n):
        cond = tf.forward_offline(torch.cat([*sequence, tokens[i][:, None]], dim=1))
        null = tf.forward_offline(torch.cat([*sequence, tf.null[None, None, :]], dim=1))
        h_audio, h_cond, h_null = cond[:, -2], cond[:, -1], null[:, -1]
        h_vision = h_null + cfg.sampler.guidance * (h_cond - h_null)
        x = model.sample_latent(h_audio, h_vision, noise[i : i + 1])
        latents.append(x)
        sequence += [tokens[i][:, None], tf.latent_in(x)[:, None]]
    latents_t = torch.cat(latents)  # [T, C]
    audio = model.vae.decode(latents_t.T[None])[0]
    return audio, latents_t
