"""Benchmark the fused decode attention against the torch paths it replaces (perf/results/bench_kernels_*).

Methods, each doing one layer's step attention plus the cache write of query 0:
  triton     `triton_kernels.decode_attention.decode_attention` (the write fused in)
  reference  `attention.window_attention` + `attention.write_cache` (the CPU/reference path)
  sdpa       torch SDPA over RoPE'd cache keys plus each query's own key, equivalent mask, + `write_cache`

A timed unit is one model step: --layers calls over distinct caches, so one layer's window does not sit in L2
the way a single repeated call would (small windows at batch 1 still fit L2: their bandwidth can pass the DRAM
peak). Units are timed with CUDA events, eagerly and replayed from a CUDA graph (how the runtime launches a
frame). Bandwidth counts the bytes a call must move: K/V window read, new K/V written, q, k_self, v_self, out.

    python perf/bench_kernels.py                 # on a CUDA machine
    python perf/bench_kernels.py --block-n 16,32,64   # also time fixed tile sizes
    python perf/bench_kernels.py --dry-run       # tiny shapes on CPU through the Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soundreactor.model import attention  # noqa: E402

# Peak DRAM bandwidth in bytes/s by device-name substring, first match wins (vendor data sheets).
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Step = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Case:
    batch: int
    queries: int
    window: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    layers: int

    def bytes_moved(self) -> int:
        element = DTYPES[self.dtype].itemsize
        window = 2 * self.batch * self.kv_heads * (self.window - 1) * self.head_dim
        written = 2 * self.batch * self.kv_heads * self.head_dim
        step_io = self.batch * self.queries * (2 * self.heads + 2 * self.kv_heads) * self.head_dim
        return (window + written + step_io) * element


def peak_bandwidth(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BANDWIDTH.items() if key in device_name), None)


def reference_step(q, k_self, v_self, k_cache, v_cache, pos, cos, sin) -> Tensor:
    out = attention.window_attention(q, k_self, v_self, k_cache, v_cache, pos, cos, sin)
    attention.write_cache(k_cache, v_cache, k_self[:, 0], v_self[:, 0], pos)
    return out


def sdpa_step(q, k_self, v_self, k_cache, v_cache, pos, cos, sin) -> Tensor:
    """window_attention through SDPA: keys are the RoPE'd window then the Q own keys; a query sees its own."""
    batch, n_q, n_heads, _ = q.shape
    window = k_cache.shape[2]
    relative, valid = attention.cache_positions(pos, window)
    q_rot = attention.apply_rope(q, cos[window - 1], sin[window - 1]).transpose(1, 2)
    k_self_rot = attention.apply_rope(k_self, cos[window - 1], sin[window - 1]).transpose(1, 2)
    k_rot = attention.apply_rope(k_cache, cos[relative][:, None], sin[relative][:, None])
    keys = torch.cat((k_rot, k_self_rot), dim=2)  # [B, Hkv, W + Q, D]
    values = torch.cat((v_cache, v_self.transpose(1, 2)), dim=2)
    own = torch.eye(n_q, dtype=torch.bool, device=q.device).expand(batch, n_q, n_q)
    mask = torch.cat((valid[:, None, :].expand(batch, n_q, window), own), dim=-1)[:, None]
    out = F.scaled_dot_product_attention(
        q_rot, keys, values, attn_mask=mask, enable_gqa=n_heads != k_cache.shape[1]
    )
    attention.write_cache(k_cache, v_cache, k_self[:, 0], v_self[:, 0], pos)
    return out.transpose(1, 2)


def make_inputs(case: Case, device: torch.device) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """Step inputs [q, k_self, v_self, pos, cos, sin] and a full (k_cache, v_cache) ring per layer."""
    dtype = DTYPES[case.dtype]
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)
    q = randn(case.batch, case.queries, case.heads, case.head_dim)
    k_self = randn(case.batch, case.queries, case.kv_heads, case.head_dim)
    v_self = randn(case.batch, case.queries, case.kv_heads, case.head_dim)
    pos = 1000 * case.window + 7 * torch.arange(case.batch, device=device)  # full windows, wrapped, distinct
    cos, sin = (t.to(device) for t in attention.rope_tables(case.head_dim, case.window, 10_000.0))
    ring = (case.batch, case.kv_heads, case.window, case.head_dim)
    caches = [(randn(*ring), randn(*ring)) for _ in range(case.layers)]
    return [q, k_self, v_self, pos, cos, sin], caches


def max_error(step: Step, inputs: list[Tensor], caches: list[tuple[Tensor, Tensor]]) -> float:
    q, k_self, v_self, pos, cos, sin = inputs
    k_cache, v_cache = caches[0]
    expected = reference_step(q, k_self, v_self, k_cache.clone(), v_cache.clone(), pos, cos, sin)
    out = step(q, k_self, v_self, k_cache.clone(), v_cache.clone(), pos, cos, sin)
    return (out.float() - expected.float()).abs().max().item()


def seconds_per_unit(unit: Callable[[], object], iters: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        unit()
    if not cuda:
        start = time.perf_counter()
        for _ in range(iters):
            unit()
        return (time.perf_counter() - start) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        unit()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def capture_graph(unit: Callable[[], object]) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and allocate outside the capture
        unit()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        unit()
    return graph


def bench_case(
    case: Case, methods: dict[str, Step], args: argparse.Namespace, device: torch.device
) -> list[dict]:
    inputs, caches = make_inputs(case, device)
    q, k_self, v_self, pos, cos, sin = inputs
    cuda = device.type == "cuda"
    peak = peak_bandwidth(torch.cuda.get_device_name(device)) if cuda else None
    rows = []
    for name, step in methods.items():
        error = max_error(step, inputs, caches)

        def unit(step: Step = step) -> None:
            for k_cache, v_cache in caches:
                step(q, k_self, v_self, k_cache, v_cache, pos, cos, sin)

        timers = {"eager": unit}
        if cuda:
            try:
                timers["graph"] = capture_graph(unit).replay
            except RuntimeError as exc:  # record and go on: the other methods still get timed
                rows.append({"method": name, "mode": "graph", **asdict(case), "error": str(exc)[:200]})
        for mode, timed in timers.items():
            seconds = seconds_per_unit(timed, args.iters, args.warmup, cuda) / case.layers
            rate = case.bytes_moved() / seconds
            rows.append({
                "method": name, "mode": mode, **asdict(case), "us_per_call": seconds * 1e6,
                "gb_per_s": rate / 1e9, "pct_of_peak": 100 * rate / peak if peak else None,
                "max_abs_error": error,
            })  # fmt: skip
    return rows


def markdown(rows: list[dict], header: str) -> str:
    """A table per mode, a line per (Q, slots, window): each method's time, triton's speedup and bandwidth."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    timed = [r for r in rows if "error" not in r]
    us = {(r["mode"], r["queries"], r["batch"], r["window"], r["method"]): r["us_per_call"] for r in timed}
    lines = [f"# Decode attention: Triton vs torch\n\n{header}\n"]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        columns = ["Q", "slots", "window", *methods, "vs reference", "vs sdpa", "triton GB/s", "% of peak"]
        lines += [f"\n## {mode}: us per layer call; speedup = torch time / triton time\n"]
        lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        for r in timed:
            if r["method"] != "triton" or r["mode"] != mode:
                continue
            key = (mode, r["queries"], r["batch"], r["window"])
            times = [f"{us[(*key, m)]:.1f}" if (*key, m) in us else "-" for m in methods]
            speedups = [
                f"{us[(*key, m)] / r['us_per_call']:.1f}x" if (*key, m) in us else "-"
                for m in ("reference", "sdpa")
            ]
            peak = "-" if r["pct_of_peak"] is None else f"{r['pct_of_peak']:.0f}"
            cells = [*map(str, key[1:]), *times, *speedups, f"{r['gb_per_s']:.0f}", peak]
            lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines.append("\n## Failed graph captures\n")
        lines += [
            f"- {r['method']} Q={r['queries']} B={r['batch']} W={r['window']}: {r['error']}" for r in failed
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",")]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", type=ints, default=[64, 128, 240, 480, 960])
    parser.add_argument("--batches", type=ints, default=[1, 4, 16, 64], help="stream slots")
    parser.add_argument("--queries", type=ints, default=[1, 2], help="1: audio slot, 2: guided vision slot")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--layers", type=int, default=24, help="calls per timed unit, over distinct caches")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block-n", type=ints, default=[], help="also time the kernel at these fixed tiles")
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on CPU via the Triton interpreter"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.windows, args.batches, args.queries = [16], [1, 2], [1, 2]
        args.heads, args.kv_heads, args.head_dim, args.dtype = 4, 2, 16, "fp32"
        args.layers, args.iters, args.warmup = 2, 1, 0
    return args


def write_results(rows: list[dict], args: argparse.Namespace, device_name: str, triton_version: str) -> None:
    peak = None if args.dry_run else peak_bandwidth(device_name)
    meta = {
        "device": device_name, "peak_bytes_per_s": peak, "torch": torch.__version__, "triton": triton_version,
        "python": platform.python_version(), "dtype": args.dtype, "layers_per_unit": args.layers,
        "iters": args.iters, "bytes": "K/V window read + new K/V written + q, k_self, v_self, out",
    }  # fmt: skip
    bandwidth = f"peak {peak / 1e12:.2f} TB/s" if peak else "peak bandwidth unknown"
    header = (
        f"{device_name}, {bandwidth}; torch {torch.__version__}, triton {triton_version}, {args.dtype}, "
        f"{args.layers} layers per timed unit"
    )
    save_report(
        args.out,
        "bench_kernels",
        device_name,
        args.dry_run,
        {"meta": meta, "rows": rows},
        markdown(rows, header),
    )


def save_report(out: Path, name: str, device_name: str, dry_run: bool, results: dict, report: str) -> None:
    """<out>/<name>_<device>.json and .md (`dryrun` in place of the device for --dry-run)."""
    tag = "dryrun" if dry_run else re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_{tag}.json").write_text(json.dumps(results, indent=1))
    (out / f"{name}_{tag}.md").write_text(report)
    print(f"wrote {out}/{name}_{tag}.json and .md")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "bench_kernels: no CUDA device, nothing timed (--dry-run runs tiny shapes on CPU)",
            file=sys.stderr,
        )
        return 0
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, i.e. at the import below
    import triton

    from soundreactor.triton_kernels import decode_attention as kernels

    if args.dry_run and type(kernels._merge_kernel).__name__ != "InterpretedFunction":
        raise SystemExit("--dry-run needs the kernels defined under TRITON_INTERPRET=1; import them after it")
    device = torch.device("cpu" if args.dry_run else "cuda")
    methods: dict[str, Step] = {
        "triton": kernels.decode_attention,
        "reference": reference_step,
        "sdpa": sdpa_step,
    }
    for block_n in args.block_n:
        methods[f"triton_bn{block_n}"] = lambda *a, n=block_n: kernels.decode_attention(*a, block_n=n)

    rows = []
    for n_q in args.queries:
        for batch in args.batches:
            for window in args.windows:
                case = Case(
                    batch, n_q, window, args.heads, args.kv_heads, args.head_dim, args.dtype, args.layers
                )
                case_rows = bench_case(case, methods, args, device)
                timed = [
                    f"{r['method']}/{r['mode']} {r['us_per_call']:.1f}us"
                    for r in case_rows
                    if "error" not in r
                ]
                print(f"Q={n_q} B={batch} W={window}: " + ", ".join(timed), flush=True)
                rows += case_rows
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    device_name = "CPU (Triton interpreter, dry run)" if args.dry_run else torch.cuda.get_device_name(device)
    write_results(rows, args, device_name, triton.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
