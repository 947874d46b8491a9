"""Sliding-window attention over a ring-buffer KV cache with bounded RoPE positions.

This is the reference semantics that every backend reproduces (the Triton kernel, ONNX graphs, TensorRT).

The cache holds keys *before* RoPE. Slot ``s`` of a ring of ``W`` slots holds the newest absolute position
``a = s (mod W)``. A step at absolute position ``p`` with queries ``q_0..q_{Q-1}`` works as follows:

* every query sees the ``W - 1`` previous positions ``p-W+1 .. p-1`` that exist (``>= 0``) plus its own key,
  so a query's window is ``W`` tokens, the same as an offline causal mask of width ``W``;
* only query 0's K/V are written (at slot ``p mod W``); the others (the guidance null token) never enter the
  cache and see the prefix plus themselves;
* RoPE is applied at read time with window-relative positions: a cache key at absolute ``a`` gets
  ``a - (p - W + 1)`` in ``[0, W-2]`` and the step's own tokens get ``W - 1``. Scores depend only on position
  differences, so this equals absolute-position RoPE while sin/cos never see a position past ``W``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rope_tables(head_dim: int, length: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin of shape [length, head_dim // 2] for positions 0..length-1 (half-split convention)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., i], x[..., i + D/2]) by the given angles; cos/sin broadcast to [..., D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def cache_positions(pos: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Window-relative RoPE position of every ring slot and whether the slot is visible at step ``pos``.

    pos: [B] int64 absolute position of the step. Returns (relative [B, W] int64 clamped to >= 0, valid [B, W]).
    """
    slots = torch.arange(window, device=pos.device)
    age = torch.remainder(pos[:, None] - 1 - slots[None, :], window)  # 0 for the newest cached token
    absolute = pos[:, None] - 1 - age
    relative = window - 2 - age
    valid = (absolute >= 0) & (relative >= 0)
    return relative.clamp(min=0), valid


def write_cache(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> None:
    """In place: store one token's K/V ([B, Hkv, D]) at slot ``pos mod W`` of each stream's ring ([B, Hkv, W, D])."""
    window = k_cache.shape[2]
    batch = torch.arange(k_cache.shape[0], device=k_cache.device)
    slot = torch.remainder(pos, window)
    k_cache[batch, :, slot] = k.to(k_cache.dtype)
    v_cache[batch, :, slot] = v.to(v_cache.dtype)


def window_attention(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor,
    cos: Tensor,
    sin: Tensor,
) -> Tensor:
    """Attention of this step's queries over the cached window plus each query's own K/V.

    q: [B, Q, H, D]; k_self, v_self: [B, Q, Hkv, D] (pre-RoPE); caches: [B, Hkv, W, D] (pre-RoPE);
    pos: [B] int64; cos, sin: [W, D/2] tables. Returns [B, Q, H, D]. The cache is only read: slot ``pos mod W``
    is masked, so calling this before or after ``write_cache`` for the same step gives the same result.
    """
    n_heads, head_dim = q.shape[2], q.shape[3]
    window, n_kv = k_cache.shape[2], k_cache.shape[1]
    group = n_heads // n_kv
    relative, valid = cache_positions(pos, window)

    q_rot = apply_rope(q, cos[window - 1], sin[window - 1]).float()
    k_self_rot = apply_rope(k_self, cos[window - 1], sin[window - 1]).float()
    k_rot = apply_rope(k_cache, cos[relative][:, None], sin[relative][:, None]).float()  # [B, Hkv, W, D]

    k_rot = k_rot.repeat_interleave(group, dim=1)  # [B, H, W, D]
    v_all = v_cache.float().repeat_interleave(group, dim=1)
    k_self_rot = k_self_rot.repeat_interleave(group, dim=2)  # [B, Q, H, D]
    v_self = v_self.float().repeat_interleave(group, dim=2)

    scale = 1.0 / math.sqrt(head_dim)
    scores_cache = torch.einsum("bqhd,bhwd->bqhw", q_rot, k_rot) * scale
    scores_cache = scores_cache.masked_fill(~valid[:, None, None, :], float("-inf"))
    score_self = (q_rot * k_self_rot).sum(-1, keepdim=True) * scale  # [B, Q, H, 1]
    probs = torch.softmax(torch.cat((scores_cache, score_self), dim=-1), dim=-1)
    out = torch.einsum("bqhw,bhwd->bqhd", probs[..., :window], v_all) + probs[..., window:] * v_self
    return out.to(q.dtype)


def cached_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor,
    cos: Tensor,
    sin: Tensor,
) -> Tensor:
    """One transformer step's attention: write query 0's K/V into the ring, attend every query.

    The unit a fused kernel replaces (soundreactor.triton_kernels.decode_attention has this signature).
    """
    write_cache(k_cache, v_cache, k[:, 0], v[:, 0], pos)
    return window_attention(q, k, v, k_cache, v_cache, pos, cos, sin)


def causal_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Offline attention over a whole sequence: token t sees t-window+1..t. q: [B, T, H, D], k/v: [B, T, Hkv, D]
    already rotated with absolute positions. Used by the cache-free offline reference."""
    length = q.shape[1]
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    t = torch.arange(length, device=q.device)
    allowed = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), attn_mask=allowed
    )
    return out.transpose(1, 2).to(q.dtype)


def guidance_training_mask(length: int, null_positions: Tensor, window: int) -> Tensor:
    """Which key each query may see when a sequence of `length` tokens is followed by M guidance null queries.

    Returns bool [length + M, length + M] (query, key). Sequence token t sees sequence tokens t-W+1..t, as in
    `causal_window_attention`. Null query m, standing at position p_m = null_positions[m], sees the W-1 sequence
    tokens before p_m plus itself: exactly what the streaming step gives the null query, whose K/V never enter
    the cache. No query ever sees a null key, so training matches the cache rule of SPEC 1 step 3.
    """
    device = null_positions.device
    t = torch.arange(length, device=device)
    seq_seq = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    p = null_positions[:, None]
    null_seq = (t[None, :] < p) & (t[None, :] > p - window)
    n = null_positions.shape[0]
    top = torch.cat((seq_seq, torch.zeros(length, n, dtype=torch.bool, device=device)), dim=1)
    bottom = torch.cat((null_seq, torch.eye(n, dtype=torch.bool, device=device)), dim=1)
    return torch.cat((top, bottom), dim=0)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """SDPA under a boolean mask [Tq, Tk] (True = may attend). q: [B, Tq, H, D], k/v: [B, Tk, Hkv, D], rotated."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)
