"""ONNX Runtime (CPU provider) against eager torch: per-frame and per-component latency, same process, same frames.

For each preset: seeded random weights at the preset's sizes (latency does not depend on the values), fp32 graphs
exported to a temporary directory (paper: about 2 GB, under /tmp, never in the repository), then warm-up and timed
frames through TorchStreams and OrtStreams: alternating frame by frame with one thread each (both see the same
load), one backend after the other with more (ORT's worker threads and torch's OpenMP threads would fight over the
cores). Components are timed by wrapping the model's stage methods (torch) and each graph's `run_with_iobinding`
(ORT); a frame's time is the whole `step` call. Then a few profiled ORT frames give the time per operator type.
Writes perf/results/onnxruntime_cpu.{json,md}.

    python perf/bench_onnxruntime.py                          # tiny and paper, 30 timed frames each, 1 thread
    python perf/bench_onnxruntime.py --presets tiny --frames 10
    taskset -c 1 python perf/bench_onnxruntime.py --threads 1  # on a shared machine: one pinned core

The thread settings and the load average before and after each preset are recorded: eager torch's many small
parallel ops suffer most when other processes hold cores, so a speedup measured on a busy machine with torch's
default threads says more about the machine than about the backends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

from common import load, threads_line  # noqa: E402

from soundreactor.demo_video import demo_frames  # noqa: E402
from soundreactor.export.exporter import export_model  # noqa: E402
from soundreactor.model.soundreactor import SoundReactor, init_model  # noqa: E402
from soundreactor.runtime.onnxruntime_backend import OrtStreams, default_options  # noqa: E402
from soundreactor.runtime.torch_backend import TorchStreams  # noqa: E402
from soundreactor.threads import available_cores  # noqa: E402

FRAME_HW = {"tiny": (240, 426), "small": (240, 426), "paper": (480, 854)}
COMPONENTS = ("ar_audio", "vision", "ar_vision", "sampler", "vae_decoder")
Timings = dict[str, list[float]]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def timed(fn: Callable[..., Any], times: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
        return out

    return wrapper


def instrument_torch(model: SoundReactor) -> Timings:
    """Time the five stages TorchStreams.step calls, under the names of the graphs they become."""
    times: Timings = defaultdict(list)
    tf = model.transformer
    tf.audio_step = timed(tf.audio_step, times["ar_audio"])
    model.vision.forward = timed(model.vision.forward, times["vision"])
    tf.vision_step = timed(tf.vision_step, times["ar_vision"])
    model.sample_latent = timed(model.sample_latent, times["sampler"])
    model.vae.decoder.step = timed(model.vae.decoder.step, times["vae_decoder"])
    return times


def instrument_ort(streams: OrtStreams) -> Timings:
    times: Timings = defaultdict(list)
    for name, session in streams.sessions.items():
        session.run_with_iobinding = timed(session.run_with_iobinding, times[name])
    return times


def run_frames(
    step: Callable[[np.ndarray], np.ndarray], frames: np.ndarray
) -> tuple[list[float], list[np.ndarray]]:
    seconds, audio = [], []
    for frame in frames:
        start = time.perf_counter()
        audio.append(step(frame[None]))
        seconds.append(time.perf_counter() - start)
    return seconds, audio


def stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
    }


def ort_options(threads: int) -> ort.SessionOptions:
    options = default_options()
    options.intra_op_num_threads = threads  # 0: one per physical core
    return options


def op_profile(directory: Path, frames: np.ndarray, threads: int, warmup: int) -> dict[str, dict[str, float]]:
    """Mean ms per frame by operator type for each graph, from ONNX Runtime's profiler, after `warmup` frames
    (a new session's first runs pay for allocating its buffers)."""
    options = ort_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(directory / "ort_profile")
    streams = OrtStreams(directory, options=options)
    for frame in frames:
        streams.step(frame[None])
    per_graph: dict[str, dict[str, float]] = {}
    for name, session in streams.sessions.items():
        events = json.loads(Path(session.end_profiling()).read_text())
        runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
        totals: dict[str, float] = defaultdict(float)
        for event in events:
            if (
                event.get("cat") == "Node"
                and event["name"].endswith("_kernel_time")
                and event["ts"] >= runs[warmup]
            ):
                totals[event["args"]["op_name"]] += event["dur"] / 1e3 / (len(frames) - warmup)
        per_graph[name] = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
    return per_graph


def bench_preset(preset: str, warmup: int, frames: int, threads: int, workdir: Path) -> dict[str, Any]:
    frame_hw = FRAME_HW[preset]
    model, _ = init_model(preset, seed=0, input_hw=frame_hw)
    clip = np.stack(list(demo_frames(warmup + frames, size=frame_hw, seed=1)))
    directory = workdir / preset
    start = time.perf_counter()
    export_model(model, directory)
    export_s = time.perf_counter() - start
    export_bytes = sum(f.stat().st_size for f in directory.iterdir())

    load_before = load()  # other processes on the machine skew every number below
    print(f"{preset}: {threads_line(torch.get_num_threads(), load_before)}", flush=True)
    torch_times = instrument_torch(model)
    torch_streams = TorchStreams(model, seed=0)
    ort_streams = OrtStreams(directory, seed=0, options=ort_options(threads))
    ort_times = instrument_ort(ort_streams)
    with torch.no_grad():
        run_frames(torch_streams.step, clip[:warmup])
        run_frames(ort_streams.step, clip[:warmup])
        for values in (*torch_times.values(), *ort_times.values()):
            values.clear()
        if threads == 1:  # no thread pools to fight: alternate frames, so both see the same load
            pairs = [
                (
                    run_frames(torch_streams.step, clip[i : i + 1]),
                    run_frames(ort_streams.step, clip[i : i + 1]),
                )
                for i in range(warmup, len(clip))
            ]
            torch_frames = [t for (ts, _), _ in pairs for t in ts]
            torch_audio = [a for (_, audio), _ in pairs for a in audio]
            ort_frames = [t for _, (ts, _) in pairs for t in ts]
            ort_audio = [a for _, (_, audio) in pairs for a in audio]
        else:  # one after the other: ORT's workers and torch's OpenMP threads would take each other's cores
            torch_frames, torch_audio = run_frames(torch_streams.step, clip[warmup:])
            ort_frames, ort_audio = run_frames(ort_streams.step, clip[warmup:])
    torch_components = {k: 1e3 * float(np.mean(torch_times[k])) for k in COMPONENTS}
    ort_components = {k: 1e3 * float(np.mean(ort_times[k])) for k in COMPONENTS}
    del ort_streams, torch_streams, model

    result = {
        "load_before": load_before,
        "load_after": load(),
        "frame_hw": list(frame_hw),
        "warmup_frames": warmup,
        "timed_frames": frames,
        "export_s": export_s,
        "export_mib": export_bytes / 2**20,
        "torch": {**stats(torch_frames), "components_ms": torch_components},
        "onnxruntime": {**stats(ort_frames), "components_ms": ort_components},
        "speedup_mean": float(np.mean(torch_frames) / np.mean(ort_frames)),
        "max_abs_audio_diff": float(np.abs(np.stack(ort_audio) - np.stack(torch_audio)).max()),
        "max_abs_audio": float(np.abs(np.stack(torch_audio)).max()),
        "ort_op_profile_ms": op_profile(directory, clip[: warmup + 5], threads, warmup),
    }
    shutil.rmtree(directory)  # the paper export is ~2 GB: gone as soon as it is measured
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# ONNX Runtime (CPU) vs eager torch, per frame",
        "",
        f"CPU: {report['cpu']} ({report['cores']} cores), torch {report['torch']} ({report['torch_threads']} threads),"
        f" onnxruntime {report['onnxruntime']} (threads: {report['ort_threads']}), fp32, batch 1, frames timed after"
        f" warm-up. {report['available_cores']} core(s) available to the process, OMP_NUM_THREADS="
        f"{report['omp_num_threads']}. Load average (1, 5, 15 min) before and after each preset: "
        + "; ".join(
            f"{p} {r['load_before']['load_average']} -> {r['load_after']['load_average']}"
            for p, r in report["presets"].items()
        )
        + ".",
        "",
        "| preset | frame | torch ms/frame (p50, p90) | ORT ms/frame (p50, p90) | speedup (mean) | audio diff |",
        "|---|---|---|---|---|---|",
    ]
    for preset, r in report["presets"].items():
        t, o = r["torch"], r["onnxruntime"]
        lines.append(
            f"| {preset} | {r['frame_hw'][0]}x{r['frame_hw'][1]} | {t['mean_ms']:.1f} ({t['p50_ms']:.1f}, "
            f"{t['p90_ms']:.1f}) | {o['mean_ms']:.1f} ({o['p50_ms']:.1f}, {o['p90_ms']:.1f}) | "
            f"{r['speedup_mean']:.2f}x | {r['max_abs_audio_diff']:.1e} of {r['max_abs_audio']:.1e} |"
        )
    for preset, r in report["presets"].items():
        lines += [
            "",
            f"## {preset}: mean ms per component",
            "",
            "| component | torch | ORT | ratio |",
            "|---|---|---|---|",
        ]
        for name in COMPONENTS:
            t, o = r["torch"]["components_ms"][name], r["onnxruntime"]["components_ms"][name]
            lines.append(f"| {name} | {t:.2f} | {o:.2f} | {t / o:.2f}x |")
        lines += [
            "",
            "ORT time by operator type (ms per frame, top 5 per graph, 5 profiled frames after warm-up):",
            "",
        ]
        for graph, ops in r["ort_op_profile_ms"].items():
            top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(ops.items())[:5])
            lines.append(f"- {graph}: {top}")
    if report.get("notes"):
        lines += ["", "## Notes", "", report["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,paper")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and ORT threads (default 1; 0: the libraries' defaults)"
    )
    parser.add_argument(
        "--workdir", default=tempfile.gettempdir(), help="where graphs are exported (not the repo)"
    )
    parser.add_argument("--notes", default="", help="text for the Notes section of the markdown")
    parser.add_argument("--out", default=str(ROOT / "perf" / "results" / "onnxruntime_cpu"))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="bench_onnxruntime_", dir=args.workdir))
    report = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ort_threads": args.threads or "one per physical core",
        "available_cores": available_cores(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "onnxruntime": ort.__version__,
        "presets": {},
        "notes": args.notes,
    }
    for preset in args.presets.split(","):
        print(f"{preset}: exporting and timing ...", flush=True)
        report["presets"][preset] = r = bench_preset(preset, args.warmup, args.frames, args.threads, workdir)
        print(
            f"{preset}: torch {r['torch']['mean_ms']:.1f} ms/frame, ORT {r['onnxruntime']['mean_ms']:.1f} ms/frame "
            f"({r['speedup_mean']:.2f}x), export {r['export_s']:.0f} s",
            flush=True,
        )
    workdir.rmdir()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
