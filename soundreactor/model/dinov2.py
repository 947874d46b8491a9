"""DINOv2 ViT with register tokens, state-dict compatible with the official `dinov2_vits14_reg4_pretrain.pth`.

The input resolution is pinned at construction: the bicubic resize of the trained position embedding to the
patch grid is computed once and cached as a buffer, so exported graphs see a constant instead of a resize.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soundreactor.config import DinoConfig


def interpolate_pos_embed(pos_embed: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """Resize a [1, 1 + M*M, D] CLS + square-grid position embedding to ``grid_hw`` patches.

    Same as the official `interpolate_pos_encoding` with antialias on and offset 0.0: bicubic in fp32 to the
    exact output size, CLS position untouched, and the embedding returned as is at the trained grid.
    """
    side = round((pos_embed.shape[1] - 1) ** 0.5)
    if tuple(grid_hw) == (side, side):
        return pos_embed
    dim = pos_embed.shape[-1]
    patch_pos = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=tuple(grid_hw), mode="bicubic", antialias=True)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos_embed[:, :1].float(), patch_pos), dim=1).to(pos_embed.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, h*w, D], row-major over the grid


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block; LayerScale on both branches unless ``layerscale_init`` is None."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, eps: float, layerscale_init: float | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, heads)
        self.ls1 = nn.Identity() if layerscale_init is None else LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls2 = nn.Identity() if layerscale_init is None else LayerScale(dim, layerscale_init)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


@torch.no_grad()
def fold_layer_scales(module: nn.Module) -> None:
    """For inference copies: scale each block's attention projection and fc2 by its LayerScale gamma and drop
    the multiply (one kernel per branch a frame). In place; later edits of the gammas are not seen."""
    for block in module.modules():
        if not isinstance(block, Block) or not isinstance(block.ls1, LayerScale):
            continue
        for linear, scale in ((block.attn.proj, block.ls1), (block.mlp.fc2, block.ls2)):
            linear.weight.mul_(scale.gamma[:, None])
            linear.bias.mul_(scale.gamma)
        block.ls1, block.ls2 = nn.Identity(), nn.Identity()


def _refresh_after_load(module: DinoV2, incompatible_keys: object) -> None:
    module.refresh_pos_embed()


class DinoV2(nn.Module):
    """forward(x [B, 3, H, W] ImageNet-normalized, H, W = grid_hw * patch) -> patch tokens [B, h, w, dim].

    The tokens are the official `x_norm_patchtokens` (final norm applied, CLS and registers dropped).
    """

    def __init__(self, cfg: DinoConfig, grid_hw: tuple[int, int]):
        super().__init__()
        self.cfg = cfg
        self.grid_hw = tuple(grid_hw)
        # Registration order follows the official module, so state-dict keys come out in the same order.
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.pos_grid**2, cfg.dim) * 0.02)
        self.register_tokens = nn.Parameter(torch.randn(1, cfg.registers, cfg.dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.dim))  # used in training only; kept for loading
        self.patch_embed = PatchEmbed(cfg.dim, cfg.patch)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.eps, cfg.layerscale_init) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        # Depends only on pos_embed and the pinned grid: not saved, rebuilt after every load_state_dict.
        self.register_buffer("pinned_pos_embed", torch.empty(0), persistent=False)
        self.refresh_pos_embed()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @torch.no_grad()
    def refresh_pos_embed(self) -> None:
        """Recompute the cached position embedding; call after editing `pos_embed` other than by loading."""
        self.pinned_pos_embed = interpolate_pos_embed(self.pos_embed.detach(), self.grid_hw).clone()

    def forward(self, x: Tensor) -> Tensor:
        h, w = self.grid_hw
        patch = self.cfg.patch
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (h * patch, w * patch):
            raise ValueError(
                f"DinoV2 was built for input [B, 3, {h * patch}, {w * patch}] (grid {h}x{w}), got "
                f"{list(x.shape)}; resize frames to that size or build the model with a matching grid_hw"
            )
        batch = x.shape[0]
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), self.patch_embed(x)), dim=1)
        tokens = tokens + self.pinned_pos_embed
        # Registers go after CLS and carry no position embedding.
        tokens = torch.cat((tokens[:, :1], self.register_tokens.expand(batch, -1, -1), tokens[:, 1:]), dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        patches = self.norm(tokens[:, 1 + self.cfg.registers :])  # per-token norm: no need to normalize CLS
        return patches.reshape(batch, h, w, self.cfg.dim)


def official_key_shapes(cfg: DinoConfig) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of the official checkpoint for this config (176 keys for ViT-S/14-reg4)."""
    with torch.device("meta"):
        model = DinoV2(cfg, (cfg.pos_grid, cfg.pos_grid))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
