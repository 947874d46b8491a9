"""Live server capacity: synthetic WebSocket clients at 30 fps each against `soundreactor live`, ramping the count.

For each stream count N in --streams, one after the other: start `soundreactor live --slots N` (a subprocess: the
real command, with its default model and backend unless told otherwise), connect N clients (aiohttp, in this
process) that each send a pre-encoded JPEG frame of a synthetic scene every 33.3 ms on their own clock (starts
staggered over one frame period, as independent cameras are), for --seconds. A frame's round trip runs from its
send to its audio arriving. N streams are *real time* when every frame sent gets its audio: none dropped (the
server drops a frame that waited over 100 ms, --max-lag-ms, or that overflows its 4-frame queue, so latency cannot
build up unseen); the capacity is the largest real-time N. Round-trip percentiles are reported beside it. Each N is also run with `--record DIR` right after, for recording's cost side by side, and the
recorder's own encoding time is timed alone (ms per frame).

    PYTHONPATH=. python perf/bench_live_capacity.py                       # default model, 2 CPU cores
    PYTHONPATH=. python perf/bench_live_capacity.py --streams 1,8,16,32 --name live_capacity_gpu   # on a GPU

Writes perf/results/<name>.{json,md}. State the load: the figures are only as good as the machine's quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from PIL import Image  # noqa: E402

from perf.common import machine, percentiles, save  # noqa: E402
from soundreactor.live import protocol  # noqa: E402
from soundreactor.live.recorder import Recorder  # noqa: E402
from soundreactor.training.synthetic import make_clip  # noqa: E402

PERIOD_S = 1 / protocol.FPS


def encoded_frames(hw: tuple[int, int], count: int = 90) -> list[bytes]:
    """A synthetic scene's frames (moving, colliding shapes) as the page would send them: JPEG at quality 80."""
    out = []
    for frame in make_clip(0, count, hw=hw).frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=80)
        out.append(buffer.getvalue())
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (/proc/PID/stat fields 14 and 15, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class LiveServer:
    """`soundreactor live` in a subprocess on a free port; the URL is read from its ready line."""

    def __init__(self, slots: int, extra: list[str]) -> None:
        command = [sys.executable, "-m", "soundreactor", "live", "--port", "0", "--slots", str(slots), *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        self.url = ""
        for line in self.process.stdout:
            if line.startswith("open "):
                self.url = line.split()[1]
                break
        if not self.url:
            raise RuntimeError(f"soundreactor live exited with {self.process.wait()} before it was ready")

    def stop(self) -> None:
        self.process.terminate()  # stops like Ctrl-C: the recordings are finished and renamed
        self.process.wait(timeout=60)


async def client(session, url: str, frames: list[bytes], seconds: float, delay: float) -> dict:
    ws = await session.ws_connect(url + "ws")
    await ws.send_json({"type": "hello", "protocol": protocol.PROTOCOL})
    ready = await ws.receive_json()
    if ready["type"] != "ready":
        await ws.close()
        return {"refused": ready}
    sent: dict[int, float] = {}
    round_trips, steps = [], []
    counts = {"dropped": 0, "behind": 0, "error": 0}

    async def receive() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                seq, step_ms, _ = protocol.unpack_audio(msg.data)
                round_trips.append((time.perf_counter() - sent.pop(seq)) * 1e3)
                steps.append(step_ms)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                kind = msg.json()["type"]
                counts[kind] = counts.get(kind, 0) + 1
                if kind == "dropped":
                    sent.pop(msg.json()["seq"], None)

    receiver = asyncio.create_task(receive())
    loop = asyncio.get_running_loop()
    start = loop.time() + delay
    total = round(seconds * protocol.FPS)
    for k in range(total):
        await asyncio.sleep(max(0.0, start + k * PERIOD_S - loop.time()))
        sent[k] = time.perf_counter()
        await ws.send_bytes(protocol.SEQ.pack(k) + frames[k % len(frames)])
    for _ in range(100):  # answers still on their way: at most 1 s more
        if not sent:
            break
        await asyncio.sleep(0.01)
    lost = len(sent)
    await ws.send_json({"type": "stop"})
    await ws.close()
    receiver.cancel()
    return {
        "sent": total,
        "answered": len(round_trips),
        "lost": lost,
        **counts,
        "rt": round_trips,
        "steps": steps,
    }


async def run_clients(url: str, streams: int, frames: list[bytes], seconds: float) -> list[dict]:
    async with aiohttp.ClientSession() as session:
        delays = [k * PERIOD_S / streams for k in range(streams)]
        return await asyncio.gather(*(client(session, url, frames, seconds, d) for d in delays))


def measure(streams: int, extra: list[str], frames: list[bytes], seconds: float) -> dict:
    server = LiveServer(streams, extra)
    try:
        cpu0, wall0 = cpu_seconds(server.process.pid), time.perf_counter()
        results = asyncio.run(run_clients(server.url, streams, frames, seconds))
        cores = (cpu_seconds(server.process.pid) - cpu0) / (time.perf_counter() - wall0)
        load = load_average()
    finally:
        server.stop()
    refused = [r["refused"] for r in results if "refused" in r]
    if refused:
        raise RuntimeError(f"streams refused: {refused}")
    rt = [x for r in results for x in r["rt"]]
    row = {
        "streams": streams,
        "sent": sum(r["sent"] for r in results),
        "answered": sum(r["answered"] for r in results),
        "dropped": sum(r["dropped"] for r in results),
        "behind": sum(r["behind"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "round_trip_ms": percentiles(rt) if rt else None,
        "step_ms": percentiles([x for r in results for x in r["steps"]]) if rt else None,
        "server_cores": round(cores, 2),
        "load_after": load,
    }
    row["real_time"] = row["answered"] == row["sent"] and row["dropped"] == row["behind"] == 0
    return row


def recorder_ms_per_frame(hw: tuple[int, int], frames: int = 300) -> dict[str, float]:
    """The recorder's encode + mux cost per frame (FFV1 video, float PCM audio) of a synthetic scene, timed alone:
    CPU time (what it takes from the cores, any codec threads included) and wall time (inflated by other load)."""
    clip = make_clip(1, 30, hw=hw).frames
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 1600)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(1) as worker:
        recorder = Recorder(Path(folder), "bench", {}, 48000, worker)
        recorder._write(clip[0], audio)  # opens the file; then the worker's job, timed in this thread
        cpu, wall = time.process_time(), time.perf_counter()
        for k in range(frames):
            recorder._write(clip[k % len(clip)], audio)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        recorder.finish().result()
    return {"cpu_ms": cpu / frames * 1e3, "wall_ms": wall / frames * 1e3}


def step_cpu_ms(slots: int, frames: list[bytes], steps: int = 60) -> dict[str, float]:
    """The default model's step over `slots` streams, all active, on the live command's default CPU backend
    (onnxruntime, one thread), in this process's CPU time: what the step costs the cores,
    whatever else the machine runs. Frames are the clients' JPEGs, decoded as the server does."""
    from contextlib import ExitStack

    from soundreactor.live.engines import build_streams, checkpoint_path
    from soundreactor.live.frames import JpegDecoder

    decoder = JpegDecoder((56, 112))
    pictures = [decoder.decode(f) for f in frames[:slots]]
    batch = np.stack([pictures[k % len(pictures)] for k in range(slots)])
    with ExitStack() as resources:
        streams = build_streams(
            checkpoint_path("default"), "onnxruntime", slots, 0, None, 1, resources, note=lambda _: None
        )
        streams.step(batch)  # first run: allocations
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(steps):
            streams.step(batch)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"slots": slots, "cpu_ms": cpu / steps * 1e3, "wall_ms": wall / steps * 1e3}


def estimate(report: dict) -> None:
    """Streams one model core keeps up with, from the step's CPU time: each frame stepping alone (30 N steps of
    step(N) a second), or all N batched into one step per frame period (30 steps a second)."""
    rows = report["step_cpu"]
    report["idle_estimate_unbatched"] = max(
        [r["slots"] for r in rows if 30 * r["slots"] * r["cpu_ms"] < 1e3] or [0]
    )
    report["idle_estimate_batched"] = max([r["slots"] for r in rows if 30 * r["cpu_ms"] < 1e3] or [0])


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Live server capacity: {report['backend']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, shared (load average before: {report['load_before']}; "
        f"`uptime` after: {report['uptime_after']}). Server `{report['command']}` with --threads "
        f"{report['threads']}; {report['seconds']} s per point; clients in the benchmark's process on the same "
        "cores.",
        "",
        "Real time: every frame answered, none dropped (a frame waiting over 100 ms is dropped as `behind`, so "
        "latency cannot build up unseen).",
        "",
        "| streams | record | sent | answered | dropped | round trip p50 / p90 / p99 ms | step p50 ms | server cores "
        "| server CPU ms per frame | real time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        rt, st = row["round_trip_ms"], row["step_ms"]
        lines.append(
            f"| {row['streams']} | {'on' if row['record'] else 'off'} | {row['sent']} | {row['answered']} | "
            f"{row['dropped']} | {rt['p50']:.1f} / {rt['p90']:.1f} / {rt['p99']:.1f} | {st['p50']:.1f} | "
            f"{row['server_cores']} | {row['server_cores'] * 1e3 / (protocol.FPS * row['streams']):.1f} | "
            f"{'yes' if row['real_time'] else 'no'} |"
        )
    lines += [
        "",
        f"**Capacity: {report['capacity']} concurrent real-time streams** (recording off; "
        f"{report['capacity_recording']} with --record).",
        "",
        "Recording's own cost per frame, timed alone (encode FFV1 + float PCM, mux; CPU time, and wall time under "
        "the load above): "
        + ", ".join(
            f"{hw}: {t['cpu_ms']:.2f} ms CPU, {t['wall_ms']:.2f} ms wall"
            for hw, t in report["record_ms_per_frame"].items()
        )
        + ". It runs on its own thread beside the model's, not inside a step.",
        "",
    ]
    if report.get("step_cpu"):
        lines += [
            "The model's step alone (onnxruntime, one thread, all slots active), in process CPU time, which other "
            "load does not inflate the way it inflates wall time:",
            "",
            "| slots | step CPU ms | per stream | wall ms (under the load above) |",
            "|---|---|---|---|",
            *(
                f"| {r['slots']} | {r['cpu_ms']:.1f} | {r['cpu_ms'] / r['slots']:.1f} | {r['wall_ms']:.1f} |"
                for r in report["step_cpu"]
            ),
            "",
            "A step costs its whole slot count whether or not every slot has a frame (the exported graphs have "
            "a fixed batch). Out-of-phase streams share a step when one's frame arrives within the batch wait of "
            "another's, or while a step runs (it then joins the next). One model thread (one core) keeps up while "
            "the steps fit a second: the estimates from CPU time on idle cores run from "
            f"**{report['idle_estimate_unbatched']} streams** if no two frames ever shared a step (30 N step(N) "
            f"< 1 s: a floor) to **{report['idle_estimate_batched']} streams** if all N always do (30 step(N) < 1 s: "
            "what --batch-wait-ms 33 approaches, for up to 33 ms more latency). Estimates, not measurements: the "
            "sockets, JPEG decoding and the clients take their share of the second core.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", default="1,2,3,4,6,8", help="stream counts to try, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", help="default: the command's own")
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--frame-size", default="56x112", help="the default model's vision size")
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="the server's wait for other streams' frames (its default 5)",
    )
    parser.add_argument("--name", default="live_capacity_cpu")
    parser.add_argument(
        "--step-slots",
        default="1,2,3,4,6,8",
        help="slot counts to time the default model's step at ('' skips)",
    )
    args = parser.parse_args()

    h, w = (int(x) for x in args.frame_size.split("x"))
    extra = ["--checkpoint", args.checkpoint, "--threads", str(args.threads), "--frame-size", args.frame_size,
             "--batch-wait-ms", f"{args.batch_wait_ms:g}"]  # fmt: skip
    if args.backend:
        extra += ["--backend", args.backend]
    frames = encoded_frames((h, w))
    report = {
        "machine": machine(),
        "load_before": load_average(),
        "backend": args.backend or "the default (onnxruntime on CPU, cuda-graph on a GPU)",
        "command": "soundreactor live " + " ".join(extra),
        "threads": args.threads,
        "seconds": args.seconds,
        "rows": [],
    }
    for streams in (int(s) for s in args.streams.split(",")):
        for record in (False, True):
            with tempfile.TemporaryDirectory() as folder:
                row = measure(streams, extra + (["--record", folder] if record else []), frames, args.seconds)
            row["record"] = record
            report["rows"].append(row)
            rt = row["round_trip_ms"]
            print(
                f"{streams} streams, record {'on' if record else 'off'}: {row['answered']}/{row['sent']} answered, "
                f"{row['dropped']} dropped, round trip p50 {rt['p50']:.1f} p99 {rt['p99']:.1f} ms, server "
                f"{row['server_cores']} cores, real time: {row['real_time']}",
                flush=True,
            )
        if not report["rows"][-2]["real_time"]:
            break  # past the capacity: more streams only fall further behind
    report["capacity"] = max(
        [r["streams"] for r in report["rows"] if r["real_time"] and not r["record"]] or [0]
    )
    report["capacity_recording"] = max(
        [r["streams"] for r in report["rows"] if r["real_time"] and r["record"]] or [0]
    )
    report["record_ms_per_frame"] = {
        f"{a}x{b}": recorder_ms_per_frame((a, b)) for a, b in ((h, w), (480, 854))
    }
    if args.step_slots:
        report["step_cpu"] = [step_cpu_ms(int(n), frames) for n in args.step_slots.split(",")]
        estimate(report)
    report["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"wrote {save(args.name, report, markdown(report))}")


if __name__ == "__main__":
    main()
