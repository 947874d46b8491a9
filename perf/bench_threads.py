"""Eager torch per-frame latency at each torch thread count, side by side: frames alternate between one stream per
thread count (the order flips every frame), so every count sees the same load. What `soundreactor.threads` bases
its defaults on. Writes perf/results/threads_cpu.{json,md}.

    python perf/bench_threads.py                              # the default model at the demo's 224x448, 1 and 2
    python perf/bench_threads.py --models default,paper --threads 1,2 --frames 20
"""

from __future__ import annotations

import argparse
import time

import torch
from common import load, machine, percentiles, save, threads_line

from soundreactor.default_model import load_default
from soundreactor.demo_video import demo_frames
from soundreactor.model.soundreactor import init_model
from soundreactor.runtime.torch_backend import TorchStreams


def bench_model(
    name: str, counts: list[int], frames: int, warmup: int, hw: tuple[int, int], nfe: int
) -> dict:
    model = load_default(hw) if name == "default" else init_model(name, seed=0, input_hw=hw)[0]
    model.configure_sampling(nfe=nfe)
    streams = {n: TorchStreams(model, seed=0) for n in counts}
    times: dict[int, list[float]] = {n: [] for n in counts}
    load_before = load()
    print(f"{name}: {threads_line(counts, load_before)}", flush=True)
    with torch.no_grad():
        for i, frame in enumerate(demo_frames(warmup + frames, size=hw, seed=0)):
            for n in counts if i % 2 else counts[::-1]:
                torch.set_num_threads(n)
                start = time.perf_counter()
                streams[n].step(frame[None])
                if i >= warmup:
                    times[n].append((time.perf_counter() - start) * 1e3)
    return {
        "parameters": model.config.parameter_estimate(),
        "frame_hw": list(hw),
        "load_before": load_before,
        "load_after": load(),
        "frame_ms": {str(n): percentiles(times[n]) for n in counts},
    }


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Eager torch per frame by thread count",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['available_cores']} available to the process), torch "
        f"{m['torch']}, OMP_NUM_THREADS={m['omp_num_threads']}. NFE {results['nfe']}, batch 1, "
        f"{results['frames']} timed frames per thread count after {results['warmup']} warm-up, the counts "
        "alternating frame by frame.",
        "",
        "| model | parameters | frame | threads | mean ms | p50 ms | p90 ms | load average before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        for n, f in r["frame_ms"].items():
            lines.append(
                f"| {name} | {r['parameters'] / 1e6:.1f} M | {r['frame_hw'][0]}x{r['frame_hw'][1]} | {n} | "
                f"{f['mean']:.1f} | {f['p50']:.1f} | {f['p90']:.1f} | {r['load_before']['load_average']} -> "
                f"{r['load_after']['load_average']} |"
            )
    if results.get("notes"):
        lines += ["", "## Notes", "", results["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default", help="`default` (the shipped model) or preset names")
    parser.add_argument("--threads", default="1,2", help="thread counts to compare")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--nfe", type=int, default=4, choices=(1, 2, 4))
    parser.add_argument("--hw", default="224x448", help="frame size HxW (default: the demo's)")
    parser.add_argument("--notes", default="", help="text for the Notes section of the markdown")
    args = parser.parse_args()
    counts = [int(n) for n in args.threads.split(",")]
    hw = tuple(int(x) for x in args.hw.split("x"))
    results = {
        "machine": machine(),
        "nfe": args.nfe,
        "frames": args.frames,
        "warmup": args.warmup,
        "notes": args.notes,
        "models": {
            name: bench_model(name, counts, args.frames, args.warmup, hw, args.nfe)
            for name in args.models.split(",")
        },
    }
    print(save("threads_cpu", results, markdown(results)).read_text())


if __name__ == "__main__":
    main()
