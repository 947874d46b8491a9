"""Residual add fused with RMSNorm (Triton): one read of x and residual, one write of each result.

Matches `transformer.RMSNorm` applied to `x + residual`: the sum is rounded to the input dtype, normalised in
fp32, rounded again, then scaled by the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, hidden_ptr, dim, eps,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64) * dim
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row + cols, mask=mask, other=0.0)
    residual = tl.load(residual_ptr + row + cols, mask=mask, other=0.0)
    hidden = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
    tl.store(hidden_ptr + row + cols, hidden, mask=mask)
    hidden = hidden.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hidden * hidden, axis=0) / dim + eps)
    normed = (hidden * rstd).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def num_warps(block: int) -> int:
    """About 8 elements per thread, 1 to 16 warps."""
    return min(16, max(1, block // 256))


def add_rmsnorm_reference(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual) * weight, x + residual) in torch, as the transformer computes it."""
    hidden = x + residual
    return F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=eps).to(hidden.dtype) * weight, hidden


def add_rmsnorm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Fused `add_rmsnorm_reference`: x, residual [..., dim], weight [dim] -> (normed, x + residual).

    The output has the dtype torch would promote x and weight to; the new residual has x's dtype.
    """
    dim = x.shape[-1]
    if residual.shape != x.shape or weight.shape != (dim,):
        raise ValueError(
            f"x and residual must have one shape and weight [dim]; got {tuple(x.shape)}, "
            f"{tuple(residual.shape)}, {tuple(weight.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES or residual.dtype != x.dtype or weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"x and residual must share a dtype in {SUPPORTED_DTYPES} and weight be one of them; got "
            f"{x.dtype}, {residual.dtype}, {weight.dtype}"
        )
    if not (x.device == residual.device == weight.device):
        raise ValueError(f"inputs must be on one device, got {x.device}, {residual.device}, {weight.device}")
    x_rows, residual_rows = x.reshape(-1, dim).contiguous(), residual.reshape(-1, dim).contiguous()
    hidden = torch.empty_like(x_rows)
    out = torch.empty(x_rows.shape, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    block = triton.next_power_of_2(dim)
    _add_rmsnorm_kernel[(x_rows.shape[0],)](
        x_rows, residual_rows, weight.contiguous(), out, hidden, dim, eps,
        BLOCK=block, num_warps=num_warps(block),
    )  # fmt: skip
    return out.view(x.shape), hidden.view(x.shape)
