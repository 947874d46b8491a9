"""Decode-step window attention with the ring-cache write fused in: the CUDA path of `window_attention`.

One step of the causal transformer reads each layer's whole window once for a handful of queries, so it is
bound by memory and launch latency. Two launches per layer:

1. `_window_partial_kernel`, grid (B * Hkv, n_splits): each program takes one slice of the ring for one stream
   slot and KV head, applies read-time RoPE to the cached keys and keeps a running softmax (max, sum, weighted
   V) for every query row of the head group (Q queries x H / Hkv heads). Splitting the window (split-K) lets a
   single stream slot fill the GPU.
2. `_merge_kernel`, grid (B * Hkv,): adds each query's own key (RoPE at W - 1), merges the slices by
   log-sum-exp, writes the output and stores query 0's K/V at ring slot pos mod W.

The write sits in the second launch, after every read of the step in stream order, and the first launch never
loads slot pos mod W (the reference masks it), so the write cannot race with the reads. The split plan
depends on shapes only and positions are read on the device from `pos`, so the launches can be captured in a
CUDA graph and replayed at every step.

Products are broadcast multiplies reduced with `tl.sum` rather than `tl.dot`: a program holds at most a few
query rows, below the tensor-core tile, and the interpreter's bf16 `tl.dot` is unreliable.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
TILE_BUDGET = 4096  # elements of the [rows, BLOCK_N, D] product: 95-151 registers on sm_90, no spills
NUM_WARPS = 4  # both kernels; triton 3.6's merge kernel spills at 2 warps


@triton.jit
def _rope(x1, x2, cos, sin):
    """Rotate the half-split pairs in fp32, then round to the input dtype as the torch reference does."""
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    r1 = (x1f * cos - x2f * sin).to(x1.dtype).to(tl.float32)
    r2 = (x2f * cos + x1f * sin).to(x1.dtype).to(tl.float32)
    return r1, r2


@triton.jit
def _load_queries(
    q_ptr, cos_ptr, sin_ptr, b, kvh, stride_qb, stride_qq, stride_qh, stride_rope, qk_scale,
    WINDOW: tl.constexpr, HALF: tl.constexpr, GROUP: tl.constexpr, N_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Rows r = query * GROUP + g of one KV head's group, rotated at W - 1 and pre-scaled for exp2."""
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HALF)
    heads = kvh * GROUP + rows % GROUP
    offsets = b * stride_qb + (rows // GROUP)[:, None] * stride_qq + heads[:, None] * stride_qh
    mask = (rows < N_ROWS)[:, None]
    cos = tl.load(cos_ptr + (WINDOW - 1) * stride_rope + dims).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + (WINDOW - 1) * stride_rope + dims).to(tl.float32)[None, :]
    q1 = tl.load(q_ptr + offsets + dims[None, :], mask=mask, other=0.0)
    q2 = tl.load(q_ptr + offsets + HALF + dims[None, :], mask=mask, other=0.0)
    q1, q2 = _rope(q1, q2, cos, sin)
    return q1 * qk_scale, q2 * qk_scale


@triton.jit
def _window_partial_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, cos_ptr, sin_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr,
    stride_qb, stride_qq, stride_qh,
    stride_kb, stride_kh, stride_kw,
    stride_vb, stride_vh, stride_vw,
    stride_rope, n_kv_heads, n_splits, qk_scale,
    WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, N_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_SIZE: tl.constexpr,
):  # fmt: skip
    """Unnormalised softmax statistics of every query row over ring slots [split, split + 1) * SPLIT_SIZE."""
    HALF: tl.constexpr = HEAD_DIM // 2
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // n_kv_heads
    kvh = bh % n_kv_heads
    q1, q2 = _load_queries(
        q_ptr, cos_ptr, sin_ptr, b, kvh, stride_qb, stride_qq, stride_qh, stride_rope, qk_scale,
        WINDOW, HALF, GROUP, N_ROWS, BLOCK_M,
    )  # fmt: skip

    pos = tl.load(pos_ptr + b).to(tl.int64)
    write_slot = (pos % WINDOW).to(tl.int32)
    # A slot of age a holds position pos - 1 - a; visible when that exists and a <= W - 2 (slot pos mod W,
    # age W - 1, is the one written this step: never loaded).
    max_age = tl.minimum(pos - 1, WINDOW - 2).to(tl.int32)

    half_dims = tl.arange(0, HALF)
    dims = tl.arange(0, HEAD_DIM)
    k_base = k_cache_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_cache_ptr + b * stride_vb + kvh * stride_vh
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for offset in range(0, SPLIT_SIZE, BLOCK_N):
        slots = split * SPLIT_SIZE + offset + tl.arange(0, BLOCK_N)
        age = (write_slot - 1 - slots + WINDOW) % WINDOW
        visible = (slots < WINDOW) & (age <= max_age)
        relative = tl.where(visible, WINDOW - 2 - age, 0)
        cos = tl.load(cos_ptr + relative[:, None] * stride_rope + half_dims[None, :]).to(tl.float32)
        sin = tl.load(sin_ptr + relative[:, None] * stride_rope + half_dims[None, :]).to(tl.float32)
        k_rows = k_base + slots[:, None] * stride_kw
        k1 = tl.load(k_rows + half_dims[None, :], mask=visible[:, None], other=0.0)
        k2 = tl.load(k_rows + HALF + half_dims[None, :], mask=visible[:, None], other=0.0)
        k1, k2 = _rope(k1, k2, cos, sin)
        scores = tl.sum(q1[:, None, :] * k1[None, :, :], axis=2)
        scores += tl.sum(q2[:, None, :] * k2[None, :, :], axis=2)
        scores = tl.where(visible[None, :], scores, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with nothing visible yet stays at 0
        rescale = tl.exp2(row_max - shift)
        probs = tl.exp2(scores - shift[:, None])
        v = tl.load(v_base + slots[:, None] * stride_vw + dims[None, :], mask=visible[:, None], other=0.0)
        acc = acc * rescale[:, None] + tl.sum(probs[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        row_max = new_max

    rows = tl.arange(0, BLOCK_M)
    part = (bh * n_splits + split) * BLOCK_M + rows
    tl.store(part_max_ptr + part, row_max)
    tl.store(part_sum_ptr + part, row_sum)
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc)


@triton.jit
def _merge_kernel(
    q_ptr, k_self_ptr, v_self_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, cos_ptr, sin_ptr,
    part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr,
    stride_qb, stride_qq, stride_qh,
    stride_ksb, stride_ksq, stride_ksh,
    stride_vsb, stride_vsq, stride_vsh,
    stride_kb, stride_kh, stride_kw,
    stride_vb, stride_vh, stride_vw,
    stride_ob, stride_oq, stride_oh,
    stride_rope, n_kv_heads, n_splits, qk_scale,
    WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, N_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Each query's own key plus the window slices, merged by log-sum-exp; then the cache write of query 0."""
    HALF: tl.constexpr = HEAD_DIM // 2
    bh = tl.program_id(0)
    b = bh // n_kv_heads
    kvh = bh % n_kv_heads
    q1, q2 = _load_queries(
        q_ptr, cos_ptr, sin_ptr, b, kvh, stride_qb, stride_qq, stride_qh, stride_rope, qk_scale,
        WINDOW, HALF, GROUP, N_ROWS, BLOCK_M,
    )  # fmt: skip

    rows = tl.arange(0, BLOCK_M)
    query = rows // GROUP
    row_ok = (rows < N_ROWS)[:, None]
    half_dims = tl.arange(0, HALF)
    dims = tl.arange(0, HEAD_DIM)
    cos = tl.load(cos_ptr + (WINDOW - 1) * stride_rope + half_dims).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + (WINDOW - 1) * stride_rope + half_dims).to(tl.float32)[None, :]
    k_rows = k_self_ptr + b * stride_ksb + query[:, None] * stride_ksq + kvh * stride_ksh
    k1 = tl.load(k_rows + half_dims[None, :], mask=row_ok, other=0.0)
    k2 = tl.load(k_rows + HALF + half_dims[None, :], mask=row_ok, other=0.0)
    k1, k2 = _rope(k1, k2, cos, sin)
    v_rows = v_self_ptr + b * stride_vsb + query[:, None] * stride_vsq + kvh * stride_vsh
    # The own key's score starts the merge: it is finite, so every later rescale is well defined.
    row_max = tl.sum(q1 * k1, axis=1) + tl.sum(q2 * k2, axis=1)
    row_sum = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.load(v_rows + dims[None, :], mask=row_ok, other=0.0).to(tl.float32)
    for split in range(0, n_splits):
        part = (bh * n_splits + split) * BLOCK_M + rows
        part_max = tl.load(part_max_ptr + part)
        new_max = tl.maximum(row_max, part_max)
        rescale = tl.exp2(row_max - new_max)
        weight = tl.exp2(part_max - new_max)
        part_acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :])
        acc = acc * rescale[:, None] + part_acc * weight[:, None]
        row_sum = row_sum * rescale + tl.load(part_sum_ptr + part) * weight
        row_max = new_max

    heads = kvh * GROUP + rows % GROUP
    out_rows = out_ptr + b * stride_ob + query[:, None] * stride_oq + heads[:, None] * stride_oh
    out = acc / row_sum[:, None]
    tl.store(out_rows + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok)

    slot = (tl.load(pos_ptr + b).to(tl.int64) % WINDOW).to(tl.int32)
    k_new = tl.load(k_self_ptr + b * stride_ksb + kvh * stride_ksh + dims)
    v_new = tl.load(v_self_ptr + b * stride_vsb + kvh * stride_vsh + dims)
    k_slot = k_cache_ptr + b * stride_kb + kvh * stride_kh + slot * stride_kw
    v_slot = v_cache_ptr + b * stride_vb + kvh * stride_vh + slot * stride_vw
    tl.store(k_slot + dims, k_new.to(k_cache_ptr.dtype.element_ty))
    tl.store(v_slot + dims, v_new.to(v_cache_ptr.dtype.element_ty))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter runs on CPU tensors: plan splits as for an H100 SXM
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_block_n(rows: int, head_dim: int) -> int:
    """Largest slot tile (16..64) whose [rows, BLOCK_N, D] broadcast product fits the register budget."""
    block_m = triton.next_power_of_2(rows)
    return min(64, max(16, TILE_BUDGET // (block_m * head_dim)))


def plan_splits(
    batch_heads: int, window: int, block_n: int, sm_count: int, n_splits: int | None = None
) -> tuple[int, int]:
    """(n_splits, split_size), each split a whole number of BLOCK_N tiles.

    Aims for about two programs per SM over the B * Hkv (stream, KV head) pairs, or at most n_splits if given.
    """
    tiles = triton.cdiv(window, block_n)
    wanted = n_splits or triton.cdiv(2 * sm_count, batch_heads)
    split_size = triton.cdiv(tiles, min(tiles, max(1, wanted))) * block_n
    return triton.cdiv(window, split_size), split_size


def _check_inputs(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor,
    cos: Tensor,
    sin: Tensor,
) -> None:
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(f"expected q [B, Q, H, D] and caches [B, Hkv, W, D], got {q.shape}, {k_cache.shape}")
    batch, n_q, n_heads, head_dim = q.shape
    _, n_kv, window, _ = k_cache.shape
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head dim {head_dim} is not supported by the kernel: use {SUPPORTED_HEAD_DIMS} or torch"
        )
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"n_heads {n_heads} must be a multiple of the cache's n_kv_heads {n_kv}")
    ring, own = (batch, n_kv, window, head_dim), (batch, n_q, n_kv, head_dim)
    if k_cache.shape != ring or v_cache.shape != ring:
        raise ValueError(f"caches must be [B, Hkv, W, D] = {ring}, got {k_cache.shape}, {v_cache.shape}")
    if k_self.shape != own or v_self.shape != own:
        raise ValueError(f"k_self/v_self must be [B, Q, Hkv, D] = {own}, got {k_self.shape}, {v_self.shape}")
    if pos.shape != (batch,) or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"pos must be an int64 tensor of shape [{batch}], got {pos.dtype} {pos.shape}")
    if cos.dim() != 2 or cos.shape[0] < window or cos.shape[1] != head_dim // 2 or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [>= {window}, {head_dim // 2}], got {cos.shape}, {sin.shape}")
    for name, t in dict(q=q, k_self=k_self, v_self=v_self, k_cache=k_cache, v_cache=v_cache).items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the kernel takes {SUPPORTED_DTYPES}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dim; call .contiguous() on it")
    if not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("cos/sin tables must be contiguous; build them with attention.rope_tables")
    devices = {t.device for t in (q, k_self, v_self, k_cache, v_cache, pos, cos, sin)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def decode_attention(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    block_n: int | None = None,
    n_splits: int | None = None,
) -> Tensor:
    """`attention.window_attention` followed by `attention.write_cache` of query 0, in two kernel launches.

    q: [B, Q, H, D]; k_self, v_self: [B, Q, Hkv, D] pre-RoPE; k_cache, v_cache: [B, Hkv, W, D] pre-RoPE
    rings; pos: [B] int64 step positions; cos, sin: [W, D/2] tables from `attention.rope_tables`. Returns
    [B, Q, H, D] in q's dtype. Mutates k_cache/v_cache in place: query 0's K/V go to slot pos mod W of each
    stream's ring (queries 1.., the guidance null token, see the prefix and themselves but are never written).
    block_n (slots per tile, a power of two) and n_splits (an upper bound on window slices) default to a plan
    from the shapes alone, so the launch is CUDA-graph safe.
    """
    _check_inputs(q, k_self, v_self, k_cache, v_cache, pos, cos, sin)
    batch, n_q, n_heads, head_dim = q.shape
    n_kv, window = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    rows = n_q * group
    block_m = triton.next_power_of_2(rows)
    block_n = block_n or default_block_n(rows, head_dim)
    if block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    n_splits, split_size = plan_splits(batch * n_kv, window, block_n, _sm_count(q.device), n_splits)

    part_max = torch.empty(batch * n_kv, n_splits, block_m, device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(batch * n_kv, n_splits, block_m, head_dim, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    qk_scale = LOG2E / math.sqrt(head_dim)
    q_strides = q.stride()[:3]
    k_strides, v_strides = k_cache.stride()[:3], v_cache.stride()[:3]
    shape = dict(WINDOW=window, HEAD_DIM=head_dim, GROUP=group, N_ROWS=rows, BLOCK_M=block_m)

    _window_partial_kernel[(batch * n_kv, n_splits)](
        q, k_cache, v_cache, pos, cos, sin, part_max, part_sum, part_acc,
        *q_strides, *k_strides, *v_strides, cos.stride(0), n_kv, n_splits, qk_scale,
        **shape, BLOCK_N=block_n, SPLIT_SIZE=split_size, num_warps=NUM_WARPS,
    )  # fmt: skip
    _merge_kernel[(batch * n_kv,)](
        q, k_self, v_self, k_cache, v_cache, pos, cos, sin, part_max, part_sum, part_acc, out,
        *q_strides, *k_self.stride()[:3], *v_self.stride()[:3], *k_strides, *v_strides, *out.stride()[:3],
        cos.stride(0), n_kv, n_splits, qk_scale, **shape, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out
