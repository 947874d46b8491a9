import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from tolerance import module_depth, rounding_atol
from torch import nn

from soundreactor.config import ModelConfig, tiny
from soundreactor.model.frames import FramePreprocess, resize_matrix
from soundreactor.model.video_tokens import VideoTokenizer, VisionEncoder

CFG = tiny()
GRID_HW = CFG.grid_hw  # 4x8
DIM = CFG.dinov2.dim
MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)


def random_frames(batch: int, hw: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, *hw, 3), dtype=torch.uint8, generator=gen)


def reference_preprocess(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    images = frames.permute(0, 3, 1, 2).double() / 255
    resized = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    return ((resized - MEAN.double()) / STD.double()).float()


@pytest.mark.parametrize("in_hw", [(480, 854), (30, 50), (57, 113), (56, 112)])
def test_resize_matrices_match_interpolate(in_hw):
    out_hw = CFG.vision_hw
    image = torch.rand(2, 3, *in_hw, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(image, size=out_hw, mode="bilinear", antialias=True, align_corners=False)
    got = resize_matrix(in_hw[0], out_hw[0]).double() @ image @ resize_matrix(in_hw[1], out_hw[1]).double().T
    # fp32 matrix entries (each rounded, two matrices) on [0, 1] pixels, the products in float64
    torch.testing.assert_close(got, expected, rtol=0, atol=rounding_atol(expected, 2, torch.float32))


@pytest.mark.parametrize("in_hw", [(90, 160), (56, 112)])
def test_preprocess_matches_interpolate_and_normalize(in_hw):
    frames = random_frames(2, in_hw, seed=1)
    got = FramePreprocess(in_hw, CFG.vision_hw)(frames)
    assert got.shape == (2, 3, *CFG.vision_hw) and got.dtype == torch.float32
    # fp32 matmuls over 0..255 values, then a 1/(255*std) ~ 0.017 scale
    torch.testing.assert_close(got, reference_preprocess(frames, CFG.vision_hw), rtol=0, atol=1e-4)


def test_preprocess_rejects_bad_frames():
    prep = FramePreprocess((90, 160), CFG.vision_hw)
    with pytest.raises(TypeError, match="uint8"):
        prep(torch.zeros(1, 90, 160, 3))
    with pytest.raises(ValueError, match="90, 160, 3"):
        prep(torch.zeros(1, 160, 90, 3, dtype=torch.uint8))


def make_tokenizer() -> VideoTokenizer:
    torch.manual_seed(0)
    return VideoTokenizer(CFG.video, DIM, GRID_HW, CFG.transformer.d_model).eval()


TOKENIZER_DEPTH = module_depth(make_tokenizer())


def grids(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, *GRID_HW, DIM, generator=torch.Generator().manual_seed(seed))


def manual_tokenizer(sd: dict[str, torch.Tensor], grid, prev_grid, has_prev) -> torch.Tensor:
    """Independent re-derivation: convolutions as einsums over patches, explicit softmax attention."""
    batch, heads, k = grid.shape[0], CFG.video.heads, CFG.video.downsample
    diff = (grid - prev_grid) * has_prev[:, None, None, None].to(grid.dtype)
    features = torch.cat((grid, diff), dim=-1)
    projected = features @ sd["proj.weight"][:, :, 0, 0].T + sd["proj.bias"]
    h, w, width = projected.shape[1] // k, projected.shape[2] // k, projected.shape[3]
    blocks = projected.reshape(batch, h, k, w, k, width)  # [B, h, ky, w, kx, C]
    x = torch.einsum("bhywxc,ocyx->bhwo", blocks, sd["downsample.weight"]) + sd["downsample.bias"]
    x = x.reshape(batch, h * w, width) + sd["pos_embed"]
    x = torch.cat((x, sd["agg_token"].expand(batch, -1, -1)), dim=1)

    def norm(t, name):
        return F.layer_norm(t, (width,), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    for n in range(CFG.video.depth):
        b = f"layers.{n}."
        qkv = norm(x, b + "norm1") @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]
        q, key, v = qkv.reshape(batch, -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ key.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        attn = (probs @ v).transpose(1, 2).reshape(batch, -1, width)
        x = x + attn @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        hidden = F.gelu(norm(x, b + "norm2") @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        x = x + hidden @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    return norm(x[:, -1], "norm") @ sd["out.weight"].T + sd["out.bias"]


def test_tokenizer_matches_manual_forward():
    tokenizer = make_tokenizer()
    grid, prev = grids(3, 1), grids(3, 2)
    has_prev = torch.tensor([True, False, True])
    with torch.no_grad():
        v = tokenizer(grid, prev, has_prev)
    assert v.shape == (3, CFG.transformer.d_model)
    expected = manual_tokenizer(tokenizer.state_dict(), grid, prev, has_prev)
    torch.testing.assert_close(v, expected, rtol=0, atol=1e-5)  # fp32, O(1) outputs


def test_no_previous_frame_means_zero_difference():
    tokenizer = make_tokenizer()
    grid = grids(2, 1)
    no_prev = torch.zeros(2, dtype=torch.bool)
    garbage = torch.full_like(grid, float("nan"))  # a reset slot's state may hold anything
    with torch.no_grad():
        v_reset = tokenizer(grid, garbage, no_prev)
        v_same = tokenizer(grid, grid, torch.ones(2, dtype=torch.bool))  # G - G_prev = 0 explicitly
    torch.testing.assert_close(v_reset, v_same, rtol=0, atol=rounding_atol(v_same, TOKENIZER_DEPTH))


def test_previous_frame_changes_the_token_per_slot():
    tokenizer = make_tokenizer()
    grid, prev = grids(2, 1), grids(2, 2)
    with torch.no_grad():
        v_first = tokenizer(grid, prev, torch.tensor([False, False]))
        v_mixed = tokenizer(grid, prev, torch.tensor([True, False]))
    assert (v_mixed[0] - v_first[0]).abs().max() > 1e-3  # slot 0 sees its difference
    # slot 1 is unaffected (up to rounding: its batch differs)
    torch.testing.assert_close(
        v_mixed[1], v_first[1], rtol=0, atol=rounding_atol(v_first[1], TOKENIZER_DEPTH)
    )


def test_tokenizer_rejects_bad_inputs():
    tokenizer = make_tokenizer()
    grid = grids(2, 1)
    with pytest.raises(TypeError, match="has_prev"):
        tokenizer(grid, grid, torch.ones(2))
    with pytest.raises(ValueError, match="prev_grid"):
        tokenizer(grid, grid[:, :2], torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        VideoTokenizer(CFG.video, DIM, (5, 8), CFG.transformer.d_model)


def test_vision_encoder_composes_and_keeps_official_keys():
    in_hw = (90, 160)
    encoder = VisionEncoder(CFG, in_hw).eval()
    keys = list(encoder.state_dict())
    dino_keys = [k.removeprefix("dinov2.") for k in keys if k.startswith("dinov2.")]
    assert len(dino_keys) == 4 + 2 + 14 * CFG.dinov2.depth + 2
    assert {"cls_token", "pos_embed", "register_tokens", "mask_token", "blocks.1.ls2.gamma"} <= set(dino_keys)
    assert all(k.startswith(("dinov2.", "tokenizer.")) for k in keys)  # resize matrices stay out

    frames = random_frames(2, in_hw, seed=4)
    prev = grids(2, 5)
    has_prev = torch.tensor([True, False])
    with torch.no_grad():
        v, grid = encoder(frames, prev, has_prev)
        expected_grid = encoder.dinov2(reference_preprocess(frames, CFG.vision_hw))
        expected_v = encoder.tokenizer(expected_grid, prev, has_prev)
    assert v.shape == (2, CFG.transformer.d_model) and grid.shape == (2, *GRID_HW, DIM)
    torch.testing.assert_close(grid, expected_grid, rtol=0, atol=1e-4)  # preprocess differs by ~1e-5
    torch.testing.assert_close(v, expected_v, rtol=0, atol=1e-4)


def test_vision_encoder_load_refreshes_dino_pos_cache():
    encoder = VisionEncoder(CFG, (90, 160))
    sd = encoder.state_dict()
    sd["dinov2.pos_embed"] = torch.randn_like(sd["dinov2.pos_embed"])
    encoder.load_state_dict(sd)
    side, h, w = CFG.dinov2.pos_grid, *GRID_HW
    square = sd["dinov2.pos_embed"][:, 1:].reshape(1, side, side, DIM).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=(h, w), mode="bicubic", antialias=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(encoder.dinov2.pinned_pos_embed[:, 1:], resized.reshape(1, h * w, DIM))


def test_layer_norm_eps_comes_from_the_config():
    cfg = dataclasses.replace(CFG.video, eps=1e-2)
    tokenizer = VideoTokenizer(cfg, DIM, GRID_HW, CFG.transformer.d_model)
    norms = [m for m in tokenizer.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * cfg.depth + 1 and {m.eps for m in norms} == {1e-2}
    # configs saved before the field existed load with the value they were built with
    data = CFG.to_dict()
    del data["video"]["eps"]
    assert ModelConfig.from_dict(data).video.eps == 1e-5
