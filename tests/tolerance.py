"""Tolerances for two floating-point computations of one quantity that round differently (another summation
order, a fused or batched kernel, another instruction set: AVX2 and AVX-512 GEMMs block their sums differently),
derived from the dtype and the values' magnitude rather than the digits one machine produced.

Every rounding is off by at most half an ulp, eps/2 relative to the value rounded (the unit roundoff). A result that
passes through `depth` layers (a convolution, a matmul, a norm, an activation) picks up one such error per layer,
relative to that layer's magnitude, and a dot product of length n adds ~sqrt(n) of them with random signs
(Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sections 2.8 and 3.1). ULPS_PER_LAYER covers
reductions of up to a few hundred terms at the typical sqrt(n) growth, and a gain of a few between layers. The
bound stays orders below any real fault (a wrong tap, a missing term), which moves outputs by 1e-3 and more.
"""

from __future__ import annotations

import numpy as np
import torch

ULPS_PER_LAYER = 16


def rounding_atol(
    expected: torch.Tensor | np.ndarray, depth: int = 1, dtype: torch.dtype | None = None
) -> float:
    """Absolute tolerance for `expected` recomputed in another order: depth * ULPS_PER_LAYER * eps * max |expected|.

    `dtype` is the precision the computation ran in (default: `expected`'s own; pass torch.float32 for fp32
    results compared in float64).
    """
    values = torch.as_tensor(np.asarray(expected) if isinstance(expected, np.ndarray) else expected)
    eps = torch.finfo(dtype or values.dtype).eps
    return depth * ULPS_PER_LAYER * eps * float(values.abs().max())


def module_depth(module: torch.nn.Module) -> int:
    """Layers of `module` that each round a sum (linear maps, convolutions, norms): a depth for `rounding_atol`."""
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose1d)
    kinds += (torch.nn.LayerNorm, torch.nn.RMSNorm)
    return max(1, sum(isinstance(m, kinds) for m in module.modules()))


def guidance_gain(guidance: float) -> float:
    """How much guidance in hidden space, h = h_n + w (h_c - h_n) = (1 - w) h_n + w h_c, scales the rounding errors
    of its two branches relative to h: |1 - w| + |w| (1 without guidance, 5 at w = 3, 8 at w = 4.5). Every result
    downstream of a guided step (the head's latent, the decoded audio) carries it on top of `rounding_atol`."""
    return abs(1.0 - guidance) + abs(guidance)
