"""Latency `soundreactor live --triton` adds against stepping in process, for the same model, backend and clients.

One after the other (never at once: they would share the cores), N synthetic clients at 30 fps (perf/
bench_live_capacity.py's) run for --seconds against:
* in process: `soundreactor live --backend torch --slots N`;
* relayed: `soundreactor serve` (tritonserver, a torch-backend repository with N slots, one thread) and
  `soundreactor live --triton 127.0.0.1:PORT --slots N`.
A frame's round trip runs from the client's send to its audio; the relay's cost is relayed minus in process, per
percentile. Writes perf/results/<name>.{json,md}.

    PYTHONPATH=. python perf/bench_live_triton.py
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perf.bench_live_capacity import LiveServer, encoded_frames, load_average, run_clients  # noqa: E402
from perf.common import machine, percentiles, save  # noqa: E402
from soundreactor.default_model import CHECKPOINT  # noqa: E402
from soundreactor.serving.params import ServingParams  # noqa: E402
from soundreactor.serving.repository import write_repository  # noqa: E402
from soundreactor.serving.server import TritonServer  # noqa: E402

HW = (56, 112)  # the default model's vision size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_trips(extra: list[str], streams: int, frames: list[bytes], seconds: float) -> dict:
    server = LiveServer(streams, extra)
    try:
        results = asyncio.run(run_clients(server.url, streams, frames, seconds))
    finally:
        server.stop()
    rt = [x for r in results for x in r["rt"]]
    return {
        "sent": sum(r["sent"] for r in results),
        "answered": sum(r["answered"] for r in results),
        "dropped": sum(r["dropped"] for r in results),
        "round_trip_ms": percentiles(rt),
        "step_ms": percentiles([x for r in results for x in r["steps"]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--name", default="live_triton_cpu")
    args = parser.parse_args()

    frames = encoded_frames(HW)
    size = f"{HW[0]}x{HW[1]}"
    common = ["--checkpoint", "default", "--frame-size", size, "--threads", "1"]
    report = {
        "machine": machine(),
        "load_before": load_average(),
        "streams": args.streams,
        "seconds": args.seconds,
    }
    report["in_process"] = round_trips(["--backend", "torch", *common], args.streams, frames, args.seconds)
    with tempfile.TemporaryDirectory() as folder:
        repo = Path(folder) / "repo"
        params = ServingParams(backend="torch", slots=args.streams, frame_hw=HW, checkpoint=str(CHECKPOINT))
        write_repository(repo, params)
        ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
        start = time.perf_counter()
        with TritonServer(repo, log=Path(folder) / "tritonserver.log", **ports) as triton:
            report["triton_start_s"] = round(time.perf_counter() - start, 1)
            relay = ["--triton", triton.grpc_url, "--slots", str(args.streams)]
            report["relayed"] = round_trips(relay, args.streams, frames, args.seconds)
    report["load_after"] = load_average()
    report["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    local, relayed = report["in_process"]["round_trip_ms"], report["relayed"]["round_trip_ms"]
    report["added_ms"] = {p: relayed[p] - local[p] for p in ("p50", "p90", "p99")}
    m = report["machine"]
    rows = []
    for name in ("in_process", "relayed"):
        r = report[name]
        rt, st = r["round_trip_ms"], r["step_ms"]
        rows.append(
            f"| {name.replace('_', ' ')} | {r['answered']}/{r['sent']} | {r['dropped']} | "
            f"{rt['p50']:.1f} / {rt['p90']:.1f} / {rt['p99']:.1f} | {st['p50']:.1f} |"
        )
    added = report["added_ms"]
    markdown = "\n".join(
        [
            "# `soundreactor live --triton`: latency added by relaying to Triton",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, shared (load average before {report['load_before']}, "
            f"after: `{report['uptime_after']}`). Default model (small preset), torch backend, 1 thread, "
            f"{args.streams} stream(s) at 30 fps for {args.seconds:g} s each, frames {size}; the client, the live "
            "server and tritonserver share the cores.",
            "",
            "| path | answered | dropped | round trip p50 / p90 / p99 ms | step p50 ms (as the live server saw it) |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Added by the relay: p50 {added['p50']:+.1f} ms, p90 {added['p90']:+.1f} ms, p99 {added['p99']:+.1f} ms.",
            "",
        ]
    )
    print(markdown)
    print(f"wrote {save(args.name, report, markdown)}")


if __name__ == "__main__":
    main()
