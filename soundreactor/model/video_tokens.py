"""Video token: DINOv2 grid features plus their temporal difference, aggregated into one token per frame.

`VisionEncoder` is the whole vision engine of a frame: uint8 frame -> resize/normalize -> DINOv2 -> `v_i`,
returning the new grid as the next frame's `prev_grid` (streaming state).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from soundreactor.config import ModelConfig, VideoTokenConfig
from soundreactor.model.dinov2 import Block, DinoV2
from soundreactor.model.frames import FramePreprocess


class VideoTokenizer(nn.Module):
    """forward(grid [B, h, w, C], prev_grid [B, h, w, C], has_prev bool [B]) -> v [B, d_model].

    concat(G, G - G_prev) -> 1x1 projection -> strided downsample conv -> learned positions -> append an
    aggregation token -> bidirectional pre-norm layers -> norm + linear on the aggregation token.
    """

    def __init__(self, cfg: VideoTokenConfig, dino_dim: int, grid_hw: tuple[int, int], d_model: int):
        super().__init__()
        h, w = grid_hw
        if h % cfg.downsample or w % cfg.downsample:
            raise ValueError(f"grid {h}x{w} must be divisible by the video downsample {cfg.downsample}")
        self.grid_hw = (h, w)
        self.dino_dim = dino_dim
        n_tokens = (h // cfg.downsample) * (w // cfg.downsample)
        self.proj = nn.Conv2d(2 * dino_dim, cfg.width, kernel_size=1)
        self.downsample = nn.Conv2d(cfg.width, cfg.width, kernel_size=cfg.downsample, stride=cfg.downsample)
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, cfg.width) * 0.02)
        self.agg_token = nn.Parameter(torch.randn(1, 1, cfg.width) * 0.02)
        self.layers = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, eps=cfg.eps, layerscale_init=None)
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.out = nn.Linear(cfg.width, d_model)

    def forward(self, grid: Tensor, prev_grid: Tensor, has_prev: Tensor) -> Tensor:
        expected = (*self.grid_hw, self.dino_dim)
        for name, t in (("grid", grid), ("prev_grid", prev_grid)):
            if t.dim() != 4 or tuple(t.shape[1:]) != expected:
                raise ValueError(f"{name} must be [B, {', '.join(map(str, expected))}], got {list(t.shape)}")
        if has_prev.dtype != torch.bool or tuple(has_prev.shape) != (grid.shape[0],):
            raise TypeError(
                f"has_prev must be a bool tensor [B={grid.shape[0]}], got {has_prev.dtype} "
                f"{list(has_prev.shape)}"
            )
        # where, not a multiply: a reset slot's prev_grid may hold anything, even NaN.
        diff = torch.where(has_prev[:, None, None, None], grid - prev_grid, torch.zeros_like(grid))
        features = torch.cat((grid, diff), dim=-1).permute(0, 3, 1, 2)
        tokens = self.downsample(self.proj(features)).flatten(2).transpose(1, 2) + self.pos_embed
        tokens = torch.cat((tokens, self.agg_token.expand(grid.shape[0], -1, -1)), dim=1)
        for layer in self.layers:
            tokens = layer(tokens)
        return self.out(self.norm(tokens[:, -1]))


class VisionEncoder(nn.Module):
    """forward(frames uint8 [B, H, W, 3], prev_grid [B, h, w, C], has_prev bool [B])
    -> (v [B, d_model], grid [B, h, w, C]).

    Built for one input frame size (`input_hw`); its resize matrices are buffers outside the state dict, so
    the weights (`dinov2.<official key>`, `tokenizer.*`) load into an encoder for any input size.
    """

    def __init__(self, cfg: ModelConfig, input_hw: tuple[int, int]):
        super().__init__()
        self.preprocess = FramePreprocess(input_hw, cfg.vision_hw)
        self.dinov2 = DinoV2(cfg.dinov2, cfg.grid_hw)
        self.tokenizer = VideoTokenizer(cfg.video, cfg.dinov2.dim, cfg.grid_hw, cfg.transformer.d_model)

    def forward(self, frames: Tensor, prev_grid: Tensor, has_prev: Tensor) -> tuple[Tensor, Tensor]:
        grid = self.dinov2(self.preprocess(frames))
        return self.tokenizer(grid, prev_grid, has_prev), grid
