"""The fused Snake activation against the torch path it replaces, run by the Triton interpreter on CPU tensors.

Its sm_90 compile is checked with the other kernels in test_triton_kernels.py; on a GPU the frame-level test
in test_cuda_graph_backend.py compares whole frames with and without the kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soundreactor.model.vae import FoldedSnakeBeta, SnakeBeta

triton = pytest.importorskip("triton")

from soundreactor.triton_kernels import snake as snake_kernel  # noqa: E402

pytestmark = pytest.mark.skipif(
    type(snake_kernel._snake_kernel).__name__ != "InterpretedFunction",
    reason="the kernel was defined without TRITON_INTERPRET=1 (tests/conftest.py sets it), so it cannot run "
    "on CPU tensors",
)
# one rounding of an fp32 result to the dtype, relative to the output's magnitude
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def folded_snake(channels: int, seed: int = 0) -> FoldedSnakeBeta:
    snake = SnakeBeta(channels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        snake.alpha.copy_(torch.randn(channels, generator=gen) * 0.5)
        snake.beta.copy_(torch.randn(channels, generator=gen) * 0.5)
    return FoldedSnakeBeta(snake)


# the paper decoder's shapes for one frame (channels, samples), plus odd ones that leave partial tiles
@pytest.mark.parametrize(
    ("batch", "channels", "length"),
    [(1, 2048, 1), (1, 1024, 8), (2, 512, 40), (1, 256, 200), (1, 128, 1600), (3, 5, 3000), (1, 3, 7)],
)
def test_matches_the_torch_path_in_fp32(batch, channels, length):
    snake = folded_snake(channels)
    x = torch.randn(batch, channels, length, generator=torch.Generator().manual_seed(1)) * 3
    expected = snake(x)
    out = snake_kernel.snake_beta(x, snake.alpha_exp, snake.inv_beta)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-6)
    assert (expected - x).abs().max() > 0.1  # the activation does something


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rounds_once(dtype):
    snake = folded_snake(96, seed=2)
    x = (torch.randn(2, 96, 200, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    exact = snake(x.float())  # fp32 math on the same half-precision input
    out = snake_kernel.snake_beta(x, snake.alpha_exp, snake.inv_beta)
    assert out.dtype == dtype
    error = (out.float() - exact).abs().max() / exact.abs().max()
    assert error < TOLERANCE[dtype], error
    torch_path = snake.to(dtype)(x)  # rounds after every one of its four kernels
    torch_error = (torch_path.float() - exact).abs().max() / exact.abs().max()
    assert error <= torch_error


def test_the_module_hook_routes_through_the_kernel():
    snake = folded_snake(16)
    x = torch.randn(2, 16, 40)
    expected = snake(x)
    calls = []

    def fused(*args):
        calls.append(args[0].shape)
        return snake_kernel.snake_beta(*args)

    snake.fused = fused
    torch.testing.assert_close(
        snake(x[..., ::2]), expected[..., ::2], atol=1e-5, rtol=1e-6
    )  # made contiguous
    assert calls == [torch.Size([2, 16, 20])]


def test_bad_inputs_raise():
    snake = folded_snake(8)
    with pytest.raises(ValueError, match="contiguous"):
        snake_kernel.snake_beta(torch.randn(2, 8, 10)[..., ::2], snake.alpha_exp, snake.inv_beta)
    with pytest.raises(ValueError, match=r"\[B, C, T\]"):
        snake_kernel.snake_beta(torch.randn(8, 10), snake.alpha_exp, snake.inv_beta)
    with pytest.raises(ValueError, match="need 9 values"):
        snake_kernel.snake_beta(torch.randn(1, 9, 10), snake.alpha_exp, snake.inv_beta)
    with pytest.raises(TypeError, match="dtype"):
        snake_kernel.snake_beta(torch.ones(1, 8, 10, dtype=torch.int32), snake.alpha_exp, snake.inv_beta)


@pytest.mark.parametrize("length", [1, 7, 64, 1600, 5000])
def test_tile_shape_covers_the_tile_budget(length):
    block_r, block_t = snake_kernel.tile_shape(length)
    assert block_r * block_t == snake_kernel.TILE
    assert block_t & (block_t - 1) == 0 and block_t >= min(length, snake_kernel.TILE)


def test_bench_dry_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "perf"))  # bench_snake's imports
    bench = pytest.importorskip("bench_snake")
    assert bench.main(["--dry-run", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_snake_dryrun.json").read_text())["rows"]
    assert {(r["method"], r["slots"]) for r in rows} == {(m, s) for m in ("triton", "torch") for s in (1, 2)}
    assert all(r["activations"] == 36 and r["max_rel_error"] < 1e-6 for r in rows)
    assert (tmp_path / "bench_snake_dryrun.md").read_text().startswith("# Snake")
    assert len(bench.snake_shapes("paper", 128)) == 36 and bench.snake_shapes("paper", 128)[-1] == (
        128,
        128,
        1600,
    )
