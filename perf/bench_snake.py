"""Benchmark the fused Snake activation against the torch path it replaces, over one frame of the VAE decoder.

A timed unit is every Snake activation of one streaming decoder step (36 for the paper preset, from one sample
per channel at 2048 channels up to 1600 samples at 128 channels), at the shapes the decoder really produces
for the given number of stream slots. Methods:
  triton  `triton_kernels.snake.snake_beta` (one pass, fp32 math, one rounding)
  torch   `model.vae.FoldedSnakeBeta` (multiply, sine, square, multiply-add: four kernels)
Timed with CUDA events, eagerly and replayed from a CUDA graph; bandwidth counts one read and one write of
each activation. The error column is the largest deviation from fp32 math on the same inputs.

    python perf/bench_snake.py [--slots 1 16 128] [--dtype bf16]   # on a CUDA machine
    python perf/bench_snake.py --dry-run                            # tiny preset on CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from bench_kernels import capture_graph, peak_bandwidth, save_report, seconds_per_unit
from torch import Tensor

from soundreactor.config import paper, tiny
from soundreactor.model.vae import AudioVAE, FoldedSnakeBeta, SnakeBeta

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OUT = Path(__file__).parent / "results" / "gpu"


def snake_shapes(preset: str, slots: int) -> list[tuple[int, int, int]]:
    """[B, C, T] of every Snake input in one streaming decoder step, in order (shapes only, on meta)."""
    config = (paper if preset == "paper" else tiny)().vae
    with torch.device("meta"):
        decoder = AudioVAE(config).decoder
    shapes = []
    for module in decoder.modules():
        if isinstance(module, SnakeBeta):
            module.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        state = decoder.init_state(slots, "meta", torch.float32)
        decoder.step(torch.zeros(slots, config.latent_dim, device="meta"), state)
    return shapes


def make_activations(shapes, dtype, device, seed: int = 0) -> list[tuple[FoldedSnakeBeta, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for batch, channels, length in shapes:
        snake = SnakeBeta(channels)
        with torch.no_grad():
            snake.alpha.copy_(torch.randn(channels, generator=gen) * 0.5)
            snake.beta.copy_(torch.randn(channels, generator=gen) * 0.5)
        x = (torch.randn(batch, channels, length, generator=gen) * 3).to(device, dtype)
        pairs.append((FoldedSnakeBeta(snake).to(device), x))
    return pairs


def bench(slots: int, args: argparse.Namespace, snake_beta, device: torch.device) -> list[dict]:
    shapes = snake_shapes(args.preset, slots)
    pairs = make_activations(shapes, DTYPES[args.dtype], device)
    moved = sum(2 * x.numel() * x.element_size() for _, x in pairs)
    methods = {
        "triton": lambda snake, x: snake_beta(x, snake.alpha_exp, snake.inv_beta),
        "torch": lambda snake, x: snake(x),
    }
    cuda = device.type == "cuda"
    peak = peak_bandwidth(torch.cuda.get_device_name(device)) if cuda else None
    exacts = [snake(x.float()) for snake, x in pairs]  # fp32 math on the same inputs
    rows = []
    for name, method in methods.items():
        error = max(
            ((method(s, x).float() - exact).abs().max() / exact.abs().max()).item()
            for (s, x), exact in zip(pairs, exacts, strict=True)
        )

        def unit(method=method) -> None:
            for snake, x in pairs:
                method(snake, x)

        timers = {"eager": unit}
        if cuda:
            timers["graph"] = capture_graph(unit).replay
        for mode, timed in timers.items():
            seconds = seconds_per_unit(timed, args.iters, args.warmup, cuda)
            rate = moved / seconds
            rows.append({
                "method": name, "mode": mode, "slots": slots, "activations": len(pairs),
                "us_per_frame": seconds * 1e6, "gb_per_s": rate / 1e9,
                "pct_of_peak": 100 * rate / peak if peak else None, "max_rel_error": error,
            })  # fmt: skip
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        "# Snake activations of one VAE decoder frame: fused Triton kernel vs torch",
        "",
        header,
        "",
        "| slots | mode | activations | torch us | triton us | speedup | triton GB/s | triton % of peak | "
        "max rel. error torch / triton |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keyed = {(r["slots"], r["mode"], r["method"]): r for r in rows}
    for slots, mode in dict.fromkeys((r["slots"], r["mode"]) for r in rows):
        triton_row, torch_row = keyed[(slots, mode, "triton")], keyed[(slots, mode, "torch")]
        peak = f"{triton_row['pct_of_peak']:.0f}" if triton_row["pct_of_peak"] is not None else "-"
        lines.append(
            f"| {slots} | {mode} | {triton_row['activations']} | {torch_row['us_per_frame']:.1f} | "
            f"{triton_row['us_per_frame']:.1f} | {torch_row['us_per_frame'] / triton_row['us_per_frame']:.2f}x | "
            f"{triton_row['gb_per_s']:.0f} | {peak} | "
            f"{torch_row['max_rel_error']:.1e} / {triton_row['max_rel_error']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--dry-run", action="store_true", help="tiny preset on CPU through the interpreter")
    args = parser.parse_args(argv)
    args.preset = "tiny" if args.dry_run else "paper"
    if args.dry_run:
        args.slots, args.iters, args.warmup, args.dtype = [1, 2], 1, 0, "fp32"
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is defined, i.e. at the import below
    elif not torch.cuda.is_available():
        print("bench_snake: no CUDA device, nothing timed (--dry-run runs on CPU)", file=sys.stderr)
        return 0
    import triton

    from soundreactor.triton_kernels import snake as kernel

    if args.dry_run and type(kernel._snake_kernel).__name__ != "InterpretedFunction":
        raise SystemExit("--dry-run needs the kernel defined under TRITON_INTERPRET=1; import it after it")
    device = torch.device("cpu" if args.dry_run else "cuda")
    rows = []
    for slots in args.slots:
        rows += bench(slots, args, kernel.snake_beta, device)
        timed = [f"{r['method']}/{r['mode']} {r['us_per_frame']:.1f}us" for r in rows if r["slots"] == slots]
        print(f"{slots} slots: " + ", ".join(timed), flush=True)
    device_name = "CPU (Triton interpreter, dry run)" if args.dry_run else torch.cuda.get_device_name(device)
    header = (
        f"{device_name}; torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, "
        f"{args.preset} preset, {args.iters} timed frames"
    )
    results = {"header": header, "rows": rows}
    save_report(args.out, "bench_snake", device_name, args.dry_run, results, markdown(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
