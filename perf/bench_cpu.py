"""CPU baseline: the eager PyTorch streaming session, per frame and per component, for `tiny` and `paper`.

    python perf/bench_cpu.py [--frames 24] [--presets tiny paper] [--threads 1]
    taskset -c 1 python perf/bench_cpu.py --threads 1     # on a shared machine: one pinned core

Per-frame latency is wall time of `Session.step`; the component split comes from the stage labels the torch
backend puts on each part of the frame (torch.profiler), over a separate profiled pass. Random weights: the cost
does not depend on their values. Every later backend is compared against this.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, load, machine, percentiles, save, threads_line
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from soundreactor.demo_video import demo_frames
from soundreactor.model.soundreactor import init_model
from soundreactor.runtime import Session
from soundreactor.runtime.torch_backend import TorchStreams

STAGES = ("audio_step", "vision", "vision_step", "sampler", "vae_decode")
FRAME_HW = (480, 854)


def bench_preset(name: str, frames: int, warmup: int, nfe: int) -> dict[str, object]:
    load_before = load()
    print(f"{name}: {threads_line(torch.get_num_threads(), load_before)}", flush=True)
    model, _ = init_model(name, seed=0, input_hw=FRAME_HW)
    model.configure_sampling(nfe=nfe)
    session = Session(TorchStreams(model, seed=0))
    video = list(demo_frames(warmup + 2 * frames, size=FRAME_HW, seed=0))
    for frame in video[:warmup]:
        session.step(frame)
    times = []
    for frame in tqdm(video[warmup : warmup + frames], desc=f"{name}: frames", unit="frame"):
        start = time.perf_counter()
        session.step(frame)
        times.append((time.perf_counter() - start) * 1e3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for frame in tqdm(video[warmup + frames :], desc=f"{name}: profiled", unit="frame"):
            session.step(frame)
    per_stage = {e.key: e.cpu_time_total / 1e3 / frames for e in prof.key_averages() if e.key in STAGES}
    return {
        "load_before": load_before,
        "load_after": load(),
        "frame_ms": percentiles(times),
        "component_ms": {s: per_stage.get(s, float("nan")) for s in STAGES},
    }


def markdown(results: dict[str, object]) -> str:
    lines = [
        "# Eager PyTorch streaming session on CPU",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, torch "
        f"{results['machine']['torch']}. Frames {FRAME_HW[0]}x{FRAME_HW[1]}, NFE {results['nfe']}, guidance 3, "
        f"fp32, batch 1, {results['frames']} timed frames after {results['warmup']} warm-up.",
        "",
        f"Torch threads: {results['machine']['torch_threads']} (OMP_NUM_THREADS="
        f"{results['machine']['omp_num_threads']}), {results['machine']['available_cores']} core(s) available "
        "to the process. Load average (1, 5, 15 min) before and after each preset: "
        + "; ".join(
            f"{name} {r['load_before']['load_average']} -> {r['load_after']['load_average']}"
            for name, r in results["presets"].items()
        )
        + ".",
        "",
        "| preset | p50 ms | p90 ms | p99 ms | " + " | ".join(f"{s} ms" for s in STAGES) + " |",
        "|---|---|---|---|" + "---|" * len(STAGES),
    ]
    for name, r in results["presets"].items():
        f, c = r["frame_ms"], r["component_ms"]
        lines.append(
            f"| {name} | {f['p50']:.1f} | {f['p90']:.1f} | {f['p99']:.1f} | "
            + " | ".join(f"{c[s]:.1f}" for s in STAGES)
            + " |"
        )
    lines += ["", "Component times are means from a profiled pass (profiler overhead included)."]
    if results.get("notes"):
        lines += ["", "## Notes", "", results["notes"]]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, object]) -> Path:
    """Per-component bars for each preset, next to the markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = results["presets"]
    fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 3.5), squeeze=False)
    for ax, (name, r) in zip(axes[0], presets.items(), strict=True):
        ax.barh(STAGES, [r["component_ms"][s] for s in STAGES], color="tab:blue")
        ax.invert_yaxis()
        ax.set_title(f"{name}: p50 {r['frame_ms']['p50']:.1f} ms per frame")
        ax.set_xlabel("ms per frame (eager torch, CPU)")
    fig.tight_layout()
    path = RESULTS / "cpu_eager.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--nfe", type=int, default=4, choices=(1, 2, 4))
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--notes", default="", help="text for the Notes section of the markdown")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    results: dict[str, object] = {
        "machine": machine(),
        "notes": args.notes,
        "frames": args.frames,
        "warmup": args.warmup,
        "nfe": args.nfe,
        "presets": {p: bench_preset(p, args.frames, args.warmup, args.nfe) for p in args.presets},
    }
    path = save("cpu_eager", results, markdown(results))
    print(path.read_text())
    print(f"plot: {plot(results)}")


if __name__ == "__main__":
    np.set_printoptions(precision=2)
    main()
