"""`soundreactor live`'s server with synthetic WebSocket clients (aiohttp's ClientSession) on a real socket.

The model is the tiny preset with random weights on the torch backend. Expected audio comes from the same
`TorchStreams` stepped directly in the test on frames decoded from the same JPEG bytes with PyAV's image reader
(not the server's decoder). Batched rows are computed independently of the other slots' content, and a slot's
noise is seeded seed + slot, so a stream's audio must equal that reference up to fp32 rounding: ATOL.
The Triton relay is tested over a fake StreamClient (its lane logic, END on close) and once through a real
tritonserver (skipped where it is not installed; CI installs it).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

aiohttp = pytest.importorskip("aiohttp", reason="soundreactor live needs aiohttp: pip install '.[live]'")
from aiohttp.test_utils import TestServer  # noqa: E402

from soundreactor.live import protocol  # noqa: E402
from soundreactor.live.relay import TritonRelay  # noqa: E402
from soundreactor.live.server import create_app  # noqa: E402
from soundreactor.live.slots import SlotStepper  # noqa: E402
from soundreactor.model.soundreactor import init_model  # noqa: E402
from soundreactor.runtime.session import Session  # noqa: E402
from soundreactor.runtime.torch_backend import TorchStreams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HW = (28, 42)
SEED = 3
# audio peaks ~0.2 (tiny preset, random weights): fp32 rounding (~1e-8 relative) in another batch composition, with
# room for a different GEMM blocking, and orders below a wrong frame or seed (differences ~1e-2)
ATOL = 1e-6
INFO = {"backend": "torch", "checkpoint": "tiny.safetensors", "checkpoint_path": None}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("live") / "tiny.safetensors"
    init_model("tiny", seed=0, input_hw=HW)[0].save(path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    from soundreactor.model.soundreactor import SoundReactor

    return SoundReactor.load(checkpoint, input_hw=HW)


def make_frames(count: int, seed: int, hw: tuple[int, int] = HW) -> list[np.ndarray]:
    """Smooth moving colour fields: JPEG keeps them close, and each frame differs from the last."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: hw[0], : hw[1]] / max(hw)
    frames = []
    for k in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        rgb = [np.sin(4 * x + 3 * y + phase[c] + k) for c in range(3)]
        frames.append(np.rint(127.5 + 120 * np.stack(rgb, -1)).astype(np.uint8))
    return frames


def jpeg(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def decoded(data: bytes, hw: tuple[int, int] | None = None) -> np.ndarray:
    """What a JPEG decodes to, read as an image file (PyAV's image2 demuxer), independently of the server; with
    `hw`, scaled from the decoded picture the way `soundreactor run` scales video frames (media._to_rgb)."""
    with av.open(io.BytesIO(data), format="image2pipe") as container:
        frame = next(container.decode(video=0))
        if hw is None:
            return frame.to_ndarray(format="rgb24")
        return frame.to_ndarray(format="rgb24", width=hw[1], height=hw[0], interpolation="AREA")


def reference(model, frames: list[np.ndarray], slot: int = 0, slots: int = 2) -> list[np.ndarray]:
    """Audio of `frames` stepped alone in `slot` of a fresh `slots`-slot backend seeded SEED."""
    streams = TorchStreams(model, slots=slots, seed=SEED)
    active = np.zeros(slots, bool)
    active[slot] = True
    out = []
    for frame in frames:
        batch = np.zeros((slots, *HW, 3), np.uint8)
        batch[slot] = frame
        out.append(streams.step(batch, active)[slot])
    return out


@asynccontextmanager
async def live(engine, record: Path | None = None, info: dict = INFO):
    server = TestServer(create_app(engine, info, record))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield server, session
    finally:
        await server.close()


def stepper(model, slots: int = 2, **options) -> SlotStepper:
    return SlotStepper(TorchStreams(model, slots=slots, seed=SEED), SEED, **options)


async def connect(server, session, hello: dict | None = None):
    ws = await session.ws_connect(server.make_url("/ws"))
    await ws.send_json(hello or {"type": "hello", "protocol": protocol.PROTOCOL})
    return ws, await ws.receive_json()


async def next_event(ws) -> tuple[str, object]:
    """("audio", (seq, audio)) or (type, message dict)."""
    msg = await ws.receive(timeout=30)
    if msg.type == aiohttp.WSMsgType.BINARY:
        seq, step_ms, audio = protocol.unpack_audio(msg.data)
        assert step_ms > 0
        return "audio", (seq, audio)
    if msg.type == aiohttp.WSMsgType.TEXT:
        parsed = json.loads(msg.data)
        return parsed["type"], parsed
    return "closed", msg


async def step(ws, seq: int, data: bytes) -> np.ndarray:
    """Send one frame and wait for its audio (lockstep: nothing queues, nothing is dropped)."""
    await ws.send_bytes(protocol.SEQ.pack(seq) + data)
    kind, value = await next_event(ws)
    assert kind == "audio", value
    assert value[0] == seq
    return value[1]


async def run_stream(server, session, datas: list[bytes], seqs: list[int] | None = None):
    ws, ready = await connect(server, session)
    assert ready["type"] == "ready", ready
    audio = [await step(ws, s, d) for s, d in zip(seqs or range(len(datas)), datas, strict=True)]
    await ws.send_json({"type": "stop"})
    await ws.close()
    return ready, audio


def assert_audio_equal(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for k, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape == (2, 1600)
        np.testing.assert_allclose(g, e, rtol=0, atol=ATOL, err_msg=f"frame {k}")


def test_page_and_config(model):
    async def main():
        async with live(stepper(model)) as (server, session):
            async with session.get(server.make_url("/config")) as response:
                config = await response.json()
            async with session.get(server.make_url("/")) as response:
                assert response.status == 200
                assert "<html" in (await response.text()).lower()
            for missing in ("/nope.js", "/.hidden", "/%2e%2e%2fserver.py"):
                async with session.get(server.make_url(missing)) as response:
                    assert response.status == 404, missing
        return config

    config = asyncio.run(main())
    assert config == {
        "protocol": 1, "frame_size": list(HW), "fps": 30, "sample_rate": 48000, "samples_per_frame": 1600,
        "channels": 2, "slots": 2, "backend": "torch", "checkpoint": "tiny.safetensors",
    }  # fmt: skip


def test_audio_for_every_frame_in_order_equals_the_model(model):
    datas = [jpeg(f) for f in make_frames(6, seed=1)]
    seqs = [0, 1, 2, 5, 6, 9]  # the page skips numbers when it drops frames

    async def main():
        async with live(stepper(model)) as (server, session):
            return await run_stream(server, session, datas, seqs)

    ready, audio = asyncio.run(main())
    assert ready["slot"] == 0 and ready["frame_size"] == list(HW) and ready["stream"]
    assert_audio_equal(audio, reference(model, [decoded(d) for d in datas]))


def test_two_streams_are_independent_and_equal_solo_runs(model):
    a = [jpeg(f) for f in make_frames(6, seed=1)]
    b = [jpeg(f) for f in make_frames(6, seed=2)]

    async def main():
        async with live(stepper(model)) as (server, session):
            _, solo = await run_stream(server, session, a)
            (ready_a, with_b), (ready_b, audio_b) = await asyncio.gather(
                run_stream(server, session, a), run_stream(server, session, b)
            )
        return solo, ready_a, with_b, ready_b, audio_b

    solo, ready_a, with_b, ready_b, audio_b = asyncio.run(main())
    assert {ready_a["slot"], ready_b["slot"]} == {0, 1}
    assert_audio_equal(with_b, solo)  # slot 0 again, freshly reset: B made no difference
    assert_audio_equal(solo, reference(model, [decoded(d) for d in a], slot=0))
    assert_audio_equal(audio_b, reference(model, [decoded(d) for d in b], slot=ready_b["slot"]))


def test_a_stream_beyond_the_slots_hears_server_full_and_a_closed_one_frees_its_slot(model):
    datas = [jpeg(f) for f in make_frames(3, seed=1)]

    async def main():
        async with live(stepper(model)) as (server, session):
            first, ready = await connect(server, session)
            second, _ = await connect(server, session)
            await step(first, 0, datas[0])  # slot 0 has history now
            third, full = await connect(server, session)
            closed = await third.receive(timeout=10)
            await first.close()  # the tab goes away: its slot is reset and free again
            for _ in range(100):
                fourth, again = await connect(server, session)
                if again["type"] == "ready":
                    break
                await fourth.close()
                await asyncio.sleep(0.02)
            audio = [await step(fourth, k, d) for k, d in enumerate(datas)]
            await second.close()
            await fourth.close()
            return ready, full, closed, again, audio

    ready, full, closed, again, audio = asyncio.run(main())
    assert ready["slot"] == 0
    assert full == {
        "type": "error",
        "code": "server_full",
        "message": "server full (2 streams): try again later",
    }
    assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    assert again["slot"] == 0
    assert_audio_equal(audio, reference(model, [decoded(d) for d in datas], slot=0))


def test_bad_input_gets_its_error_and_leaves_the_stream_as_it_was(model):
    datas = [jpeg(f) for f in make_frames(4, seed=1)]
    limit = protocol.max_frame_bytes(HW)
    bad = [
        (protocol.SEQ.pack(10) + b"this is not a jpeg", "bad_frame"),
        (b"\x01\x02", "bad_frame"),
        (protocol.SEQ.pack(11) + b"\xff" * limit, "too_large"),
        (protocol.SEQ.pack(1) + datas[2], "bad_frame"),  # not after frame 1
        ("not json", "bad_message"),
        ('{"no": "type"}', "bad_message"),
        ('{"type": "dance"}', "bad_message"),
        ('{"type": "hello", "protocol": 1}', "bad_message"),
    ]

    async def main():
        async with live(stepper(model)) as (server, session):
            ws, _ = await connect(server, session)
            audio = [await step(ws, k, d) for k, d in enumerate(datas[:2])]
            errors = []
            for data, code in bad:
                await (ws.send_bytes(data) if isinstance(data, bytes) else ws.send_str(data))
                kind, message = await next_event(ws)
                errors.append((kind, message["code"], code))
                assert message["message"]
            audio += [await step(ws, 12 + k, d) for k, d in enumerate(datas[2:])]
            await ws.close()
        return audio, errors

    audio, errors = asyncio.run(main())
    assert [(kind, got) for kind, got, _ in errors] == [("error", code) for _, _, code in errors]
    assert_audio_equal(audio, reference(model, [decoded(d) for d in datas]))


def test_a_frame_of_another_size_is_scaled_to_the_session(model):
    small = jpeg(make_frames(1, seed=4, hw=(20, 30))[0])

    async def main():
        async with live(stepper(model)) as (server, session):
            return await run_stream(server, session, [small])

    _, audio = asyncio.run(main())
    assert_audio_equal(audio, reference(model, [decoded(small, HW)]))


@pytest.mark.parametrize(
    ("hello", "says"),
    [({"type": "hello", "protocol": 2}, "speaks live protocol 1"), ({"type": "stop"}, "first message")],
)
def test_a_bad_hello_is_refused_and_closed(model, hello, says):
    async def main():
        async with live(stepper(model)) as (server, session):
            ws, answer = await connect(server, session, hello)
            closing = await ws.receive(timeout=10)
            ws2 = await session.ws_connect(server.make_url("/ws"))
            await ws2.send_bytes(b"\0\0\0\0jpeg")
            binary_first = await ws2.receive_json()
        return answer, closing, binary_first

    answer, closing, binary_first = asyncio.run(main())
    assert answer["code"] == "bad_protocol" and says in answer["message"]
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert binary_first["code"] == "bad_protocol"


def test_cross_origin_websockets_are_refused(model):
    async def main():
        async with live(stepper(model)) as (server, session):
            own = f"http://{server.host}:{server.port}"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(server.make_url("/ws"), headers={"Origin": "http://evil.example"})
            ws = await session.ws_connect(server.make_url("/ws"), headers={"Origin": own})
            await ws.send_json({"type": "hello", "protocol": 1})
            ready = await ws.receive_json()
            await ws.close()
        return refused.value.status, ready

    status, ready = asyncio.run(main())
    assert status == 403
    assert ready["type"] == "ready"


class GatedStreams:
    """A backend whose steps wait for the test to open the gate, so frames queue up deterministically."""

    def __init__(self, streams) -> None:
        self.inner = streams
        self.slots, self.frame_hw = streams.slots, streams.frame_hw
        self.sample_rate, self.samples_per_frame = streams.sample_rate, streams.samples_per_frame
        self.entered, self.gate = threading.Event(), threading.Event()

    def step(self, frames, active=None):
        self.entered.set()
        self.gate.wait(timeout=30)
        return self.inner.step(frames, active)

    def reset(self, slot=None):
        self.inner.reset(slot)


async def gated_run(model, datas, queue_frames, max_lag_s, wait_s=0.0):
    """Frame 0 enters a held step, the rest arrive meanwhile; after `wait_s` the gate opens. Returns the events."""
    gated = GatedStreams(TorchStreams(model, slots=2, seed=SEED))
    engine = SlotStepper(gated, SEED, queue_frames=queue_frames, max_lag_s=max_lag_s)
    async with live(engine) as (server, session):
        ws, _ = await connect(server, session)
        await ws.send_bytes(protocol.SEQ.pack(0) + datas[0])
        await asyncio.to_thread(gated.entered.wait, 30)
        for k, data in enumerate(datas[1:], start=1):
            await ws.send_bytes(protocol.SEQ.pack(k) + data)
        for _ in range(3000):  # until the server has read and queued them all (the server runs in this loop)
            if engine.lanes[0].last_seq == len(datas) - 1:
                break
            await asyncio.sleep(0.01)
        assert engine.lanes[0].last_seq == len(datas) - 1
        await asyncio.sleep(wait_s)
        gated.gate.set()
        events, answered = [], set()
        while len(answered) < len(datas):
            kind, value = await next_event(ws)
            events.append((kind, value))
            if kind == "audio":
                answered.add(value[0])
            elif kind == "dropped":
                answered.add(value["seq"])
        await ws.close()
    return events


def test_a_client_faster_than_the_model_loses_its_oldest_frames_counted(model):
    datas = [jpeg(f) for f in make_frames(7, seed=1)]
    events = asyncio.run(gated_run(model, datas, queue_frames=2, max_lag_s=60.0))
    audio_seqs = [v[0] for kind, v in events if kind == "audio"]
    dropped = [(v["seq"], v["reason"]) for kind, v in events if kind == "dropped"]
    assert audio_seqs == [0, 5, 6]
    assert dropped == [(k, "queue_full") for k in (1, 2, 3, 4)]
    expected = reference(model, [decoded(datas[k]) for k in (0, 5, 6)])
    assert_audio_equal([v[1] for kind, v in events if kind == "audio"], expected)


def test_a_server_behind_real_time_skips_stale_frames_and_says_so(model):
    datas = [jpeg(f) for f in make_frames(4, seed=1)]
    events = asyncio.run(gated_run(model, datas, queue_frames=8, max_lag_s=0.05, wait_s=0.2))
    kinds = [kind for kind, _ in events]
    assert [v[0] for kind, v in events if kind == "audio"] == [0, 3]
    assert [(v["seq"], v["reason"]) for kind, v in events if kind == "dropped"] == [
        (1, "behind"),
        (2, "behind"),
    ]
    behind = [v for kind, v in events if kind == "behind"]
    assert len(behind) == 1 and behind[0]["ms"] >= 200
    assert kinds.index("behind") < kinds.index("audio", 1)


def test_recording_is_what_the_model_saw_and_run_reproduces_it(model, checkpoint, tmp_path):
    from soundreactor import cli
    from soundreactor.media import read_frames

    datas = [jpeg(f) for f in make_frames(8, seed=1)]
    record = tmp_path / "takes"
    info = {**INFO, "checkpoint_path": str(checkpoint)}

    async def main():
        async with live(stepper(model), record, info) as (server, session):
            await run_stream(server, session, datas[:2])  # slot 0, a short take
            first, _ = await connect(server, session)  # slot 0 again, so the take below is in slot 1
            taken = await run_stream(server, session, datas)
            await first.close()
            return taken

    ready, audio = asyncio.run(main())
    stream = ready["stream"]
    meta = json.loads((record / f"{stream}.json").read_text())
    assert meta["seed"] == SEED + ready["slot"] == SEED + 1
    assert meta["frames"] == len(datas) and meta["frame_size"] == list(HW) and meta["backend"] == "torch"
    assert sorted(p.name for p in record.iterdir() if p.name.startswith(".")) == []  # no partial files left
    video = record / f"{stream}.mkv"
    recorded = list(read_frames(video, fps=30))
    assert len(recorded) == len(datas)
    for got, data in zip(recorded, datas, strict=True):
        np.testing.assert_array_equal(got, decoded(data))  # FFV1 is lossless
    with av.open(str(video)) as container:
        kept = np.concatenate([f.to_ndarray().reshape(-1, 2) for f in container.decode(audio=0)]).T
    np.testing.assert_array_equal(kept, np.concatenate(audio, axis=1))  # float PCM: bit-exact

    wav = tmp_path / f"{stream}.wav"
    args = shlex.split(meta["reproduce"])[1:]  # the command the JSON gives, run from the recordings' folder
    assert args == ["run", "--video", video.name, "--checkpoint", str(checkpoint), "--seed", str(meta["seed"]),
                    "--out", wav.name]  # fmt: skip
    args[args.index("--video") + 1], args[args.index("--out") + 1] = str(video), str(wav)
    assert cli.main(args) == 0
    import soundfile

    rerun = soundfile.read(wav, dtype="float32", always_2d=True)[0].T
    # `run` steps the same frames alone on a 1-slot eager torch backend: the same fp32 arithmetic per row
    np.testing.assert_allclose(rerun, kept, rtol=0, atol=ATOL)


class FakeStreamClient:
    """StreamClient's interface over a local 1-slot session (no Triton here): seeded by its sequence ID, as the
    served model's default seed policy does."""

    def __init__(self, url, model="soundreactor", sequence_id=None, timeout_s=10.0, *, torch_model=None):
        self.sequence_id, self.frames_sent, self.ended, self.closed = sequence_id, 0, False, False
        self.session = Session(TorchStreams(torch_model, seed=SEED + (sequence_id or 0)))

    def frame_hw(self):
        return self.session.frame_hw

    def step(self, frame, end=False):
        self.frames_sent += 1
        self.ended |= end
        return self.session.step(frame)

    def close(self, cancel=False):
        self.closed = True


def test_triton_relay_steps_each_stream_as_its_own_sequence(model):
    a = [jpeg(f) for f in make_frames(4, seed=1)]
    b = [jpeg(f) for f in make_frames(3, seed=2)]  # another length tells the two sequences apart
    made: list[FakeStreamClient] = []

    def factory(*args, **kwargs) -> FakeStreamClient:
        made.append(FakeStreamClient(*args, **kwargs, torch_model=model))
        return made[-1]

    async def main():
        relay = TritonRelay("fake:8001", slots=2, client_factory=factory)
        async with live(relay, info={**INFO, "backend": "triton fake:8001"}) as (server, session):
            (_, audio_a), (_, audio_b) = await asyncio.gather(
                run_stream(server, session, a), run_stream(server, session, b)
            )
            held, _ = await connect(server, session)
            held2, _ = await connect(server, session)
            _, full = await connect(server, session)
            await held.close()
            await held2.close()
        return audio_a, audio_b, full, relay

    audio_a, audio_b, full, relay = asyncio.run(main())
    assert relay.frame_hw == HW and full["code"] == "server_full"
    streams = [c for c in made if c.sequence_id is not None]
    for audio, datas in ((audio_a, a), (audio_b, b)):
        client = next(c for c in streams if c.frames_sent == len(datas) + 1)  # + the END frame
        streams.remove(client)
        assert client.ended and client.closed
        solo = Session(TorchStreams(model, seed=SEED + client.sequence_id))
        assert_audio_equal(audio, [solo.step(decoded(d)) for d in datas])
    assert all(c.closed for c in made)


def test_live_command_prints_the_url_warns_off_localhost_and_stops_on_ctrl_c(checkpoint):
    command = [sys.executable, "-m", "soundreactor", "live", "--checkpoint", str(checkpoint), "--backend",
               "torch", "--host", "0.0.0.0", "--port", "0", "--slots", "1", "--frame-size", "28x42"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        lines = []
        while not (lines and lines[-1].startswith("open ")):
            line = process.stdout.readline()
            assert line, f"exited early: {process.wait()} {process.stderr.read()}"
            lines.append(line.strip())
        url = lines[-1].split()[1].replace("0.0.0.0", "127.0.0.1")
        with urllib.request.urlopen(url + "config", timeout=10) as response:
            assert json.load(response)["slots"] == 1
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 130
    assert "Traceback" not in stderr
    assert "warning: serving on 0.0.0.0 over plain HTTP" in stderr
    assert "live: torch, 1 slots, frames 28x42" in lines


def test_live_command_errors_are_one_line(capsys, tmp_path):
    from soundreactor import cli

    pytest.importorskip("tritonclient.grpc", reason="--triton needs tritonclient")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    cases = [
        (["--slots", "0"], "--slots must be at least 1"),
        (["--record", str(not_a_folder)], "is a file: give a folder"),
        (["--checkpoint", str(tmp_path / "missing.safetensors")], "checkpoint not found"),
        (["--triton", "127.0.0.1:1", "--port", "0"], "start a server with `soundreactor serve`"),
    ]
    for args, says in cases:
        assert cli.main(["live", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and err.count("\n") == 1, err


def test_triton_relay_through_a_real_tritonserver(model, checkpoint, tmp_path):
    """The relay over the real StreamClient and tritonserver (tiny torch repository, 2 slots): a stream's audio
    equals the model stepped alone with the served seed policy's seed (seed + correlation ID)."""
    import socket

    from soundreactor.serving.params import ServingParams
    from soundreactor.serving.repository import write_repository
    from soundreactor.serving.server import ServerError, TritonServer, find_tritonserver

    try:
        find_tritonserver()
        import tritonclient.grpc  # noqa: F401
    except (ServerError, ImportError) as err:
        pytest.skip(f"needs tritonserver and tritonclient ({err}); CI installs them: see .ci/run")

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    params = ServingParams(backend="torch", slots=2, frame_hw=HW, checkpoint=str(checkpoint), seed=SEED)
    write_repository(tmp_path / "repo", params, idle_timeout_s=2.5)
    datas = [jpeg(f) for f in make_frames(5, seed=1)]
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    with TritonServer(
        tmp_path / "repo", log=tmp_path / "tritonserver.log", exit_timeout_s=5, **ports
    ) as triton:

        async def main():
            relay = TritonRelay(triton.grpc_url, slots=2)
            async with live(relay, info={**INFO, "backend": "triton"}) as (server, session):
                ws, ready = await connect(server, session)
                sequence_id = relay.lanes[ready["slot"]].sequence_id
                audio = [await step(ws, k, d) for k, d in enumerate(datas)]
                await ws.close()
                held = [(await connect(server, session))[0] for _ in range(2)]
                _, full = await connect(server, session)
                for ws in held:
                    await ws.close()
            return relay.frame_hw, sequence_id, audio, full

        frame_hw, sequence_id, audio, full = asyncio.run(main())
    assert frame_hw == HW and full["code"] == "server_full"
    solo = Session(TorchStreams(model, seed=SEED + sequence_id))
    assert_audio_equal(audio, [solo.step(decoded(d)) for d in datas])


def test_a_recording_the_encoder_cannot_keep_up_with_stops_without_gaps(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from soundreactor.live.recorder import MAX_BACKLOG, Recorder

    frames = make_frames(3, seed=1)
    audio = np.zeros((2, 1600), np.float32)
    with ThreadPoolExecutor(1) as worker:
        gate = threading.Event()
        worker.submit(gate.wait, 30)  # the encoder's thread is busy: every write queues
        recorder = Recorder(tmp_path, "take", {"seed": 0}, 48000, worker)
        for k in range(MAX_BACKLOG + 5):
            recorder.write(frames[k % 3], audio)
        gate.set()
        recorder.finish().result(timeout=60)
    meta = json.loads((tmp_path / "take.json").read_text())
    assert meta["frames"] == MAX_BACKLOG and f"stopped at frame {MAX_BACKLOG}" in meta["error"]
    with av.open(str(tmp_path / "take.mkv")) as container:
        decoded_frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded_frames) == MAX_BACKLOG
    for k, got in enumerate(decoded_frames):
        np.testing.assert_array_equal(got, frames[k % 3])


def test_live_without_aiohttp_says_which_extra_to_install(monkeypatch, capsys):
    from soundreactor.cli import main

    monkeypatch.setitem(sys.modules, "aiohttp", None)  # as if it were not installed
    assert main(["live"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs aiohttp" in err and "soundreactor[live]" in err
