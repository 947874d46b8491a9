"""Triton kernels for the per-frame step on CUDA; the model modules stay the reference and the CPU path.

Set SOUNDREACTOR_TRITON=0 to turn the kernels off. Triton is imported only by the kernel modules and by
`kernels_enabled` on a CUDA device, so `import soundreactor` works where triton is missing.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

SWITCH = "SOUNDREACTOR_TRITON"


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_enabled(device: torch.device | str) -> bool:
    """True on CUDA devices when triton imports, SOUNDREACTOR_TRITON is not 0/false/off/no, and the
    Triton interpreter is off."""
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    if (
        os.environ.get("TRITON_INTERPRET") == "1"
    ):  # interpreted kernels take CPU tensors and can't be captured
        return False
    return torch.device(device).type == "cuda" and _triton_importable()


def attention_for(device: torch.device | str) -> Callable[..., torch.Tensor]:
    """The cached-attention step to use on `device`: the fused kernel where enabled, else the torch reference."""
    if kernels_enabled(device):
        from soundreactor.triton_kernels.decode_attention import decode_attention

        return decode_attention
    from soundreactor.model.attention import cached_attention

    return cached_attention
