"""Causal LLaMA-style transformer over the interleaved sequence S, v1, x1, v2, x2, ... (SPEC 1, 2.4).

Frame i (0-based) owns two positions: its audio slot (S for frame 0, else x_(i-1)) at 2i and its vision token
v_i at 2i+1. Streaming runs one slot at a time over a ring-buffer KV cache (`attention.window_attention`);
`forward_offline` recomputes a whole sequence without a cache and is the independent reference for streaming.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soundreactor.config import TransformerConfig
from soundreactor.model import attention

# q, k, v, k_cache, v_cache, pos, cos, sin -> out: write query 0's K/V, attend (`attention.cached_attention`),
# so a runtime can swap in a fused kernel by setting `CausalTransformer.attention_fn`.
AttentionFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
# q, k, v ([B, Q, H|Hkv, D], pre-RoPE) -> [B, Q, H, D]: how one layer attends (cached step or offline).
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


def kv_heads(cfg: TransformerConfig) -> int:
    return cfg.n_kv_heads or cfg.n_heads


def audio_position(frame: int | Tensor) -> int | Tensor:
    """Position of frame i's audio-slot token (S or x_(i-1))."""
    return 2 * frame


def vision_position(frame: int | Tensor) -> int | Tensor:
    """Position of frame i's vision token v_i."""
    return 2 * frame + 1


def interleave(audio_tokens: Tensor, vision_tokens: Tensor) -> Tensor:
    """Audio-slot and vision tokens [B, N, d] -> [B, 2N, d] in stream order a0, v0, a1, v1, ..."""
    if audio_tokens.shape != vision_tokens.shape:
        raise ValueError(
            f"audio {tuple(audio_tokens.shape)} and vision {tuple(vision_tokens.shape)} must match"
        )
    batch, frames, width = audio_tokens.shape
    return torch.stack((audio_tokens, vision_tokens), dim=2).reshape(batch, 2 * frames, width)


class KVCache(nn.Module):
    """Per-layer ring buffers of pre-RoPE keys and values, [n_layers, batch, n_kv_heads, window, head_dim]."""

    def __init__(
        self,
        cfg: TransformerConfig,
        batch: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        shape = (cfg.n_layers, batch, kv_heads(cfg), cfg.window, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def reset(self, slots: Tensor | None = None) -> None:
        """Zero every stream, or only the given stream indices (stale entries are masked by position too)."""
        if slots is None:
            self.k.zero_()
            self.v.zero_()
        else:
            self.k.index_fill_(1, slots, 0.0)
            self.v.index_fill_(1, slots, 0.0)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # One call, weight included: statistics and the scaling run in fp32 with a single rounding to x's dtype,
        # and CUDA runs it as one fused kernel (casting around it would add three launches per norm).
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, kv_heads(cfg), cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, attend: Attend) -> Tensor:
        batch, length, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q, k, v = self.wqkv(x).split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(batch, length, self.n_heads, self.head_dim)
        k = k.view(batch, length, self.n_kv, self.head_dim)
        v = v.view(batch, length, self.n_kv, self.head_dim)
        return self.wo(attend(q, k, v).reshape(batch, length, q_size))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class FusedFeedForward(nn.Module):
    """A FeedForward for inference copies: w1 and w3 stacked into one projection (one matmul launch, not two)."""

    def __init__(self, ffn: FeedForward) -> None:
        super().__init__()
        weight = ffn.w1.weight
        hidden, width = weight.shape
        self.w13 = nn.Linear(width, 2 * hidden, bias=False, device=weight.device, dtype=weight.dtype)
        self.w2 = ffn.w2
        with torch.no_grad():
            self.w13.weight.copy_(torch.cat((ffn.w1.weight, ffn.w3.weight)))

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def fuse_feed_forwards(module: nn.Module) -> None:
    """Replace, in place, every transformer block's FeedForward by its FusedFeedForward."""
    for block in module.modules():
        if isinstance(block, Block) and isinstance(block.feed_forward, FeedForward):
            block.feed_forward = FusedFeedForward(block.feed_forward)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, attend: Attend) -> Tensor:
        x = x + self.attention(self.attention_norm(x), attend)
        return x + self.feed_forward(self.ffn_norm(x))


class CausalTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, latent_dim: int) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads or cfg.n_heads % kv_heads(cfg) or cfg.head_dim % 2:
            raise ValueError(
                f"need d_model ({cfg.d_model}) divisible by n_heads ({cfg.n_heads}) into an even head_dim, "
                f"and n_heads divisible by n_kv_heads ({kv_heads(cfg)})"
            )
        self.cfg = cfg
        self.latent_in = nn.Linear(latent_dim, cfg.d_model)
        self.start = nn.Parameter(torch.randn(cfg.d_model) * 0.02)  # the learned S token
        self.null = nn.Parameter(torch.randn(cfg.d_model) * 0.02)  # guidance null vision token
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        cos, sin = attention.rope_tables(cfg.head_dim, cfg.window, cfg.effective_rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.attention_fn: AttentionFn = attention.cached_attention

    def audio_token(self, prev_latent: Tensor, is_first: Tensor) -> Tensor:
        """S where a stream is at its first frame, else latent_in(prev_latent). [B, latent] -> [B, d]."""
        if is_first.dtype != torch.bool:
            raise TypeError(f"is_first must be a bool tensor [B], got {is_first.dtype}")
        return torch.where(is_first[:, None], self.start, self.latent_in(prev_latent))

    def step(self, tokens: Tensor, cache: KVCache, pos: Tensor) -> Tensor:
        """Run queries [B, Q, d] at position pos [B] over the cache; only query 0's K/V are written."""
        self._check_step(tokens, cache, pos)
        hidden = tokens
        for i, layer in enumerate(self.layers):
            # index, don't iterate: unbind's multi-output views refuse in-place writes under autograd
            hidden = layer(
                hidden, partial(self._attend_cached, k_cache=cache.k[i], v_cache=cache.v[i], pos=pos)
            )
        return self.norm(hidden)

    def audio_step(self, prev_latent: Tensor, is_first: Tensor, cache: KVCache, pos: Tensor) -> Tensor:
        """Audio slot of a frame: the token S or latent_in(x_(i-1)) written at pos. Returns h_a [B, d]."""
        return self.step(self.audio_token(prev_latent, is_first)[:, None], cache, pos)[:, 0]

    def vision_step(self, v: Tensor, cache: KVCache, pos: Tensor, guidance: float | Tensor) -> Tensor:
        """Vision slot with CFG in hidden space: queries [v, null] at pos, only v's K/V written.

        guidance: a float or a per-stream tensor [B]. Returns h_v = h_n + w * (h_c - h_n), [B, d].
        """
        tokens = torch.stack((v, self.null.expand_as(v)), dim=1)
        hidden = self.step(tokens, cache, pos)
        cond, null = hidden[:, 0], hidden[:, 1]
        if isinstance(guidance, Tensor) and guidance.dim() == 1:
            guidance = guidance[:, None]
        return null + guidance * (cond - null)

    def forward_offline(self, tokens: Tensor) -> Tensor:
        """Cache-free recompute of a sequence [B, T, d] at absolute positions 0..T-1 under the window mask."""
        cos, sin = attention.rope_tables(self.cfg.head_dim, tokens.shape[1], self.cfg.effective_rope_base)
        cos, sin = cos.to(tokens.device)[:, None], sin.to(tokens.device)[:, None]  # [T, 1, D/2]
        hidden = tokens
        for layer in self.layers:
            hidden = layer(hidden, partial(self._attend_offline, cos=cos, sin=sin))
        return self.norm(hidden)

    def forward_train(self, tokens: Tensor, null_positions: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced training forward: a sequence [B, L, d] plus a guidance null query at each of
        `null_positions` [M] (int64), all in one pass under `attention.guidance_training_mask`.

        Returns (hidden [B, L, d], null_hidden [B, M, d]): the same values the streaming steps give over the
        same tokens (the sliding window, and the null query that sees the prefix and itself and is never cached).
        RoPE uses positions 0..L-1 from the clip start; scores depend only on position differences, so this equals
        the stream's read-time window-relative positions while sin/cos stay bounded by the clip length.
        """
        length = tokens.shape[1]
        positions = torch.cat((torch.arange(length, device=tokens.device), null_positions))
        cos, sin = attention.rope_tables(self.cfg.head_dim, length, self.cfg.effective_rope_base)
        cos, sin = cos.to(tokens.device)[positions, None], sin.to(tokens.device)[positions, None]
        mask = attention.guidance_training_mask(length, null_positions, self.cfg.window)
        nulls = self.null.expand(tokens.shape[0], null_positions.shape[0], -1).to(tokens.dtype)
        hidden = torch.cat((tokens, nulls), dim=1)
        for layer in self.layers:
            hidden = layer(hidden, partial(self._attend_train, cos=cos, sin=sin, mask=mask))
        hidden = self.norm(hidden)
        return hidden[:, :length], hidden[:, length:]

    def _attend_train(
        self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Tensor
    ) -> Tensor:
        q, k = attention.apply_rope(q, cos, sin), attention.apply_rope(k, cos, sin)
        return attention.masked_attention(q, k, v, mask)

    def _attend_cached(
        self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor
    ) -> Tensor:
        return self.attention_fn(q, k, v, k_cache, v_cache, pos, self.rope_cos, self.rope_sin)

    def _attend_offline(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q, k = attention.apply_rope(q, cos, sin), attention.apply_rope(k, cos, sin)
        return attention.causal_window_attention(q, k, v, self.cfg.window)

    def _check_step(self, tokens: Tensor, cache: KVCache, pos: Tensor) -> None:
        # shape and dtype checks only: they are static, so the step stays traceable and graph-capturable
        if tokens.dim() != 3 or tokens.shape[-1] != self.cfg.d_model:
            raise ValueError(f"tokens must be [B, Q, {self.cfg.d_model}], got {tuple(tokens.shape)}")
        if pos.dtype != torch.long or pos.shape != (tokens.shape[0],):
            raise TypeError(
                f"pos must be an int64 tensor [{tokens.shape[0]}], got {pos.dtype} {tuple(pos.shape)}"
            )
        expected = (
            self.cfg.n_layers,
            tokens.shape[0],
            kv_heads(self.cfg),
            self.cfg.window,
            self.cfg.head_dim,
        )
        if tuple(cache.k.shape) != expected:
            raise ValueError(
                f"cache is {tuple(cache.k.shape)}, expected {expected}; build KVCache(cfg, batch)"
            )
