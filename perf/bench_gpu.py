"""GPU perf suite of the CUDA-graph backend: paper preset, random weights, 480x854 frames.

    PYTHONPATH=. python3 perf/bench_gpu.py [--quick] [--budget-s 240] [--out perf/results/gpu]
    python3 perf/bench_gpu.py --dry-run               # CPU, tiny preset, a handful of frames: the code path
    python3 perf/bench_gpu.py --replot RESULTS.json   # markdown and plots again (e.g. where matplotlib is)

1. Latency, one stream, pipelined, NFE 1/2/4 at guidance 3, for three variants of the same frame function:
   eager PyTorch, one CUDA graph per frame, and the graph with the Triton kernels (decode attention, Snake).
   Token-level and waveform-level latency (SPEC section 6) and frame-arrival-to-audio latency come from CUDA
   events around and inside the captured graphs (the per-stage split too); `host_step` is the wall time of
   `step()`. The device is idle when a frame arrives, as at 30 fps, so the audio step of the pipelined frame
   has already run.
2. Slots sweep (1, 2, 4, ..., 256) at one NFE: steps back to back, wall time per step including the frame
   upload, the replays, the audio download and host work; the largest slot count with p99 under 33.3 ms, and
   the throughput in stream-frames per second.
Writes bench_gpu_<device>.json and .md, and PNG plots, under --out; the JSON is rewritten after every run, so a
run cut short still leaves its results. Random weights: the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, percentiles

from soundreactor.model.soundreactor import init_model
from soundreactor.runtime.cuda_graph_backend import GraphStreams, cast_model

OUT = Path(__file__).parent / "results" / "gpu"
REAL_TIME_MS = 1000 / 30
FRAME_HW = (480, 854)
DRY_FRAME_HW = (48, 80)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = {  # GraphStreams switches per variant; off CUDA every variant falls back to eager torch
    "eager": {"graphs": False, "use_triton": False},
    "graph": {"graphs": True, "use_triton": False},
    "graph+triton": {"graphs": True, "use_triton": True},
}
LATENCIES = ("token_level", "waveform_level", "frame_arrival", "host_step")
STAGES = ("upload", "audio_step", "vision", "vision_step", "sampler", "vae_decode", "commit", "download")
# SPEC section 6 (paper Table 6): H100, batch 1, mean +- std in ms
PAPER = {
    1: {"token_level": (24.3, 1.97), "waveform_level": (26.3, 1.45)},
    2: {"token_level": (26.1, 2.02), "waveform_level": (28.2, 2.03)},
    4: {"token_level": (28.6, 1.79), "waveform_level": (31.5, 1.87)},
}


def stats(values: list[float]) -> dict[str, float]:
    return {**percentiles(values), "std": float(np.std(values))}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variant_args(variant: str, device: torch.device) -> dict[str, bool]:
    return VARIANTS[variant] if device.type == "cuda" else {"graphs": False, "use_triton": False}


def latency_run(
    model, nfe: int, variant: str, frames: int, warmup: int, precision, device, video: np.ndarray
) -> dict[str, object]:
    model.configure_sampling(nfe=nfe, guidance=3.0)
    streams = GraphStreams(
        model, 1, 0, device, **precision, pipelined=True, timing=True, **variant_args(variant, device)
    )
    samples: dict[str, list[float]] = {k: [] for k in (*LATENCIES, *STAGES)}
    for i in range(warmup + frames):
        sync(device)  # the frame arrives on an idle device, as it does at 30 fps
        start = time.perf_counter()
        streams.step(video[i % len(video)][None])
        host_ms = (time.perf_counter() - start) * 1e3
        if i >= warmup:
            for key, value in {**streams.timings, "host_step": host_ms}.items():
                samples[key].append(value)
    return {
        "graphs": streams.graphs,
        "triton": streams.use_triton,
        "frames": frames,
        "latency_ms": {k: stats(samples[k]) for k in LATENCIES},
        "stage_p50_ms": {k: float(np.median(samples[k])) for k in STAGES},
        "samples_ms": {k: [round(v, 4) for v in samples[k]] for k in LATENCIES},
    }


def sweep_point(
    model, slots: int, frames: int, warmup: int, variant: str, precision, device
) -> dict[str, object]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak then covers state, graphs and the model copies
    streams = GraphStreams(
        model, slots, 0, device, **precision, pipelined=True, **variant_args(variant, device)
    )
    rng = np.random.default_rng(slots)
    # written once into the pinned staging buffer: every step still uploads all B frames, without a host copy
    pattern = rng.integers(0, 256, (min(slots, 4), *streams.frame_hw, 3), dtype=np.uint8)
    for k in range(slots):
        streams.host_frames[k] = pattern[k % len(pattern)]
    for _ in range(warmup):
        streams.step(streams.host_frames)
    times = []
    begin = time.perf_counter()
    for _ in range(frames):
        start = time.perf_counter()
        streams.step(streams.host_frames)
        times.append((time.perf_counter() - start) * 1e3)
    total_s = time.perf_counter() - begin
    step = stats(times)
    return {
        "slots": slots,
        "frames": frames,
        "step_ms": step,
        "frames_per_s": slots * frames / total_s,
        "real_time": step["p99"] < REAL_TIME_MS,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def attempt(label: str, run, *args) -> dict[str, object]:
    """One measurement; a failure (a kernel that does not compile, out of memory) is recorded, not fatal."""
    started = time.perf_counter()
    try:
        result = run(*args)
    except Exception as err:  # a one-shot GPU run must still report what it did measure
        result = {"error": f"{type(err).__name__}: {err}"[:600]}
    finally:
        gc.collect()  # a GraphStreams holds its graphs, which hold its bound methods: a cycle
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{label}: {summary_line(result)}", flush=True)
    return result


def summary_line(result: dict[str, object]) -> str:
    if "error" in result:
        return f"FAILED {result['error'][:200]}"
    if "latency_ms" in result:
        lat = result["latency_ms"]
        return " ".join(f"{k} p50 {lat[k]['p50']:.2f} p99 {lat[k]['p99']:.2f} ms," for k in LATENCIES) + (
            f" ({result['seconds']} s)"
        )
    step = result["step_ms"]
    return (
        f"step p50 {step['p50']:.2f} p99 {step['p99']:.2f} ms, {result['frames_per_s']:.0f} frames/s "
        f"({result['seconds']} s)"
    )


def environment(device: torch.device, dry_run: bool) -> dict[str, object]:
    info = machine()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["cuda"] = torch.version.cuda
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=props.name,
            sm_count=props.multi_processor_count,
            memory_gb=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
        )
    else:
        info["device"] = "cpu (dry run)" if dry_run else "cpu"
    return info


def slug(info: dict[str, object], dry_run: bool) -> str:
    return "cpu-dry-run" if dry_run else re.sub(r"[^a-z0-9]+", "-", str(info["device"]).lower()).strip("-")


def run_suite(args: argparse.Namespace) -> dict[str, object]:
    device = torch.device("cpu" if args.dry_run else "cuda")
    deadline = time.perf_counter() + args.budget_s
    preset, frame_hw = ("tiny", DRY_FRAME_HW) if args.dry_run else ("paper", FRAME_HW)
    vae_dtype = args.vae_dtype
    precision = {"dtype": DTYPES[args.dtype], "vae_dtype": DTYPES[vae_dtype]}
    info = environment(device, args.dry_run)
    results: dict[str, object] = {
        "machine": info,
        "dry_run": args.dry_run,
        "preset": preset,
        "frame_hw": frame_hw,
        "dtype": args.dtype,
        "vae_dtype": vae_dtype,
        "guidance": 3.0,
        "latency": {},
        "sweep": {"nfe": args.sweep_nfe, "points": []},
    }
    path = args.out / f"bench_gpu_{slug(info, args.dry_run)}.json"
    print(
        f"bench_gpu on {info['device']}: torch {info['torch']}, CUDA {info['cuda']}, triton {info['triton']}"
    )
    built = time.perf_counter()
    model, _ = init_model(preset, seed=0, input_hw=frame_hw)
    model = cast_model(model, device, **precision)  # one device copy; each GraphStreams copies it again
    print(f"model built in {time.perf_counter() - built:.1f} s", flush=True)
    video = np.random.default_rng(0).integers(0, 256, (16, *frame_hw, 3), dtype=np.uint8)

    # graph variants first, then eager: the eager baseline is the slowest and least telling per second spent
    order = [(v, n) for v in ("graph+triton", "graph") for n in args.nfe] + [("eager", n) for n in args.nfe]
    for variant, nfe in order:
        label = f"latency NFE {nfe} {variant}"
        if time.perf_counter() > deadline:
            results["latency"][f"{nfe}/{variant}"] = {"error": "skipped: time budget spent"}
            continue
        frames = args.eager_frames if variant == "eager" else args.frames
        results["latency"][f"{nfe}/{variant}"] = attempt(
            label, latency_run, model, nfe, variant, frames, args.warmup, precision, device, video
        )
        save_json(path, results)

    triton_ran = "error" not in results["latency"].get(f"{args.nfe[-1]}/graph+triton", {})
    variant = results["sweep"]["variant"] = "graph+triton" if triton_ran else "graph"
    model.configure_sampling(nfe=args.sweep_nfe, guidance=3.0)
    for slots in args.slots:
        if time.perf_counter() > deadline:
            results["sweep"]["stopped"] = f"time budget spent before {slots} slots"
            break
        sweep_args = (model, slots, args.sweep_frames, args.warmup, variant, precision, device)
        point = attempt(f"sweep {slots} slots", sweep_point, *sweep_args)
        results["sweep"]["points"].append({"slots": slots, **point})
        save_json(path, results)
        if "error" in point or (not point["real_time"] and not args.dry_run):
            results["sweep"]["stopped"] = f"{slots} slots: " + (
                "failed" if "error" in point else "past real time"
            )
            break
    save_json(path, results)
    return results


def save_json(path: Path, results: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def fmt(stat: dict[str, float] | None, keys: tuple[str, ...] = ("p50", "p90", "p99")) -> str:
    return " / ".join(f"{stat[k]:.2f}" for k in keys) if stat else "-"


def variant_label(variant: str, run: dict[str, object]) -> str:
    """The variant's name, plus the switches that really ran where they differ (no CUDA: all eager)."""
    wanted = VARIANTS[variant]
    if (run["graphs"], run["triton"]) == (wanted["graphs"], wanted["use_triton"]):
        return variant
    return f"{variant} (ran with graphs {run['graphs']}, triton {run['triton']})"


def markdown(results: dict[str, object]) -> str:
    info = results["machine"]
    title = "CUDA-graph backend on GPU" + (
        " (CPU dry run: tiny preset, all variants eager)" if results["dry_run"] else ""
    )
    lines = [
        f"# {title}",
        "",
        f"Device {info['device']}, torch {info['torch']}, CUDA {info['cuda']}, triton {info['triton']}, "
        f"Python {info['python']}. Preset `{results['preset']}` with random weights, frames "
        f"{results['frame_hw'][0]}x{results['frame_hw'][1]}, {results['dtype']} (VAE {results.get('vae_dtype', results['dtype'])}), guidance {results['guidance']}, "
        "one stream, pipelined (the audio step of frame i+1 runs right after frame i).",
        "",
        "## Latency (ms, p50 / p90 / p99)",
        "",
        "| NFE | variant | frames | token-level | waveform-level | frame arrival -> audio | host step |",
        "|---|---|---|---|---|---|---|",
    ]
    runs = results["latency"]
    for key, run in runs.items():
        nfe, variant = key.split("/")
        if "error" in run:
            lines.append(f"| {nfe} | {variant} | - | {run['error'][:120]} | | | |")
            continue
        lat = run["latency_ms"]
        cells = " | ".join(fmt(lat[k]) for k in LATENCIES)
        lines.append(f"| {nfe} | {variant_label(variant, run)} | {run['frames']} | {cells} |")
    lines += [
        "",
        "Token-level: from feeding x_(i-1) (the audio step) until x_i is sampled, including encoding frame i. "
        "Waveform-level: until x_i is decoded to audio. Both are device times from CUDA events inside the "
        "captured graphs, as SPEC section 6 defines them. Frame arrival -> audio: from the frame upload to the "
        "audio back in host memory (the audio step already ran). Host step: wall time of `step()` (noise draw, "
        "staging copies, replay launches, and the launch of the next audio step).",
        "",
        "## Against the paper (SPEC section 6, Table 6: H100, batch 1, mean +- std ms)",
        "",
        "| NFE | paper token | ours token | paper waveform | ours waveform | ours frame arrival |",
        "|---|---|---|---|---|---|",
    ]
    for nfe, paper in PAPER.items():
        graphed = [
            runs[f"{nfe}/{v}"]
            for v in ("graph+triton", "graph")
            if "latency_ms" in runs.get(f"{nfe}/{v}", {})
        ]
        if not graphed:
            continue
        best = min(graphed, key=lambda run: run["latency_ms"]["waveform_level"]["mean"])
        lat = best["latency_ms"]
        ours = [
            f"{lat[k]['mean']:.2f} +- {lat[k]['std']:.2f}"
            for k in ("token_level", "waveform_level", "frame_arrival")
        ]
        token, wave = paper["token_level"], paper["waveform_level"]
        lines.append(
            f"| {nfe} | {token[0]} +- {token[1]} | {ours[0]} | {wave[0]} +- {wave[1]} | {ours[1]} | {ours[2]} |"
        )
    lines += [
        "",
        "Ours: the fastest graph variant of the table above. The paper's numbers are for its own PyTorch "
        "implementation with trained weights; the cost does not depend on weight values.",
        "",
        "## Per-stage split (p50 ms, from marks inside the frame graph)",
        "",
        "| NFE | variant | " + " | ".join(STAGES) + " |",
        "|---|---|" + "---|" * len(STAGES),
    ]
    for key, run in runs.items():
        if "stage_p50_ms" in run:
            nfe, variant = key.split("/")
            lines.append(
                f"| {nfe} | {variant_label(variant, run)} | "
                + " | ".join(f"{run['stage_p50_ms'][s]:.3f}" for s in STAGES)
                + " |"
            )
    sweep = results["sweep"]
    lines += [
        "",
        f"## Streams per GPU (NFE {sweep['nfe']}, {sweep.get('variant', '-')}, steps back to back)",
        "",
        "| slots | step p50 / p90 / p99 ms | stream-frames/s | real time (p99 < 33.3 ms) | peak GB |",
        "|---|---|---|---|---|",
    ]
    for point in sweep["points"]:
        if "error" in point:
            lines.append(f"| {point['slots']} | {point['error'][:120]} | | | |")
            continue
        memory = f"{point['peak_memory_gb']:.1f}" if point["peak_memory_gb"] is not None else "-"
        lines.append(
            f"| {point['slots']} | {fmt(point['step_ms'])} | {point['frames_per_s']:.0f} | "
            f"{'yes' if point['real_time'] else 'no'} | {memory} |"
        )
    real_time = [p for p in sweep["points"] if p.get("real_time")]
    if real_time:
        top = max(real_time, key=lambda p: p["slots"])
        lines += [
            "",
            f"Largest real-time slot count measured: **{top['slots']}** streams "
            f"(p99 step {top['step_ms']['p99']:.2f} ms, {top['frames_per_s']:.0f} stream-frames/s, "
            f"{top['frames_per_s'] / 30:.0f}x the frames 30 fps streams need).",
        ]
    if "stopped" in sweep:
        lines.append(f"Sweep stopped at {sweep['stopped']}.")
    lines += [
        "",
        "A step uploads all B frames (uint8, from the pinned staging buffer), replays the frame graph, downloads "
        "the audio and launches the next audio step; throughput counts one frame of audio per stream per step.",
    ]
    return "\n".join(lines) + "\n"


def plots(results: dict[str, object], out: Path, name: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plots; rerun with --replot on the JSON where it is installed")
        return []
    paths = []
    runs = results["latency"]
    nfes = sorted({int(k.split("/")[0]) for k in runs})
    fig, axes = plt.subplots(1, len(nfes), figsize=(5 * len(nfes), 3.6), squeeze=False)
    for ax, nfe in zip(axes[0], nfes, strict=True):
        measured = {
            v: np.asarray(runs[f"{nfe}/{v}"]["samples_ms"]["waveform_level"])
            for v in VARIANTS
            if "samples_ms" in runs.get(f"{nfe}/{v}", {})
        }
        if not measured:
            continue
        everything = np.concatenate(list(measured.values()))
        bins = np.geomspace(max(everything.min(), 1e-3), everything.max() * 1.01, 80)
        for variant, values in measured.items():
            ax.hist(values, bins=bins, alpha=0.6, label=variant)
        ax.set_xscale("log")
        ax.axvline(REAL_TIME_MS, color="k", linestyle="--", linewidth=1)
        ax.set_title(f"NFE {nfe}: waveform-level latency")
        ax.set_xlabel("ms")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("frames")
    fig.tight_layout()
    paths.append(out / f"latency_hist_{name}.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    points = [p for p in results["sweep"]["points"] if "step_ms" in p]
    if points:
        slots = [p["slots"] for p in points]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        for key in ("p50", "p99"):
            left.plot(slots, [p["step_ms"][key] for p in points], marker="o", label=key)
        left.axhline(REAL_TIME_MS, color="k", linestyle="--", linewidth=1, label="33.3 ms")
        left.set(xscale="log", xlabel="stream slots", ylabel="step ms", title="Step time vs streams")
        left.legend(fontsize=8)
        right.plot(slots, [p["frames_per_s"] for p in points], marker="o")
        right.set(
            xscale="log", yscale="log", xlabel="stream slots", ylabel="stream-frames / s", title="Throughput"
        )
        for ax in (left, right):
            ax.set_xticks(slots, [str(s) for s in slots])
        fig.tight_layout()
        paths.append(out / f"streams_{name}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def report(results: dict[str, object], out: Path) -> Path:
    name = slug(results["machine"], results["dry_run"])
    path = out / f"bench_gpu_{name}.md"
    path.write_text(markdown(results))
    for png in plots(results, out, name):
        print(f"wrote {png}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, a handful of frames")
    parser.add_argument("--quick", action="store_true", help="fewer frames and a shorter sweep")
    parser.add_argument("--replot", type=Path, help="write markdown and plots from an existing results JSON")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop starting new runs after this")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument(
        "--vae-dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="VAE decoder dtype (as `soundreactor run`)",
    )
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4], choices=(1, 2, 4))
    parser.add_argument("--sweep-nfe", type=int, default=4, choices=(1, 2, 4))
    parser.add_argument("--slots", type=int, nargs="+", default=[2**k for k in range(9)])
    parser.add_argument("--frames", type=int, default=1000, help="timed frames per graph latency run")
    parser.add_argument("--eager-frames", type=int, default=150, help="timed frames per eager latency run")
    parser.add_argument("--sweep-frames", type=int, default=150, help="timed steps per sweep point")
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args(argv)
    if args.replot:
        print(report(json.loads(args.replot.read_text()), args.replot.parent).read_text())
        return
    if args.quick:
        args.frames, args.eager_frames, args.sweep_frames, args.warmup = 300, 50, 60, 10
    if args.dry_run:
        args.frames, args.eager_frames, args.sweep_frames, args.warmup = 4, 3, 3, 1
        args.slots = [s for s in args.slots if s <= 4]
    elif not torch.cuda.is_available():
        sys.exit(
            f"bench_gpu: CUDA is not available (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "run it on a GPU machine, or pass --dry-run to check the code path on CPU"
        )
    results = run_suite(args)
    print(report(results, args.out).read_text())


if __name__ == "__main__":
    main()
