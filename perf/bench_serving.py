"""Latency added by serving: N concurrent streams paced at 30 fps through tritonserver vs the same `Streams` in process.

For each stream count N, in the same run and one after the other (never at once: they would share the cores):
* in process: the repository's own backend (`load_streams`, N slots) steps all N streams once per frame tick;
* served: a model repository with N slots, `tritonserver` on 127.0.0.1, N `StreamClient`s (gRPC bidirectional
  streams) in threads, each sending its frame at the same tick.
A frame's latency runs from its tick (when a camera would deliver it) to its audio, so a backend that falls behind
shows growing latency rather than a hidden queue. Serving's cost is served minus in-process, per percentile; the
largest N whose served p99 stays under 33.3 ms is the real-time stream count. Then one `perf_analyzer` run (its
own venv, not CI's; it needs libb64, `apt-get install libb64-0d`):

    python3 -m venv /tmp/pa && /tmp/pa/bin/pip install 'tritonclient[all]==2.51.0' nvidia-cuda-runtime-cu12
    python perf/bench_serving.py --perf-analyzer /tmp/pa/bin/perf_analyzer        # tiny preset on CPU
    python perf/bench_serving.py --device cuda --backend cuda-graph --streams 1,8,32   # on a GPU

Writes perf/results/serving_<device>.{json,md,png} (or under --out).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perf.common import RESULTS, machine, percentiles  # noqa: E402
from soundreactor.model.soundreactor import init_model  # noqa: E402
from soundreactor.serving.params import ServingParams, load_streams, reseed  # noqa: E402
from soundreactor.serving.repository import write_repository  # noqa: E402
from soundreactor.serving.server import ServerError, TritonServer, find_tritonserver  # noqa: E402

FPS = 30
BUDGET_MS = 1e3 / FPS
WARMUP_FRAMES = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def paced(frames: np.ndarray, step, t0: float) -> list[float]:
    """Step each frame at its 30 fps tick after t0; latency (ms) from the tick to the audio."""
    out = []
    for k, frame in enumerate(frames):
        due = t0 + k / FPS
        time.sleep(max(0.0, due - time.perf_counter()))
        step(frame)
        out.append((time.perf_counter() - due) * 1e3)
    return out[WARMUP_FRAMES:]


def in_process(params: ServingParams, device: str, clips: np.ndarray) -> list[float]:
    """clips [N, T, H, W, 3]: all N streams stepped together each tick."""
    streams = load_streams(params, device)
    for slot in range(params.slots):
        reseed(streams, slot, params.seed + slot)
    batches = clips.transpose(1, 0, 2, 3, 4)  # [T, N, H, W, 3]
    return paced(batches, streams.step, time.perf_counter() + 0.1)


def served(params: ServingParams, gpus: list[int] | None, clips: np.ndarray, workdir: Path, delay_us: int):
    """N client threads through a fresh server with N slots; returns (latencies ms, the running server)."""
    from soundreactor.serving.client import StreamClient

    repo = workdir / f"repo_{params.slots}"
    write_repository(repo, params, gpus=gpus, idle_timeout_s=10.0, queue_delay_us=delay_us)
    server = TritonServer(
        repo,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log=workdir / "server.log",
    )
    server.start(timeout_s=300)
    clients = [StreamClient(server.grpc_url, sequence_id=1000 + k, timeout_s=30) for k in range(len(clips))]
    for client, clip in zip(clients, clips, strict=True):  # START outside the timed ticks
        client.step(clip[0])
    results: list[list[float]] = [[] for _ in clients]
    t0 = time.perf_counter() + 0.2

    def run(k: int) -> None:
        results[k] = paced(clips[k][1:-1], clients[k].step, t0)
        clients[k].step(clips[k][-1], end=True)  # untimed: frees the slot at once

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for client in clients:
        client.close()
    return [x for r in results for x in r], server


def perf_analyzer(binary: Path, server: TritonServer, streams: int, hw: tuple[int, int], out: Path) -> dict:
    """One perf_analyzer run: `streams` concurrent sequences of 30 frames on gRPC streaming, as fast as served."""
    libs = list(binary.resolve().parents[1].glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": ":".join([*map(str, libs), os.environ.get("LD_LIBRARY_PATH", "")]),
    }
    report = out.with_suffix(".csv")
    args = [str(binary), "-m", "soundreactor", "-u", server.grpc_url, "-i", "grpc", "--streaming",
            "--sequence-length", "30", "--sequence-id-range", "5000:6000", "--concurrency-range", str(streams),
            "--shape", f"FRAME:{hw[0]},{hw[1]},3", "--measurement-interval", "4000", "--percentile", "99",
            "--stability-percentage", "100", "--max-trials", "4",
            "-f", str(report)]  # fmt: skip
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    if run.returncode != 0:
        return {"error": (run.stdout + run.stderr)[-1500:], "command": " ".join(args)}
    row = next(csv.DictReader(report.open()))
    return {
        "concurrency": streams,
        "throughput_fps": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1e3,
        "p99_ms": float(row["p99 latency"]) / 1e3,
        "server_queue_ms": float(row["Server Queue"]) / 1e3,
        "server_compute_ms": float(row["Server Compute Infer"]) / 1e3,
        "command": " ".join(args[:1] + [a if a != str(report) else "report.csv" for a in args[1:]]),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    n = [p["streams"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("in_process", "--"), ("served", "-")):
        for q, marker in (("p50", "o"), ("p99", "s")):
            ax.plot(
                n, [p[key][q] for p in points], style, marker=marker, label=f"{key.replace('_', '-')} {q}"
            )
    ax.axhline(BUDGET_MS, color="gray", lw=1, ls=":", label="33.3 ms (30 fps)")
    ax.set(xlabel="concurrent streams", ylabel="per-frame latency (ms)", xticks=n, yscale="log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(f"{result['preset']} preset, {result['backend']} on {result['device_name']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    rows = [
        f"| {p['streams']} | {p['in_process']['p50']:.1f} | {p['in_process']['p99']:.1f} | {p['served']['p50']:.1f} "
        f"| {p['served']['p99']:.1f} | {p['added_p50_ms']:+.1f} | {p['added_p99_ms']:+.1f} |"
        for p in result["points"]
    ]
    pa = result.get("perf_analyzer") or {}
    if "throughput_fps" in pa:
        pa_text = (
            f"`perf_analyzer` (gRPC streaming, {pa['concurrency']} concurrent sequences of 30 frames, unpaced): "
            f"{pa['throughput_fps']:.1f} frames/s, p50 {pa['p50_ms']:.1f} ms, p99 {pa['p99_ms']:.1f} ms "
            f"(server queue {pa['server_queue_ms']:.1f} ms, compute {pa['server_compute_ms']:.1f} ms per request)."
        )
    else:
        pa_text = f"`perf_analyzer`: not run ({pa.get('error', 'no --perf-analyzer given')[-300:]})."
    m = result["machine"]
    added = {q: np.median([p[f"added_{q}_ms"] for p in result["points"]]) for q in ("p50", "p99")}
    return f"""# Serving: tritonserver vs in process ({result["device_name"]})

{result["preset"]} preset, {result["frame_hw"][0]}x{result["frame_hw"][1]} frames, NFE {result["nfe"]}, backend
`{result["backend"]}`, {result["frames"]} frames per stream at 30 fps ({WARMUP_FRAMES} warm-up frames dropped).
Latency: from a frame's 30 fps tick to its audio, in ms. In process: one `Streams` with N slots stepped per tick.
Served: tritonserver {result["server"]} on 127.0.0.1, one model instance with N slots, queue delay
{result["queue_delay_us"]} us, and N `StreamClient`s (gRPC bidirectional streams) sending on the same ticks.
Machine: {m["cpu"]}, {m["cores"]} cores.

{result["note"]}

| streams | in-process p50 | in-process p99 | served p50 | served p99 | added p50 | added p99 |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Serving added {added["p50"]:+.1f} ms at p50 and {added["p99"]:+.1f} ms at p99 (medians over the stream counts).
Largest stream count in real time (p99 under 33.3 ms): served {result["max_realtime_served"]}, in process
{result["max_realtime_in_process"]}.

{pa_text}

![latency vs streams]({result["png"]})
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--frame-size", default="240x426")
    parser.add_argument("--nfe", type=int, default=4)
    parser.add_argument("--streams", default="1,2,3,4")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed audio per stream and point")
    parser.add_argument("--backend", default="torch", choices=("torch", "cuda-graph"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (served: one instance on GPU 0)")
    # the clients send on one clock, so waiting for every slot's frame makes one step per tick, as in process
    parser.add_argument("--queue-delay-us", type=int, default=10000)
    parser.add_argument("--perf-analyzer", type=Path, help="perf_analyzer binary (tritonclient 2.51.0 venv)")
    parser.add_argument("--note", default="", help="a line for the report, e.g. what else ran on the machine")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--dry-run", action="store_true", help="tiny frames, 1-2 streams, a few frames")
    args = parser.parse_args()
    if args.dry_run:  # on CPU, whatever the device: checks the plumbing, measures nothing
        args.frame_size, args.streams, args.seconds, args.nfe = "28x42", "1,2", 0.5, 1
        args.device, args.backend = "cpu", "torch"
    try:
        binary, _ = find_tritonserver()
        import tritonclient.grpc  # noqa: F401
    except (ServerError, ImportError) as err:
        print(f"serving benchmark skipped: {err}")
        return
    hw = tuple(int(x) for x in args.frame_size.split("x"))
    counts = [int(n) for n in args.streams.split(",")]
    device = "cuda:0" if args.device == "cuda" else "cpu"
    gpus = [0] if args.device == "cuda" else None
    frames = WARMUP_FRAMES + round(args.seconds * FPS)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"serving_{'dryrun' if args.dry_run else args.device}"
    work = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    checkpoint = work / f"{args.preset}.safetensors"
    init_model(args.preset, seed=0, input_hw=hw)[0].save(checkpoint)
    version = (
        subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout.strip() or "2.51"
    )
    result: dict = {
        "preset": args.preset, "frame_hw": hw, "nfe": args.nfe, "backend": args.backend, "frames": frames,
        "queue_delay_us": args.queue_delay_us, "machine": machine(), "server": version.splitlines()[-1],
        "device_name": (machine().get("gpu") if args.device == "cuda" else None) or "CPU", "note": args.note,
        "png": f"{name}.png", "points": [],
    }  # fmt: skip
    rng = np.random.default_rng(0)
    for n in counts:
        params = ServingParams(backend=args.backend, slots=n, frame_hw=hw, checkpoint=str(checkpoint), nfe=args.nfe,
                               seed=0, seed_policy="slot", dtype="bf16", vae_dtype="fp32")  # fmt: skip
        clips = rng.integers(0, 256, (n, frames + 2, *hw, 3), dtype=np.uint8)  # served: START + timed + END
        local = percentiles(in_process(params, device, clips[:, 1:-1]))
        latencies, server = served(params, gpus, clips, work, args.queue_delay_us)
        if args.perf_analyzer and n == counts[-1]:  # on the largest server, once the paced run is over
            result["perf_analyzer"] = perf_analyzer(args.perf_analyzer, server, n, hw, work / "pa")
        server.stop()
        remote = percentiles(latencies)
        point = {"streams": n, "in_process": local, "served": remote,
                 "added_p50_ms": remote["p50"] - local["p50"], "added_p99_ms": remote["p99"] - local["p99"]}  # fmt: skip
        result["points"].append(point)
        print(f"{n} streams: in process p50 {local['p50']:.1f} / p99 {local['p99']:.1f} ms, served p50 "
              f"{remote['p50']:.1f} / p99 {remote['p99']:.1f} ms", flush=True)  # fmt: skip
    ok = lambda key: [p["streams"] for p in result["points"] if p[key]["p99"] < BUDGET_MS]
    result["max_realtime_served"] = max(ok("served"), default=0)
    result["max_realtime_in_process"] = max(ok("in_process"), default=0)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(result))
    plot(result, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json, .md and .png")


if __name__ == "__main__":
    main()
