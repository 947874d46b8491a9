"""uint8 RGB frames -> resized, ImageNet-normalized float images, as two matmuls.

Antialiased bilinear resizing is linear and separable: it equals ``rows @ image @ cols.T`` for fixed matrices.
Those export to ONNX/TensorRT as plain MatMul, where an antialiased Resize has no equivalent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_matrix(in_size: int, out_size: int) -> Tensor:
    """[out_size, in_size] matrix of `F.interpolate(mode="bilinear", antialias=True, align_corners=False)`
    along one axis, read off by resizing each basis vector along the height axis.

    The width axis is kept at 2 -> 2 (a no-op): a width of 1 takes a different code path that is wrong on CPU.
    """
    basis = torch.eye(in_size, dtype=torch.float64).reshape(in_size, 1, in_size, 1).expand(-1, -1, -1, 2)
    resized = F.interpolate(basis, size=(out_size, 2), mode="bilinear", antialias=True, align_corners=False)
    return resized[:, 0, :, 0].T.float().contiguous()


class FramePreprocess(nn.Module):
    """forward(frames uint8 [B, H, W, 3] RGB, H, W = input_hw) -> float [B, 3, out_h, out_w], normalized."""

    def __init__(self, input_hw: tuple[int, int], output_hw: tuple[int, int]):
        super().__init__()
        self.input_hw = tuple(input_hw)
        # Derived from the sizes alone, so kept out of the state dict.
        rows, cols = resize_matrix(input_hw[0], output_hw[0]), resize_matrix(input_hw[1], output_hw[1])
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols_t", cols.T.contiguous(), persistent=False)
        # (x / 255 - mean) / std folded into one scale and shift per channel.
        std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, frames: Tensor) -> Tensor:
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8 RGB [B, H, W, 3], got dtype {frames.dtype}")
        if frames.dim() != 4 or tuple(frames.shape[1:]) != (*self.input_hw, 3):
            raise ValueError(
                f"frames must be [B, {self.input_hw[0]}, {self.input_hw[1]}, 3] (the input size this encoder "
                f"was built for), got {list(frames.shape)}; rebuild it for the new size"
            )
        # Cast before the permute: TensorRT takes uint8 only as a network input feeding a cast.
        images = frames.to(self.rows.dtype).permute(0, 3, 1, 2)
        resized = self.rows @ images @ self.cols_t
        return resized * self.scale + self.shift
