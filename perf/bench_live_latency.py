"""The live page's latency: one stream, the default model, headless Chromium with a fake camera, for a minute.

    python perf/bench_live_latency.py [--seconds 60] [--backend onnxruntime] [--triton] [--screenshot docs/live.png]

Starts `soundreactor live --slots 1` (in process, and with --triton also relayed through a `soundreactor serve`
of the same checkpoint), opens the page in Debian's chromium with the camera faked from the demo scene, and reads
the page's own figures (window.soundreactorLive): latency from a frame grabbed on the page to its first audio
sample played by the AudioWorklet (the speaker adds its own output latency after that), underruns once audio
started, drift (latency over the first 5 s against the last 5 s). Writes perf/results/<name>.json/.md/.png.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import RESULTS, machine, percentiles, save
from playwright.sync_api import sync_playwright

from soundreactor.demo_video import demo_frames, write_y4m

REPO = Path(__file__).resolve().parents[1]
SOUNDREACTOR = [sys.executable, "-m", "soundreactor"]
CAMERA_HW = (360, 640)
TRITON_HW = "56x112"  # the default model's vision size: the frames `soundreactor live` asks the page for
FLAGS = [
    "--no-sandbox",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]


def start(command: list[str], pattern: str, timeout_s: float = 600) -> tuple[subprocess.Popen, re.Match]:
    """Run a soundreactor command until a line of its output matches `pattern`."""
    process = subprocess.Popen(
        [*SOUNDREACTOR, *command],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            seen.append(lines.get(timeout=0.5))
        except queue.Empty:
            continue
        if found := re.search(pattern, seen[-1]):
            return process, found
    process.kill()
    raise RuntimeError(f"`soundreactor {' '.join(command)}` never printed {pattern!r}: {''.join(seen)}")


def free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as held:  # all bound at once, so they differ
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def stop(process: subprocess.Popen) -> None:
    process.terminate()  # SIGTERM is a Ctrl-C to the CLI (SIGINT may be ignored in a background job)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def load_average() -> str:
    return ", ".join(Path("/proc/loadavg").read_text().split()[:3])


def measure(url: str, server_pid: int, clip: Path, seconds: float, screenshot: Path | None) -> dict:
    """Stream the fake camera through the page for `seconds` after its first audio; the page's figures."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"),
            ignore_default_args=["--mute-audio"],
            args=[*FLAGS, f"--use-file-for-fake-video-capture={clip}"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{url}?source=camera&autostart=1")
        page.wait_for_function("window.soundreactorLive.stats().chunksReceived > 0", timeout=120_000)
        began, cpu_began = time.monotonic(), cpu_seconds(server_pid)
        time.sleep(seconds)
        cpu = (cpu_seconds(server_pid) - cpu_began) / (time.monotonic() - began)
        history = page.evaluate("window.soundreactorLive.history()")
        stats = page.evaluate("window.soundreactorLive.stats()")
        if screenshot:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.locator("body").screenshot(path=str(screenshot))  # the page's content, no empty margin
        page.evaluate("window.soundreactorLive.stop()")
        browser.close()
    return {"history": history, "stats": stats, "server_cores": cpu}


def summarize(run: dict, seconds: float) -> dict:
    t, latency = np.asarray(run["history"], dtype=np.float64).T
    t = (t - t[0]) / 1000
    first, last = latency[t < 5], latency[t >= t[-1] - 5]
    stats = run["stats"]
    return {
        "latency_ms": percentiles(latency),
        "first_5s_p50_ms": float(np.median(first)),
        "last_5s_p50_ms": float(np.median(last)),
        "drift_ms": float(np.median(last) - np.median(first)),
        "underruns": stats["underruns"],
        "frames_sent": stats["framesSent"],
        "chunks_received": stats["chunksReceived"],
        "dropped_frames": stats["droppedFrames"],
        "server_dropped": stats["serverDropped"],
        "trimmed_audio_ms": stats["trimmedMs"],
        "round_trip_ms": stats["roundTripMs"],
        "server_step_ms": stats["stepMs"],
        "cushion_ms": stats["cushionMs"],
        "server_cores": run["server_cores"],
        "seconds": seconds,
        "series": [t.round(3).tolist(), latency.round(2).tolist()],
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    for label, summary in results["runs"].items():
        t, latency = summary["series"]
        ax.plot(t, latency, lw=0.8, label=f"{label}: p50 {summary['latency_ms']['p50']:.0f} ms")
    ax.axhline(60, color="gray", ls="--", lw=0.8, label="target p50 60 ms")
    ax.set_xlabel("seconds since the first audio")
    ax.set_ylabel("frame grabbed -> audio played (ms)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("soundreactor live: one stream, default model, headless Chromium, 2 CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(results: dict, name: str) -> str:
    m = results["machine"]
    lines = [
        "# Live page latency (CPU)",
        "",
        f"One stream of the default model (`soundreactor live --slots 1 --threads 1`, backends below), the page in headless Debian chromium (Playwright) with the camera faked from the demo "
        f"scene ({CAMERA_HW[1]}x{CAMERA_HW[0]} Y4M), {results['seconds']:g} s after the first audio.",
        "Latency: from a frame grabbed on the page to its first audio sample played by the AudioWorklet: the time "
        "to its audio's arrival on the page's clock plus the wait in the worklet counted in audio frames (the "
        "speaker's output latency comes after it). Drift: median latency over "
        "the first 5 s against the last 5 s.",
        f"Machine: {m['cpu']}, {m['cores']} cores, shared with other work: load average {results['load_before']} "
        f"before, {results['load_after']} after (1, 5, 15 min). Browser, server and model all on these 2 cores.",
        "",
        "| run | p50 ms | p90 ms | p99 ms | first 5 s | last 5 s | drift | underruns | dropped | round trip p50 "
        "| server step p50 | server cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, s in results["runs"].items():
        lat = s["latency_ms"]
        lines.append(
            f"| {label} | {lat['p50']:.1f} | {lat['p90']:.1f} | {lat['p99']:.1f} | {s['first_5s_p50_ms']:.1f} | "
            f"{s['last_5s_p50_ms']:.1f} | {s['drift_ms']:+.1f} | {s['underruns']} | {s['dropped_frames']} of "
            f"{s['frames_sent']} | {s['round_trip_ms']['p50']:.1f} | {s['server_step_ms']['p50']:.1f} | "
            f"{s['server_cores']:.2f} |"
        )
    runs = results["runs"]
    backend = results["backend"]
    if f"triton, {backend}" in runs:
        triton, local = runs[f"triton, {backend}"], runs[f"in process, {backend}"]
        trip = triton["round_trip_ms"]["p50"] - local["round_trip_ms"]["p50"]
        added = triton["latency_ms"]["p50"] - local["latency_ms"]["p50"]
        lines += [
            "",
            f"`--triton` (tritonserver 2.51 on this machine, {backend}, one slot, runs one after the other) adds "
            f"{trip:+.1f} ms to the round trip at p50 (the relay's gRPC hop and Triton's batcher); the end-to-end "
            f"p50 differs by {added:+.1f} ms, which also carries each run's cushion history. The triton row's "
            "server cores count the relay only, not tritonserver.",
        ]
    lines += [
        "",
        "Targets (issue 19): p50 <= 60 ms, p90 <= 80 ms, 0 underruns in 60 s, drift within 5 ms.",
        "",
        f"![latency over time]({name}.png)",
        "",
    ]
    if results.get("notes"):
        lines += [*results["notes"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--backend", default="onnxruntime", choices=("torch", "onnxruntime"))
    parser.add_argument("--triton", action="store_true", help="also relay through a `soundreactor serve`")
    parser.add_argument("--name", default="live_latency_cpu")
    parser.add_argument("--screenshot", type=Path, help="save the page at the end of the in-process run")
    parser.add_argument("--note", action="append", default=[], help="a line for the report (how to read it)")
    args = parser.parse_args()

    results = {
        "machine": machine(),
        "backend": args.backend,
        "seconds": args.seconds,
        "load_before": load_average(),
        "runs": {},
        "notes": args.note,
    }
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_y4m(Path(tmp) / "clip.y4m", demo_frames(240, CAMERA_HW))
        live = ["live", "--port", "0", "--slots", "1", "--threads", "1"]
        server, found = start([*live, "--backend", args.backend], r"open (http\S+)")
        try:
            run = measure(found.group(1), server.pid, clip, args.seconds, args.screenshot)
        finally:
            stop(server)
        results["runs"][f"in process, {args.backend}"] = summarize(run, args.seconds)
        if args.triton:
            # The same checkpoint and backend, one slot, served by tritonserver; the page's frames go through
            # `soundreactor live --triton` (one gRPC stream per page).
            checkpoint = REPO / "soundreactor" / "assets" / "default_small.safetensors"
            engines, repo = Path(tmp) / "engines", Path(tmp) / "repo"
            source = ["--checkpoint", str(checkpoint)]
            if args.backend == "onnxruntime":
                subprocess.run([*SOUNDREACTOR, "export", *source, "--out", str(engines), "--slots", "1",
                                "--frame-size", TRITON_HW], cwd=REPO, check=True)  # fmt: skip
                source = ["--engines", str(engines)]
            subprocess.run(
                [*SOUNDREACTOR, "triton-repo", "--out", str(repo), *source, "--backend", args.backend,
                 "--slots", "1", "--frame-size", TRITON_HW],
                cwd=REPO, check=True,
            )  # fmt: skip
            http, grpc, metrics = free_ports(3)
            ports = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
            serve, _ = start(["serve", "--repo", str(repo), *ports], r"^serving ")
            try:
                relay, found = start([*live, "--triton", f"127.0.0.1:{grpc}"], r"open (http\S+)")
                try:
                    run = measure(found.group(1), relay.pid, clip, args.seconds, None)
                finally:
                    stop(relay)
            finally:
                stop(serve)
            results["runs"][f"triton, {args.backend}"] = summarize(run, args.seconds)
    results["load_after"] = load_average()
    plot(results, RESULTS / f"{args.name}.png")
    print(save(args.name, results, markdown(results, args.name)).read_text())


if __name__ == "__main__":
    main()
