"""Serving through the real tritonserver (the nvidia-pytriton wheel's binary, or one on PATH) on 127.0.0.1.

One server for the module (tiny preset, 3 slots, 2.5 s idle timeout) on ports of its own: free ones, picked again if
another process takes one first (pytest-xdist workers and other runs on the machine start servers too). Every served
stream is checked against the same `Streams` backend run in this process, in the stream's slot, with its seed (seed +
correlation ID; for a string ID the first 8 bytes of its BLAKE2b digest, little-endian, as documented): served audio
must equal it up to fp32 rounding. Rows of a batch are computed independently of the other slots' content, so the
reference runs one slot at a time; the slot is pinned by the order in which streams start (Triton's Direct strategy
gives a new sequence the lowest free slot).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from soundreactor.serving.params import ServingParams, load_streams, reseed
from soundreactor.serving.repository import write_repository
from soundreactor.serving.server import (
    SHM_DIR,
    PortInUse,
    ServerError,
    TritonServer,
    find_tritonserver,
    group_alive,
)

try:
    find_tritonserver()
    import tritonclient.grpc  # noqa: F401
    import tritonclient.http as httpclient

    from soundreactor.serving.client import StreamClient, StreamError, StreamLost, StreamTimeout
except (ServerError, ImportError) as err:
    pytest.skip(
        f"serving tests need tritonserver and tritonclient ({err}); CI installs them: see .ci/run",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parents[1]
HW = (28, 42)
SLOTS = 3
SEED = 5
IDLE_S = 2.5  # long enough for a test's pauses on a loaded 2-core box, short enough to wait out
ATOL = 1e-6  # audio peaks ~0.2: fp32 rounding (~1e-8) with room for a different reduction order, nothing more


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ports() -> dict[str, int]:
    return {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}


def start_server(repo: Path, tries: int = 5, **options) -> TritonServer:
    """A started server on free ports; new ones if another process takes one between our pick and its bind."""
    for _ in range(tries):
        server = TritonServer(repo, **ports(), **options)
        try:
            server.start(timeout_s=120)
            return server
        except PortInUse:
            continue
    raise AssertionError(f"no free ports in {tries} tries")


def seed_of(sequence_id: int | str) -> int:
    if isinstance(sequence_id, str):
        sequence_id = int.from_bytes(hashlib.blake2b(sequence_id.encode(), digest_size=8).digest(), "little")
    return SEED + sequence_id


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> ServingParams:
    from soundreactor.model.soundreactor import init_model

    checkpoint = tmp_path_factory.mktemp("serving") / "tiny.safetensors"
    init_model("tiny", seed=0, input_hw=HW)[0].save(checkpoint)
    return ServingParams(
        backend="torch", slots=SLOTS, frame_hw=HW, checkpoint=str(checkpoint), nfe=1, seed=SEED
    )


@pytest.fixture(scope="module")
def repo(params, tmp_path_factory) -> Path:
    """Written from a checkpoint that is then deleted, and moved: a repository holds what it serves."""
    scratch = tmp_path_factory.mktemp("scratch")
    checkpoint = scratch / "gone.safetensors"
    shutil.copyfile(params.checkpoint, checkpoint)
    written = scratch / "repo"
    write_repository(written, dataclasses.replace(params, checkpoint=str(checkpoint)), idle_timeout_s=IDLE_S)
    repo = tmp_path_factory.mktemp("moved") / "repo"
    written.rename(repo)
    shutil.rmtree(scratch)
    return repo


@pytest.fixture(scope="module")
def server(repo):
    server = start_server(repo, log=repo.parent / "tritonserver.log", exit_timeout_s=1)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local(params):
    """The reference: `reference(slot, sequence_id, frames)` -> audio [n, 2, 1600] from a fresh slot."""
    streams = load_streams(params)

    def reference(slot: int, sequence_id: int | str, frames: np.ndarray) -> np.ndarray:
        reseed(streams, slot, seed_of(sequence_id))
        active = np.arange(SLOTS) == slot
        batch = np.zeros((SLOTS, *HW, 3), np.uint8)
        out = []
        for frame in frames:
            batch[slot] = frame
            out.append(streams.step(batch, active)[slot])
        return np.stack(out)

    return reference


def clip(seed: int, n: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *HW, 3), dtype=np.uint8)


def active_streams(server: TritonServer) -> int:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return int(sum(float(v) for v in re.findall(r"^soundreactor_active_streams\{.*\} (\S+)$", text, re.M)))


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def http_step(client, frame: np.ndarray, sequence_id: int, start: bool, end: bool) -> np.ndarray:
    tensor = httpclient.InferInput("FRAME", [1, *frame.shape], "UINT8")
    tensor.set_data_from_numpy(frame[None])
    result = client.infer(
        "soundreactor", [tensor], sequence_id=sequence_id, sequence_start=start, sequence_end=end, timeout=10
    )
    return result.as_numpy("AUDIO")[0]


def test_concurrent_grpc_and_http_streams_equal_local_runs(server, local):
    ids = {0: 101, 1: 102, 2: 103}  # slot -> correlation ID (and seed SEED + ID)
    frames = {slot: clip(seq) for slot, seq in ids.items()}
    audio: dict[int, list] = {s: [] for s in ids}
    grpc_streams = [StreamClient(server.grpc_url, sequence_id=ids[s], timeout_s=10) for s in (0, 1)]
    # First frames in slot order pin each stream's slot; the rest run concurrently.
    for slot, stream in enumerate(grpc_streams):
        audio[slot].append(stream.step(frames[slot][0]))
    http_started = threading.Event()

    def run_http() -> None:  # geventhttpclient clients stay on the thread that made them
        http = httpclient.InferenceServerClient(server.http_url)
        for k, frame in enumerate(frames[2]):
            audio[2].append(http_step(http, frame, ids[2], start=k == 0, end=k == len(frames[2]) - 1))
            http_started.set()
        http.close()

    def run_grpc(slot: int) -> None:
        for k in range(1, len(frames[slot])):
            audio[slot].append(grpc_streams[slot].step(frames[slot][k], end=k == len(frames[slot]) - 1))

    threads = [threading.Thread(target=run_http)]
    threads[0].start()
    assert http_started.wait(timeout=10)
    threads += [threading.Thread(target=run_grpc, args=(slot,)) for slot in (0, 1)]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    for slot, seq in ids.items():
        assert len(audio[slot]) == len(frames[slot])
        np.testing.assert_allclose(np.stack(audio[slot]), local(slot, seq, frames[slot]), rtol=0, atol=ATOL)
    assert len({float(np.abs(np.stack(a)).sum()) for a in audio.values()}) == 3  # different seeds, frames


def test_streams_beyond_the_slots_wait_and_end_frees_a_slot(server, local):
    frames = {seq: clip(seq, n=3) for seq in (201, 202, 203, 204)}
    holders = [StreamClient(server.grpc_url, sequence_id=seq, timeout_s=10) for seq in (201, 202, 203)]
    audio = {h.sequence_id: [h.step(frames[h.sequence_id][0])] for h in holders}  # slots 0-2: server full
    waiting = StreamClient(server.grpc_url, sequence_id=204, timeout_s=10)
    audio[204] = []
    thread = threading.Thread(
        target=lambda: audio[204].extend(waiting.step(f, end=k == 2) for k, f in enumerate(frames[204]))
    )
    thread.start()
    time.sleep(0.5)
    assert not audio[204], "a fourth stream was served while three held every slot"
    audio[202].append(holders[1].step(frames[202][1], end=True))  # END: slot 1 is free at once
    thread.join(timeout=30)
    # the neighbours of the reused slot carry on as if nothing happened
    for holder in (holders[0], holders[2]):
        seq = holder.sequence_id
        audio[seq] += [holder.step(frames[seq][k], end=k == 2) for k in (1, 2)]
    for slot, seq in ((0, 201), (1, 202), (2, 203), (1, 204)):
        expected = local(slot, seq, frames[seq][: len(audio[seq])])
        np.testing.assert_allclose(np.stack(audio[seq]), expected, rtol=0, atol=ATOL)


def test_a_string_correlation_id_starts_a_clean_stream_in_a_used_slot(server, local):
    frames = {801: clip(801, n=2), "camera-7": clip(802, n=3)}
    with StreamClient(
        server.grpc_url, sequence_id=801, timeout_s=10
    ) as before:  # history in slot 0, then END
        before.step(frames[801][0])
        before.step(frames[801][1], end=True)
    with StreamClient(server.grpc_url, sequence_id="camera-7", timeout_s=10) as stream:  # slot 0 again
        audio = [stream.step(f, end=k == 2) for k, f in enumerate(frames["camera-7"])]
    np.testing.assert_allclose(np.stack(audio), local(0, "camera-7", frames["camera-7"]), rtol=0, atol=ATOL)


def test_deadline_while_waiting_writes_nothing_then_a_paused_stream_is_lost_and_restarts_clean(
    server, local, tmp_path, capsys
):
    from soundreactor.cli import main
    from soundreactor.demo_video import make_demo_video

    frames = clip(300, n=3)
    holders = [StreamClient(server.grpc_url, sequence_id=seq, timeout_s=10) for seq in (301, 302, 303)]
    for holder in holders:
        holder.step(frames[0])
        holder.step(frames[1])  # some history in every slot
    assert active_streams(server) == SLOTS
    late = StreamClient(server.grpc_url, sequence_id=304, timeout_s=0.5)
    with pytest.raises(StreamTimeout, match="slot"):
        late.step(frames[0])
    # the `stream` command timing out on its first frame leaves no file
    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.1, size=HW)
    argv = ["stream", "--url", server.grpc_url, "--video", str(video), "--out", str(tmp_path / "a.wav")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--timeout-s", "0.5", "--sequence-id", "306"])
    assert exit_info.value.code == 2
    assert "nothing written" in capsys.readouterr().err
    assert not (tmp_path / "a.wav").exists()
    for holder in holders[1:]:
        holder.close()  # dropped without END: Triton frees the slots after the idle timeout
    # holders[0] pauses past the idle timeout. The late requests may still get a slot once one idles out, then
    # idle out themselves: wait for both.
    time.sleep(2 * IDLE_S + 0.5)
    assert wait_for(lambda: active_streams(server) == 0, timeout_s=IDLE_S + 5)
    with pytest.raises(StreamLost, match=r"idle timeout.*restart\(\)"):
        holders[0].step(frames[2])
    with pytest.raises(StreamLost):  # lost until restarted: no frame goes out on a state the server dropped
        holders[0].step(frames[2])
    holders[0].restart()  # lowest free slot: 0
    audio = [holders[0].step(f, end=k == 2) for k, f in enumerate(frames)]
    np.testing.assert_allclose(np.stack(audio), local(0, 301, frames), rtol=0, atol=ATOL)
    with StreamClient(server.grpc_url, sequence_id=305, timeout_s=10) as fresh:  # slot 0 again
        audio = [fresh.step(f, end=k == 2) for k, f in enumerate(frames)]
    np.testing.assert_allclose(np.stack(audio), local(0, 305, frames), rtol=0, atol=ATOL)


def test_bad_frames_are_rejected_and_leave_every_stream_intact(server, local):
    frames = {seq: clip(seq) for seq in (401, 402)}
    a = StreamClient(server.grpc_url, sequence_id=401, timeout_s=10)
    b = StreamClient(server.grpc_url, sequence_id=402, timeout_s=10)
    out_a, out_b = [a.step(frames[401][0])], [b.step(frames[402][0])]
    with pytest.raises(StreamError, match=r"unexpected shape for input 'FRAME'.*Expected \[-1,28,42,3\]"):
        a.step(np.zeros((30, 42, 3), np.uint8))
    with pytest.raises(StreamError, match="FRAME"):
        a.step(frames[401][1].astype(np.float32) / 255)
    for k in range(1, 5):
        out_a.append(a.step(frames[401][k], end=k == 4))
        out_b.append(b.step(frames[402][k], end=k == 4))
    np.testing.assert_allclose(np.stack(out_a), local(0, 401, frames[401]), rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.stack(out_b), local(1, 402, frames[402]), rtol=0, atol=ATOL)


def test_stream_command_writes_the_served_audio(server, local, tmp_path, capsys):
    import soundfile as sf

    from soundreactor.cli import main
    from soundreactor.demo_video import make_demo_video
    from soundreactor.media import read_frames

    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.2, size=HW, seed=1)
    wav = tmp_path / "clip.wav"
    argv = [
        "stream",
        "--url",
        server.grpc_url,
        "--video",
        str(video),
        "--out",
        str(wav),
        "--sequence-id",
        "501",
    ]
    assert main(argv) == 0  # paced at 30 fps
    frames = np.stack(list(read_frames(video)))
    audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    assert rate == 48000
    expected = local(0, 501, frames)  # [n, 2, 1600] -> [n * 1600, 2]
    np.testing.assert_allclose(audio, expected.transpose(0, 2, 1).reshape(-1, 2), rtol=0, atol=ATOL)
    capsys.readouterr()
    other = make_demo_video(
        tmp_path / "big.mp4", seconds=0.1, size=(32, 48)
    )  # scaled to 28x42, as `run` does
    assert (
        main(["stream", "--url", server.grpc_url, "--video", str(other), "--out", str(tmp_path / "x.wav")])
        == 0
    )
    assert "frames are scaled to the served model's 28x42" in capsys.readouterr().out
    assert sf.info(tmp_path / "x.wav").frames == 3 * 1600


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _shm_prefix(pid: int) -> str:
    """The shared-memory prefix of the tritonserver `pid`, from its command line (each server has its own)."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    (config,) = [a for a in args if "shm-region-prefix-name=" in a]
    return config.split("shm-region-prefix-name=")[1]


def _serve(repo: Path, tries: int = 5) -> tuple[subprocess.Popen, TritonServer]:
    """`soundreactor serve` in a subprocess on free ports (new ones if one was taken before it bound it), ready."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(tries):
        port = ports()
        argv = [sys.executable, "-m", "soundreactor", "serve", "--repo", str(repo)]
        argv += [f"--{k.replace('_', '-')}={v}" for k, v in port.items()]
        serve = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        probe = TritonServer(repo, **port)
        if wait_for(lambda: probe.ready() or serve.poll() is not None, timeout_s=120) and probe.ready():  # noqa: B023
            return serve, probe
        output, _ = serve.communicate(timeout=60)
        assert "cannot be used" in output, output[-2000:]  # a port taken: try others
    raise AssertionError(f"no free ports in {tries} tries")


def test_serve_command_stops_on_sigterm_leaving_no_process_or_shared_memory(repo):
    serve, probe = _serve(repo)
    try:
        (triton,) = _children(serve.pid)
        prefix = _shm_prefix(triton)
        assert list(SHM_DIR.glob(f"{prefix}*")), "no Python-backend shared memory while serving"
        with StreamClient(probe.grpc_url, sequence_id=601, timeout_s=10) as stream:
            stream.step(clip(601, n=1)[0], end=True)
        serve.send_signal(signal.SIGTERM)
        output, _ = serve.communicate(timeout=60)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0, output[-2000:]
    assert "tritonserver stopped (exit code 0)" in output
    assert not group_alive(triton)
    assert not list(SHM_DIR.glob(f"{prefix}*"))


def test_a_server_that_will_not_stop_is_killed_and_a_paused_client_restarts_on_its_next_run(server, local):
    """The module's server (exit timeout 1 s), stopped and started again."""
    pid = server.process.pid
    regions = server.shm_regions()
    assert regions
    frames = clip(701, n=2)
    stream = StreamClient(server.grpc_url, sequence_id=701, timeout_s=10)
    try:
        stream.step(frames[0])  # an open gRPC stream keeps the model loaded past the exit timeout
        server.stop()
        assert not group_alive(pid)
        assert not any(r.exists() for r in regions)
        with pytest.raises(StreamLost, match=r"connection .* broke.*restart\(\)"):
            stream.step(frames[1])  # the client paused while the server went away
    finally:
        server.start(timeout_s=120)  # the same ports, taken back at once, for the tests after this one
    try:
        stream.restart()
        audio = [stream.step(f, end=k == 1) for k, f in enumerate(frames)]
    finally:
        stream.close()
    np.testing.assert_allclose(np.stack(audio), local(0, 701, frames), rtol=0, atol=ATOL)


def test_a_server_that_exits_while_starting_is_one_error_line(tmp_path, capsys):
    """A folder that is not a model repository: tritonserver exits, and `serve` says so with its exit code."""
    from soundreactor.cli import main

    (tmp_path / "not_a_model").mkdir()
    for _ in range(5):  # other ports if another process took one first
        port = [str(free_port()) for _ in range(3)]
        argv = ["serve", "--repo", str(tmp_path), "--http-port", port[0], "--grpc-port", port[1]]
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--metrics-port", port[2], "--start-timeout-s", "60"])
        err = capsys.readouterr().err
        if "cannot be used" not in err:
            break
    assert exit_info.value.code == 2
    assert "tritonserver exited with code" in err and "Traceback" not in err
