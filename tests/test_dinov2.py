import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tolerance import rounding_atol

from soundreactor.config import DinoConfig, paper, tiny
from soundreactor.model.dinov2 import (
    DinoV2,
    LayerScale,
    fold_layer_scales,
    interpolate_pos_embed,
    official_key_shapes,
)


def spec_key_shapes(dim: int, depth: int, registers: int, patch: int, pos_grid: int) -> dict[str, tuple]:
    """Key names and shapes of `dinov2_vits14_reg4_pretrain.pth`, written out from SPEC 2.1 (MLP ratio 4)."""
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + pos_grid**2, dim),
        "register_tokens": (1, registers, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for n in range(depth):
        per_block = {
            "norm1.weight": (dim,),
            "norm1.bias": (dim,),
            "attn.qkv.weight": (3 * dim, dim),
            "attn.qkv.bias": (3 * dim,),
            "attn.proj.weight": (dim, dim),
            "attn.proj.bias": (dim,),
            "ls1.gamma": (dim,),
            "norm2.weight": (dim,),
            "norm2.bias": (dim,),
            "mlp.fc1.weight": (4 * dim, dim),
            "mlp.fc1.bias": (4 * dim,),
            "mlp.fc2.weight": (dim, 4 * dim),
            "mlp.fc2.bias": (dim,),
            "ls2.gamma": (dim,),
        }
        shapes |= {f"blocks.{n}.{k}": v for k, v in per_block.items()}
    return shapes | {"norm.weight": (dim,), "norm.bias": (dim,)}


def tiny_key_shapes() -> dict[str, tuple]:
    c = tiny().dinov2
    return spec_key_shapes(c.dim, c.depth, c.registers, c.patch, c.pos_grid)


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Official names, random values far from any init (norm scales around 1) so every weight matters."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in tiny_key_shapes().items():
        value = torch.randn(shape, generator=gen) * (0.2 if len(shape) > 1 else 0.5)
        sd[name] = value + 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else value
    return sd


def test_paper_keys_are_the_official_176():
    expected = spec_key_shapes(dim=384, depth=12, registers=4, patch=14, pos_grid=37)
    assert len(expected) == 176
    assert expected["pos_embed"] == (1, 1370, 384)
    assert expected["blocks.0.attn.qkv.weight"] == (1152, 384)
    assert expected["blocks.11.mlp.fc1.weight"] == (1536, 384)
    assert official_key_shapes(paper().dinov2) == expected
    with torch.device("meta"):
        model = DinoV2(paper().dinov2, paper().grid_hw)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_loads_a_state_dict_with_official_names():
    cfg = tiny()
    model = DinoV2(cfg.dinov2, cfg.grid_hw)
    sd = random_state_dict()
    model.load_state_dict(sd, strict=True)
    loaded = model.state_dict()
    assert set(loaded) == set(sd)  # the pos cache is not a key
    for name, value in sd.items():
        assert torch.equal(loaded[name], value), name


def test_pos_embed_unchanged_at_trained_grid():
    cfg = tiny().dinov2
    model = DinoV2(cfg, (cfg.pos_grid, cfg.pos_grid))
    assert torch.equal(model.pinned_pos_embed, model.pos_embed.detach())


def test_pos_embed_bicubic_antialiased_at_other_grids():
    cfg = tiny()
    model = DinoV2(cfg.dinov2, cfg.grid_hw)  # 6x6 trained -> 4x8: one axis shrinks, one grows
    pos = model.pos_embed.detach()
    side, dim = cfg.dinov2.pos_grid, cfg.dinov2.dim
    square = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=cfg.grid_hw, mode="bicubic", antialias=True)
    expected = torch.cat((pos[:, :1], resized.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)
    torch.testing.assert_close(model.pinned_pos_embed, expected, rtol=0, atol=rounding_atol(expected))
    plain = F.interpolate(square, size=cfg.grid_hw, mode="bicubic", antialias=False)
    assert (resized - plain).abs().max() > 1e-3  # the antialias flag is visible at this size


def test_pos_cache_refreshed_by_load_state_dict():
    cfg = tiny()
    model = DinoV2(cfg.dinov2, cfg.grid_hw)
    sd = random_state_dict(seed=1)
    assert not torch.allclose(model.pinned_pos_embed, interpolate_pos_embed(sd["pos_embed"], cfg.grid_hw))
    model.load_state_dict(sd)
    torch.testing.assert_close(
        model.pinned_pos_embed, interpolate_pos_embed(sd["pos_embed"], cfg.grid_hw), rtol=0, atol=0
    )


def manual_dinov2(sd: dict[str, torch.Tensor], cfg: DinoConfig, x: torch.Tensor) -> torch.Tensor:
    """Independent ViT forward straight from the state dict: unfolded patches, explicit softmax attention."""
    batch, _, height, width = x.shape
    p, dim, heads = cfg.patch, cfg.dim, cfg.heads
    h, w = height // p, width // p
    patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(batch, h * w, 3 * p * p)
    tokens = patches @ sd["patch_embed.proj.weight"].reshape(dim, -1).T + sd["patch_embed.proj.bias"]
    side = cfg.pos_grid
    grid_pos = sd["pos_embed"][:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bicubic", antialias=True)
    tokens = tokens + grid_pos.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(batch, -1, -1)
    x = torch.cat((cls, sd["register_tokens"].expand(batch, -1, -1), tokens), dim=1)

    def norm(t, name):
        return F.layer_norm(t, (dim,), sd[f"{name}.weight"], sd[f"{name}.bias"], cfg.eps)

    for n in range(cfg.depth):
        b = f"blocks.{n}."
        qkv = norm(x, b + "norm1") @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]
        q, k, v = qkv.reshape(batch, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
        attn = (probs @ v).transpose(1, 2).reshape(batch, -1, dim)
        x = x + sd[b + "ls1.gamma"] * (attn @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"])
        hidden = F.gelu(norm(x, b + "norm2") @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        x = x + sd[b + "ls2.gamma"] * (hidden @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"])
    return norm(x, "norm")[:, 1 + cfg.registers :].reshape(batch, h, w, dim)


def test_matches_manual_forward():
    cfg = tiny()
    model = DinoV2(cfg.dinov2, cfg.grid_hw).eval()
    sd = random_state_dict(seed=2)
    model.load_state_dict(sd)
    x = torch.randn(2, 3, *cfg.vision_hw, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(x)
    expected = manual_dinov2(sd, cfg.dinov2, x)
    assert got.shape == (2, *cfg.grid_hw, cfg.dinov2.dim)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)  # fp32, outputs are O(1) after the norm


def test_folded_layer_scales_give_the_same_tokens():
    cfg = tiny()
    model = DinoV2(cfg.dinov2, cfg.grid_hw).eval()
    model.load_state_dict(random_state_dict(seed=4))  # gammas around 0 +- 0.5, not the 1e-5 init
    folded = copy.deepcopy(model)
    fold_layer_scales(folded)
    assert not any(isinstance(m, LayerScale) for m in folded.modules())
    x = torch.randn(2, 3, *cfg.vision_hw, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-5)  # fp32: rounding order only


def test_rejects_wrong_input_size():
    cfg = tiny()
    model = DinoV2(cfg.dinov2, cfg.grid_hw)
    with pytest.raises(ValueError, match="built for input"):
        model(torch.randn(1, 3, 56, 98))
