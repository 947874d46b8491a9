"""The training forward (teacher forcing with guidance null queries) against the streaming steps (tiny, fp32)."""

from __future__ import annotations

import dataclasses

import torch

from soundreactor.config import tiny
from soundreactor.model import attention
from soundreactor.model.transformer import (
    CausalTransformer,
    KVCache,
    audio_position,
    interleave,
    vision_position,
)

LATENT = 8
TOL = 1e-5  # fp32; both sides are exact algebra over the same weights, differences are rounding (~1e-6)


def make_model(window: int = 16) -> CausalTransformer:
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny().transformer, window=window)
    return CausalTransformer(cfg, LATENT).eval()


@torch.no_grad()
def test_forward_train_equals_streaming_steps() -> None:
    model = make_model()
    frames = 13  # 26 tokens over a 16-token window: the ring wraps, the sliding window is exercised
    latents, visions = torch.randn(2, frames, LATENT), torch.randn(2, frames, model.cfg.d_model)
    is_first = (torch.arange(frames) == 0).expand(2, -1)
    prev = torch.cat((torch.zeros(2, 1, LATENT), latents[:, :-1]), dim=1)
    audio = model.audio_token(prev.reshape(-1, LATENT), is_first.reshape(-1)).view(2, frames, -1)
    hidden, null_hidden = model.forward_train(
        interleave(audio, visions), vision_position(torch.arange(frames))
    )

    cache = KVCache(model.cfg, batch=2)
    for i in range(frames):
        pos = torch.full((2,), i, dtype=torch.long)
        h_a = model.step(audio[:, i : i + 1], cache, audio_position(pos))[:, 0]
        cond_null = model.step(
            torch.stack((visions[:, i], model.null.expand(2, -1)), dim=1), cache, vision_position(pos)
        )
        torch.testing.assert_close(hidden[:, 2 * i], h_a, atol=TOL, rtol=0)
        torch.testing.assert_close(hidden[:, 2 * i + 1], cond_null[:, 0], atol=TOL, rtol=0)
        torch.testing.assert_close(null_hidden[:, i], cond_null[:, 1], atol=TOL, rtol=0)


def test_no_position_attends_to_a_null_query() -> None:
    """Gradient of every sequence output w.r.t. the null queries' inputs is exactly zero, and the mask agrees."""
    model = make_model()
    frames = 6
    tokens = torch.randn(1, 2 * frames, model.cfg.d_model)
    hidden, null_hidden = model.forward_train(tokens, vision_position(torch.arange(frames)))
    (grad,) = torch.autograd.grad(hidden.square().sum(), model.null, retain_graph=True)
    assert torch.count_nonzero(grad) == 0, "a sequence position depends on a null query"
    (grad_null,) = torch.autograd.grad(null_hidden.square().sum(), model.null)
    assert torch.count_nonzero(grad_null) > 0  # the null queries themselves do use it

    mask = attention.guidance_training_mask(2 * frames, vision_position(torch.arange(frames)), 16)
    assert not mask[: 2 * frames, 2 * frames :].any(), "a sequence token sees a null query"
    assert torch.equal(mask[2 * frames :, 2 * frames :], torch.eye(frames, dtype=torch.bool))


def test_null_query_depends_only_on_its_prefix() -> None:
    """Changing the token in a vision slot changes no null query at or before that slot (null sees W-1 before)."""
    model = make_model()
    frames = 5
    tokens = torch.randn(1, 2 * frames, model.cfg.d_model)
    nulls = vision_position(torch.arange(frames))
    _, before = model.forward_train(tokens, nulls)
    tokens[:, vision_position(2)] += 1.0
    _, after = model.forward_train(tokens, nulls)
    torch.testing.assert_close(after[:, :3], before[:, :3], atol=0, rtol=0)
    assert (after[:, 3:] - before[:, 3:]).abs().amax() > 1e-3
