"""Streaming transformer steps against the cache-free offline recompute (tiny preset, fp32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tolerance import rounding_atol

from soundreactor.config import TransformerConfig, tiny
from soundreactor.model import attention
from soundreactor.model.transformer import (
    CausalTransformer,
    FeedForward,
    KVCache,
    audio_position,
    fuse_feed_forwards,
    interleave,
    vision_position,
)

LATENT = 8
STATE_TOL = 1e-5  # fp32 streaming vs offline; both are exact algebra, differences are rounding only (~1e-6)
GUIDED_TOL = 3 * STATE_TOL  # h_n + w (h_c - h_n) amplifies rounding by up to 1 + 2w (w = 3 here)


def make_model(cfg: TransformerConfig, seed: int = 0) -> CausalTransformer:
    torch.manual_seed(seed)
    return CausalTransformer(cfg, LATENT).eval()


def offline_reference(
    model: CausalTransformer, latents: torch.Tensor, visions: torch.Tensor, guidance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stream's episode ([N, latent], [N, d]) -> (h_a [N, d], h_v [N, d]) by full offline recomputes."""
    n = latents.shape[0]
    is_first = torch.arange(n) == 0
    prev = torch.cat((torch.zeros(1, LATENT), latents[:-1]))
    seq = interleave(model.audio_token(prev, is_first)[None], visions[None])
    cond = model.forward_offline(seq)[0]
    h_a, h_c = cond[0::2], cond[1::2]
    # frame i's null query sees the real prefix up to its audio slot, then itself in the vision slot
    h_n = torch.stack(
        [
            model.forward_offline(torch.cat((seq[:, : 2 * i + 1], model.null[None, None]), dim=1))[0, -1]
            for i in range(n)
        ]
    )
    return h_a, h_n + guidance * (h_c - h_n)


@pytest.mark.parametrize("window, train_context", [(16, 16), (24, 16)])  # plain RoPE, and NTK-scaled RoPE
@torch.no_grad()
def test_streaming_matches_offline(window: int, train_context: int) -> None:
    cfg = dataclasses.replace(tiny().transformer, window=window, train_context=train_context)
    model = make_model(cfg)
    steps, reset_at = 40, 12  # stream 1 runs 80 tokens (ring wraps 3-5 times); stream 0 restarts at step 12
    guidance = torch.tensor([3.0, 1.5])
    latents = torch.randn(2, steps, LATENT)
    visions = torch.randn(2, steps, cfg.d_model)

    cache = KVCache(cfg, batch=2)
    frame = torch.zeros(2, dtype=torch.long)
    h_a, h_v = torch.zeros(2, steps, cfg.d_model), torch.zeros(2, steps, cfg.d_model)
    for step in range(steps):
        if step == reset_at:
            cache.reset(torch.tensor([0]))
            frame[0] = 0
        prev = latents[:, step - 1] if step else torch.zeros(2, LATENT)
        h_a[:, step] = model.audio_step(prev, frame == 0, cache, audio_position(frame))
        h_v[:, step] = model.vision_step(visions[:, step], cache, vision_position(frame), guidance)
        frame += 1

    episodes = [(0, 0, reset_at), (0, reset_at, steps), (1, 0, steps)]  # (stream, first step, end step)
    for stream, begin, end in episodes:
        ref_a, ref_v = offline_reference(
            model, latents[stream, begin:end], visions[stream, begin:end], guidance[stream].item()
        )
        torch.testing.assert_close(h_a[stream, begin:end], ref_a, atol=STATE_TOL, rtol=0)
        torch.testing.assert_close(h_v[stream, begin:end], ref_v, atol=GUIDED_TOL, rtol=0)


def warm_cache(model: CausalTransformer, frames: int) -> tuple[KVCache, torch.Tensor]:
    """A two-stream cache after `frames` frames (stream 1 three frames ahead), and the next frame indices."""
    cache = KVCache(model.cfg, batch=2)
    frame = torch.tensor([0, 3])
    for _ in range(frames):
        model.audio_step(torch.randn(2, LATENT), frame == 0, cache, audio_position(frame))
        model.vision_step(torch.randn(2, model.cfg.d_model), cache, vision_position(frame), 3.0)
        frame = frame + 1
    return cache, frame


@torch.no_grad()
def test_guided_step_writes_only_the_conditional_token() -> None:
    model = make_model(tiny().transformer)
    cache, frame = warm_cache(model, frames=11)
    pos = vision_position(frame)
    v = torch.randn(2, model.cfg.d_model)

    guided, plain = KVCache(model.cfg, 2), KVCache(model.cfg, 2)
    for c in (guided, plain):
        c.k.copy_(cache.k)
        c.v.copy_(cache.v)
    model.vision_step(v, guided, pos, 3.0)
    model.step(v[:, None], plain, pos)  # unguided conditional step: only v ever exists

    # same K/V up to GEMM rounding (a batch of 2 tokens against 1), through every layer below the last
    depth = 2 * model.cfg.n_layers
    torch.testing.assert_close(guided.k, plain.k, atol=rounding_atol(plain.k, depth), rtol=0)
    torch.testing.assert_close(guided.v, plain.v, atol=rounding_atol(plain.v, depth), rtol=0)
    # every slot other than pos mod W is bitwise untouched, so the null query wrote nowhere
    slot = torch.remainder(pos, model.cfg.window)
    untouched = torch.ones(2, model.cfg.window, dtype=torch.bool)
    untouched[torch.arange(2), slot] = False
    for buf_after, buf_before in ((guided.k, cache.k), (guided.v, cache.v)):
        after, before = buf_after.transpose(2, 3), buf_before.transpose(2, 3)  # [L, B, W, Hkv, D]
        assert torch.equal(after[:, untouched], before[:, untouched])
    # and the written slot holds v's key, not the null token's
    layer0 = model.layers[0]
    head_k = layer0.attention.wqkv(layer0.attention_norm(model.null)).split(
        (model.cfg.d_model, model.cfg.d_model, model.cfg.d_model)
    )[1]
    null_k = head_k.view(model.cfg.n_heads, model.cfg.head_dim)
    for b in range(2):
        assert not torch.allclose(guided.k[0, b, :, slot[b]], null_k, atol=1e-3)


@torch.no_grad()
def test_guidance_weights_select_conditional_and_null() -> None:
    model = make_model(tiny().transformer)
    cache, frame = warm_cache(model, frames=5)
    pos = vision_position(frame)
    v = torch.randn(2, model.cfg.d_model)
    both = model.step(torch.stack((v, model.null.expand_as(v)), dim=1), cache, pos)
    torch.testing.assert_close(model.vision_step(v, cache, pos, 0.0), both[:, 1], atol=0, rtol=0)
    atol = rounding_atol(both, 2 * model.cfg.n_layers)  # h_n + 1 (h_c - h_n) rounds where h_c does not
    torch.testing.assert_close(model.vision_step(v, cache, pos, 1.0), both[:, 0], atol=atol, rtol=0)
    per_stream = model.vision_step(v, cache, pos, torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(per_stream[0], both[0, 1], atol=0, rtol=0)
    torch.testing.assert_close(
        per_stream[1], both[1, 1] + 2.0 * (both[1, 0] - both[1, 1]), atol=2 * atol, rtol=0
    )


@pytest.mark.parametrize("window, scaled", [(16, False), (32, True)])
def test_ntk_rope_base(window: int, scaled: bool) -> None:
    cfg = dataclasses.replace(tiny().transformer, window=window, train_context=16)
    head_dim = cfg.head_dim
    expected_base = 10_000.0 * (window / 16) ** (head_dim / (head_dim - 2)) if scaled else 10_000.0
    assert cfg.effective_rope_base == pytest.approx(expected_base, rel=1e-12)
    assert (cfg.effective_rope_base != cfg.rope_base) == scaled
    model = make_model(cfg)
    cos, sin = attention.rope_tables(head_dim, window, expected_base)
    assert model.rope_cos.shape == (window, head_dim // 2)
    torch.testing.assert_close(model.rope_cos, cos, atol=0, rtol=0)
    torch.testing.assert_close(model.rope_sin, sin, atol=0, rtol=0)
    assert "rope_cos" not in model.state_dict()  # derived from the config, never stored


@torch.no_grad()
def test_attention_hook_is_used_for_every_layer() -> None:
    model = make_model(tiny().transformer)
    cache, frame = warm_cache(model, frames=3)
    tokens, pos = torch.randn(2, 2, model.cfg.d_model), vision_position(frame)
    reference = model.step(tokens, cache, pos)
    calls = []

    def counting(*args: torch.Tensor) -> torch.Tensor:
        calls.append(args[0].shape)
        return attention.cached_attention(*args)

    model.attention_fn = counting
    torch.testing.assert_close(model.step(tokens, cache, pos), reference, atol=0, rtol=0)
    assert len(calls) == model.cfg.n_layers


@torch.no_grad()
def test_grouped_query_attention_streams_like_offline() -> None:
    cfg = dataclasses.replace(tiny().transformer, n_kv_heads=2)
    model = make_model(cfg)
    assert model.layers[0].attention.wqkv.out_features == (4 + 2 * 2) * cfg.head_dim
    tokens = torch.randn(1, 24, cfg.d_model)
    cache = KVCache(cfg, batch=1)
    assert cache.k.shape == (cfg.n_layers, 1, 2, cfg.window, cfg.head_dim)
    streamed = torch.cat(
        [model.step(tokens[:, t : t + 1], cache, torch.tensor([t])) for t in range(24)], dim=1
    )
    torch.testing.assert_close(streamed, model.forward_offline(tokens), atol=STATE_TOL, rtol=0)


def test_fused_feed_forwards_step_the_same() -> None:
    cfg = tiny().transformer
    model = make_model(cfg, seed=6)
    fused = make_model(cfg, seed=6)
    fuse_feed_forwards(fused)
    assert not any(isinstance(m, FeedForward) for m in fused.modules())
    caches = [KVCache(cfg, 2), KVCache(cfg, 2)]
    tokens = torch.randn(2, 1, cfg.d_model, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for frame in range(3):
            pos = torch.full((2,), 2 * frame)
            out, fused_out = (
                m.step(tokens + frame, c, pos) for m, c in zip((model, fused), caches, strict=True)
            )
            torch.testing.assert_close(fused_out, out, rtol=0, atol=1e-5)  # the same sums, one matmul
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=0, atol=1e-5)


def test_cache_reset_clears_only_given_slots() -> None:
    cache = KVCache(tiny().transformer, batch=3)
    cache.k.normal_()
    cache.v.normal_()
    kept_k, kept_v = cache.k[:, [0, 2]].clone(), cache.v[:, [0, 2]].clone()
    cache.reset(torch.tensor([1]))
    assert not cache.k[:, 1].any() and not cache.v[:, 1].any()
    assert torch.equal(cache.k[:, [0, 2]], kept_k) and torch.equal(cache.v[:, [0, 2]], kept_v)
    cache.reset()
    assert not cache.k.any() and not cache.v.any()
    assert not dict(cache.state_dict())  # runtime state, never saved with the weights


def test_bad_inputs_raise_clear_errors() -> None:
    cfg = tiny().transformer
    model = make_model(cfg)
    cache = KVCache(cfg, batch=2)
    with pytest.raises(TypeError, match="int64"):
        model.step(torch.randn(2, 1, cfg.d_model), cache, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="tokens must be"):
        model.step(torch.randn(2, 1, cfg.d_model + 1), cache, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="KVCache"):
        model.step(torch.randn(3, 1, cfg.d_model), cache, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="bool"):
        model.audio_step(torch.randn(2, LATENT), torch.tensor([1, 0]), cache, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="n_kv_heads"):
        CausalTransformer(dataclasses.replace(cfg, n_kv_heads=3), LATENT)


def test_step_runs_under_autograd() -> None:
    model = make_model(tiny().transformer)
    cache = KVCache(model.cfg, batch=2)
    h = model.audio_step(torch.randn(2, LATENT), torch.tensor([True, False]), cache, torch.tensor([0, 4]))
    h.sum().backward()  # in-place cache writes must not break autograd (fine-tuning, gradient checks)
    assert model.start.grad is not None and model.latent_in.weight.grad is not None
