"""Triton kernels against the torch reference, run by the Triton interpreter on CPU tensors: decode attention
here, the Snake activation in test_snake_kernel.py; the sm_90 compile of both here.

tests/conftest.py sets TRITON_INTERPRET=1 before any kernel is defined. The ahead-of-time compile for sm_90
needs the real JIT, so it runs in a subprocess without the interpreter (this file's __main__).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soundreactor.model import attention
from soundreactor.triton_kernels import kernels_enabled

triton = pytest.importorskip("triton")

from soundreactor.triton_kernels import decode_attention as attention_kernel  # noqa: E402
from soundreactor.triton_kernels import snake as snake_kernel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER_WINDOW, PAPER_HEADS, PAPER_HEAD_DIM = 480, 16, 64
H100_SHARED_BYTES = 232_448  # 227 KiB, the most shared memory one block may use on sm_90
# Rounding the output to the dtype dominates: fp32 agrees to float noise, fp16/bf16 to about one ulp near 1.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _under_interpreter() -> bool:
    return type(attention_kernel._window_partial_kernel).__name__ == "InterpretedFunction"


interpreted = pytest.mark.skipif(
    not _under_interpreter(),
    reason="the kernels were defined without TRITON_INTERPRET=1 (tests/conftest.py sets it; another module "
    "imported them first), so they cannot run on CPU tensors",
)


def make_step(batch, n_q, n_heads, n_kv, window, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)
    q = randn(batch, n_q, n_heads, head_dim)
    k_self, v_self = randn(batch, n_q, n_kv, head_dim), randn(batch, n_q, n_kv, head_dim)
    k_cache, v_cache = randn(batch, n_kv, window, head_dim), randn(batch, n_kv, window, head_dim)
    cos, sin = attention.rope_tables(head_dim, window, 10_000.0)
    return q, k_self, v_self, k_cache, v_cache, cos, sin


def reference_step(q, k_self, v_self, k_cache, v_cache, pos, cos, sin):
    """Reference output and the caches after the step, leaving the inputs untouched."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    out = attention.window_attention(q, k_self, v_self, k_cache, v_cache, pos, cos, sin)
    attention.write_cache(k_cache, v_cache, k_self[:, 0], v_self[:, 0], pos)
    return out, k_cache, v_cache


def check_step(q, k_self, v_self, k_cache, v_cache, pos, cos, sin, **plan):
    expected, k_expected, v_expected = reference_step(q, k_self, v_self, k_cache, v_cache, pos, cos, sin)
    out = attention_kernel.decode_attention(q, k_self, v_self, k_cache, v_cache, pos, cos, sin, **plan)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[q.dtype], rtol=0)
    # the write copies values, so the rings must match bit for bit
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_q", [1, 2])
def test_matches_reference_at_every_fill_level(dtype, n_q):
    # slots at different positions: empty, filling, exactly full (W-1 cached), first wrap, wrapped many times
    window = 16
    pos = torch.tensor([0, 5, window - 1, window, 1000 * window + 3])
    step = make_step(len(pos), n_q, 4, 2, window, 16, dtype)  # GQA: 4 heads over 2 KV heads
    check_step(*step[:5], pos, *step[5:])


@interpreted
@pytest.mark.parametrize(("block_n", "n_splits"), [(4, 1), (4, 3), (8, 100), (16, None)])
def test_split_plans_agree(block_n, n_splits):
    # a window that is no multiple of the tile: the last split is ragged
    window = 37
    pos = torch.tensor([20, 12_345])
    step = make_step(len(pos), 2, 2, 1, window, 16, torch.float32, seed=1)
    check_step(*step[:5], pos, *step[5:], block_n=block_n, n_splits=n_splits)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paper_head_dim_with_default_plan(dtype):
    window = 96
    pos = torch.tensor([7 * window + 50])
    step = make_step(1, 2, 2, 2, window, PAPER_HEAD_DIM, dtype, seed=2)
    check_step(*step[:5], pos, *step[5:])


@interpreted
def test_stream_of_steps_keeps_the_ring_in_step():
    # audio slot (Q=1) then guided vision slot (Q=2) per frame, 2.5 windows long, both rings updated in place
    window, n_heads, n_kv, head_dim = 6, 2, 1, 16
    ring = make_step(2, 1, n_heads, n_kv, window, head_dim, torch.float32)[3:5]
    kernel_ring = [t.clone() for t in ring]
    cos, sin = attention.rope_tables(head_dim, window, 10_000.0)
    for position in range(15):
        n_q = 1 + position % 2
        step = make_step(2, n_q, n_heads, n_kv, window, head_dim, torch.float32, seed=position)
        q, k_self, v_self = step[:3]
        pos = torch.tensor([position, position + 4])
        expected = attention.window_attention(q, k_self, v_self, *ring, pos, cos, sin)
        attention.write_cache(*ring, k_self[:, 0], v_self[:, 0], pos)
        out = attention_kernel.decode_attention(q, k_self, v_self, *kernel_ring, pos, cos, sin)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        assert all(torch.equal(a, b) for a, b in zip(kernel_ring, ring, strict=True))


@interpreted
def test_never_reads_hidden_slots():
    # NaN in the slot being written and in never-written slots must not leak: the kernel may not load them
    window = 16
    pos = torch.tensor([3, 2 * window + 9])
    q, k_self, v_self, k_cache, v_cache, cos, sin = make_step(2, 2, 2, 2, window, 16, torch.float32, seed=3)
    # stream 0 cached positions 0..2 at slots 0..2, writes slot 3 now, never wrote the rest; stream 1 writes 9
    hidden = torch.zeros(2, window, dtype=torch.bool)
    hidden[0, 3:] = True
    hidden[1, 9] = True
    k_poisoned = k_cache.masked_fill(hidden[:, None, :, None], float("nan"))
    v_poisoned = v_cache.masked_fill(hidden[:, None, :, None], float("nan"))
    k_clean = k_cache.masked_fill(hidden[:, None, :, None], 0.0)
    v_clean = v_cache.masked_fill(hidden[:, None, :, None], 0.0)
    expected, k_expected, v_expected = reference_step(q, k_self, v_self, k_clean, v_clean, pos, cos, sin)
    out = attention_kernel.decode_attention(q, k_self, v_self, k_poisoned, v_poisoned, pos, cos, sin)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    written = torch.arange(window)[None, :] == (pos % window)[:, None]
    still_hidden = (hidden & ~written)[:, None, :, None]
    assert torch.equal(k_poisoned.isnan(), still_hidden.expand_as(k_poisoned))
    assert torch.equal(k_poisoned.nan_to_num(0.0), k_expected)
    assert torch.equal(v_poisoned.nan_to_num(0.0), v_expected)


@interpreted
def test_strided_views_from_a_fused_projection():
    # the transformer splits one qkv projection into views: the kernel must honour their strides
    batch, n_q, n_heads, n_kv, head_dim, window = 2, 2, 4, 2, 16, 16
    qkv = torch.randn(batch, n_q, (n_heads + 2 * n_kv) * head_dim)
    q, k_self, v_self = qkv.split((n_heads * head_dim, n_kv * head_dim, n_kv * head_dim), dim=-1)
    q = q.view(batch, n_q, n_heads, head_dim)
    k_self, v_self = k_self.view(batch, n_q, n_kv, head_dim), v_self.view(batch, n_q, n_kv, head_dim)
    k_cache, v_cache, cos, sin = make_step(batch, n_q, n_heads, n_kv, window, head_dim, torch.float32)[3:]
    check_step(q, k_self, v_self, k_cache, v_cache, torch.tensor([9, 40]), cos, sin)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"head_dim": 48}, ValueError, "head dim 48"),
        ({"n_kv": 3}, ValueError, "multiple of"),
        ({"pos_dtype": torch.float32}, ValueError, "int64"),
        ({"dtype": torch.float64}, TypeError, "dtype"),
    ],
)
def test_bad_inputs_raise(change, error, message):
    n_kv, head_dim = change.get("n_kv", 2), change.get("head_dim", 16)
    step = make_step(1, 1, 4, n_kv, 8, head_dim, change.get("dtype", torch.float32))
    q, k_self, v_self, k_cache, v_cache, cos, sin = step
    pos = torch.zeros(1, dtype=change.get("pos_dtype", torch.int64))
    with pytest.raises(error, match=message):
        attention_kernel.decode_attention(q, k_self, v_self, k_cache, v_cache, pos, cos, sin)


def test_split_plan_fills_the_gpu_at_batch_one():
    n_splits, split_size = attention_kernel.plan_splits(PAPER_HEADS, PAPER_WINDOW, 64, sm_count=132)
    assert (n_splits, split_size) == (8, 64)  # 16 heads x 8 splits ~ one program per SM
    n_splits, split_size = attention_kernel.plan_splits(64 * PAPER_HEADS, PAPER_WINDOW, 64, sm_count=132)
    assert (n_splits, split_size) == (1, 512)  # 1024 programs already fill it: no split, no merge traffic


def test_kernels_enabled_switch(monkeypatch):
    monkeypatch.delenv("SOUNDREACTOR_TRITON", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels_enabled("cpu")
    assert kernels_enabled("cuda")  # triton imports here
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kernels_enabled("cuda")  # interpreted kernels can't run in CUDA graphs
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("SOUNDREACTOR_TRITON", "0")
    assert not kernels_enabled("cuda")


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import soundreactor, soundreactor.triton_kernels as k\n"
        "assert not k.kernels_enabled('cuda')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_bench_dry_run(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "perf" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_kernels", bench)  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    bench.main(["--dry-run", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_kernels_dryrun.json").read_text())["rows"]
    assert rows and all(row["max_abs_error"] < 1e-4 for row in rows if row["method"] != "reference")
    assert (tmp_path / "bench_kernels_dryrun.md").read_text().startswith("#")


# ---- ahead-of-time compile for H100 (sm_90), in a subprocess with the real JIT ----

# pointers that are not in the activation dtype
POINTER_TYPES = {"pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "alpha_ptr": "*fp32"}
POINTER_TYPES |= {"inv_beta_ptr": "*fp32"}
# (queries, stream slots, dtype) of the paper preset's launches: audio slot, guided slot, a full batch
PAPER_LAUNCHES = [(1, 1, "bf16"), (2, 1, "bf16"), (2, 64, "bf16"), (2, 1, "fp16"), (2, 1, "fp32")]
# sample counts of the paper VAE decoder's Snake activations in one frame (1 latent -> 1600 samples)
PAPER_SNAKE_LENGTHS = (1, 8, 40, 200, 800, 1600)


def aot_variants() -> list[tuple[str, str, dict[str, int]]]:
    """(kernel, dtype, constexprs) as the runtime launches them for the paper preset."""
    variants = []
    for n_q, batch, dtype in PAPER_LAUNCHES:
        block_n = attention_kernel.default_block_n(n_q, PAPER_HEAD_DIM)
        _, split_size = attention_kernel.plan_splits(batch * PAPER_HEADS, PAPER_WINDOW, block_n, sm_count=132)
        shape = dict(WINDOW=PAPER_WINDOW, HEAD_DIM=PAPER_HEAD_DIM, GROUP=1, N_ROWS=n_q, BLOCK_M=n_q)
        tiles = {"BLOCK_N": block_n, "SPLIT_SIZE": split_size}
        variants += [("_window_partial_kernel", dtype, shape | tiles), ("_merge_kernel", dtype, shape)]
    for length in PAPER_SNAKE_LENGTHS:
        block_r, block_t = snake_kernel.tile_shape(length)
        for dtype in ("bf16", "fp16", "fp32") if length == 1600 else ("bf16",):
            variants.append(("_snake_kernel", dtype, {"BLOCK_R": block_r, "BLOCK_T": block_t}))
    return variants


def compile_for_sm90(name: str, dtype: str, constexprs: dict[str, int]) -> dict[str, int]:
    """Compile one kernel for H100; returns its shared memory and ptxas's register and spill counts."""
    from triton.backends.compiler import GPUTarget

    module = snake_kernel if name == "_snake_kernel" else attention_kernel
    kernel, warps = getattr(module, name), module.NUM_WARPS
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = POINTER_TYPES.get(arg, "*fp32" if arg.startswith("part_") else f"*{dtype}")
        else:
            signature[arg] = "fp32" if arg == "qk_scale" else "i32"
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    return {
        "shared": compiled.metadata.shared,
        "registers": int(registers.group(1)) if registers else -1,
        "spill_bytes": int(spills.group(1)) if spills else -1,
    }


def test_kernels_compile_for_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # ptxas prints its register and spill counts only when it runs: bypass triton's cache
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_DEFAULT_FP_FUSION="1", TRITON_ALWAYS_COMPILE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == len(aot_variants())
    assert {r["kernel"] for r in results} == {"_window_partial_kernel", "_merge_kernel", "_snake_kernel"}
    for result in results:
        assert result["shared"] <= H100_SHARED_BYTES, result
        assert result["registers"] > 0 and result["spill_bytes"] == 0, result


if __name__ == "__main__":
    results = []
    for name, dtype, constexprs in aot_variants():
        compiled = compile_for_sm90(name, dtype, constexprs)
        results.append(
            {"kernel": name, "dtype": dtype, "triton": triton.__version__, **constexprs, **compiled}
        )
    print(json.dumps(results))
