"""End to end: the live page in headless Chromium, its camera faked from a generated Y4M of the demo scene, against
a real `soundreactor live` (the default model, torch backend, 2 slots, recording every stream).

Drives Debian's chromium (`.ci/run` installs it; playwright cannot download browsers here) with the flags the
issue names, keeping the audio output on (no --mute-audio) so the AudioWorklet really plays.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tolerance import guidance_gain, module_depth, rounding_atol

from soundreactor.demo_video import demo_frames, make_demo_video, write_y4m
from soundreactor.media import pick_video_encoder

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
)

REPO = Path(__file__).resolve().parents[1]
CAMERA_HW = (180, 320)  # the fake camera's picture; the page scales it to the session's frame size
MAX_IN_FLIGHT = 6  # live.js: frames the page may have sent and not yet had answered when it stops
SERVER_START_S = 120


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_y4m(tmp_path_factory.mktemp("camera") / "clip.y4m", list(demo_frames(75, CAMERA_HW)))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`soundreactor live` on a free port (port 0: it prints the URL it bound); yields (url, record dir)."""
    record = tmp_path_factory.mktemp("record")
    command = [
        sys.executable,
        "-m",
        "soundreactor",
        "live",
        "--port",
        "0",
        "--slots",
        "2",
        "--backend",
        "torch",
    ]
    process = subprocess.Popen(
        [*command, "--record", str(record)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    url, seen, deadline = None, [], time.monotonic() + SERVER_START_S
    while url is None and time.monotonic() < deadline and process.poll() is None:
        try:
            seen.append(lines.get(timeout=0.5))
        except queue.Empty:
            continue
        found = re.search(r"open (http://\S+)", seen[-1])
        url = found and found.group(1)
    if url is None:
        process.kill()
        pytest.fail(f"`soundreactor live` did not print its URL: {''.join(seen)}")
    yield url, record
    process.terminate()  # SIGTERM is a Ctrl-C to the CLI (and is not ignored in background jobs)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


@pytest.fixture(scope="module")
def playwright():
    with sync_api.sync_playwright() as running:  # one per thread: every browser here comes from it
        yield running


@pytest.fixture(scope="module")
def browser(playwright, clip):
    chromium = playwright.chromium.launch(
        executable_path=CHROMIUM,
        ignore_default_args=["--mute-audio"],
        args=[
            "--no-sandbox",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={clip}",
            "--autoplay-policy=no-user-gesture-required",
        ],
    )
    yield chromium
    chromium.close()


def open_page(browser, url: str):
    """A page in its own browser context (like another user's tab), streaming the camera as soon as it loads."""
    page = browser.new_context().new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"{url}?source=camera&autostart=1")
    page.script_errors = errors
    return page


def stats(page) -> dict:
    return page.evaluate("window.soundreactorLive.stats()")


def wait_chunks(page, count: int, timeout_s: float = 30) -> None:
    page.wait_for_function(
        f"window.soundreactorLive.stats().chunksReceived >= {count} || window.soundreactorLive.stats().error",
        timeout=timeout_s * 1000,
    )
    assert stats(page)["error"] is None, stats(page)["error"]


def stop(page) -> dict:
    """Stop (the page lets the frames in flight come back first) and return the final stats."""
    return page.evaluate("window.soundreactorLive.stop().then(() => window.soundreactorLive.stats())")


def recording(record: Path, stream: str, timeout_s: float = 20) -> tuple[dict, Path]:
    meta = record / f"{stream}.json"
    deadline = time.monotonic() + timeout_s
    while not meta.exists():  # written when the server has seen the stream end
        assert time.monotonic() < deadline, f"no recording {meta} after the stream ended"
        time.sleep(0.1)
    return json.loads(meta.read_text()), record / f"{stream}.mkv"


def recorded_audio(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        chunks = [frame.to_ndarray() for frame in container.decode(audio=0)]
    return np.concatenate(chunks, axis=1).reshape(-1, 2).T  # packed float: [1, 2n] interleaved -> [2, n]


def assert_recording_is_run(record: Path, stream: str, out: Path, chunks_received: int) -> None:
    """The recorded audio equals `soundreactor run` with the recording's checkpoint and seed on its frames."""
    import soundfile

    from soundreactor.cli import main
    from soundreactor.model.soundreactor import SoundReactor

    meta, video = recording(record, stream)
    live = recorded_audio(video)
    assert live.shape[1] >= 1600 * chunks_received  # every chunk the page got was recorded
    wav = out / f"{stream}.wav"
    argv = ["run", "--video", str(video), "--checkpoint", meta["checkpoint"], "--backend", "torch"]
    assert main([*argv, "--seed", str(meta["seed"]), "--out", str(wav)]) == 0
    offline = soundfile.read(wav, dtype="float32", always_2d=True)[0].T
    assert offline.shape == live.shape
    # The server steps both slots as one batch of 2, `run` a batch of 1: fp32 rounding apart, nothing else; the
    # rounding passes through the guided head steps (guidance_gain: |1 - w| + |w|, 3 at the default model's 2)
    model = SoundReactor.load(meta["checkpoint"])
    atol = rounding_atol(offline, module_depth(model)) * guidance_gain(model.config.sampler.guidance)
    np.testing.assert_allclose(live, offline, rtol=0, atol=atol)


def test_every_frame_is_answered_in_order_and_the_recording_equals_run(server, browser, tmp_path):
    url, record = server
    page = open_page(browser, url)
    wait_chunks(page, 45)
    final = stop(page)
    sent, received, dropped = final["framesSent"], final["chunksReceived"], final["serverDropped"]
    # Each frame sent gets its audio or a "dropped" message; only frames still in flight at the stop may lack both.
    assert sent - MAX_IN_FLIGHT <= received + dropped <= sent, final
    assert received >= 45
    seqs = page.evaluate("window.soundreactorLive.seqs()")
    assert len(seqs) == received and seqs == sorted(set(seqs)), "chunks out of order or repeated"
    assert final["outOfOrder"] == 0
    # Order of magnitude only (shared CI machines); perf/bench_live_latency.py measures it. A frame's audio can't
    # be played before the frame was shown.
    assert 0 < final["latencyMs"]["p50"] < 600, final["latencyMs"]
    assert final["latencyMs"]["p90"] < 2000, final["latencyMs"]
    assert not page.script_errors
    page.context.close()
    assert_recording_is_run(record, final["stream"], tmp_path, received)


def test_two_pages_stream_independently_a_third_is_refused_until_a_tab_closes(server, browser, tmp_path):
    url, record = server
    first, second = open_page(browser, url), open_page(browser, url)
    wait_chunks(first, 15)
    wait_chunks(second, 15)
    one, two = stats(first), stats(second)
    assert one["stream"] != two["stream"] and one["slot"] != two["slot"]

    third = open_page(browser, url)
    third.wait_for_function("window.soundreactorLive.stats().error", timeout=30_000)
    assert "server full (2 streams)" in third.locator("#error").inner_text()
    assert third.locator("#start").is_enabled()

    first.context.close()  # the tab goes without a word: its slot must come free at once
    deadline = time.monotonic() + 10
    while True:
        third.click("#start")
        third.wait_for_function("(s => s.stream || s.error)(window.soundreactorLive.stats())", timeout=30_000)
        if stats(third)["stream"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    wait_chunks(third, 15)
    assert stats(third)["stream"] not in (two["stream"], None)

    received_before = stats(second)["chunksReceived"]
    wait_chunks(second, received_before + 15)  # the second stream went on through all of it
    final = stop(second)
    stop(third)
    # Ran beside two other streams in one batch, yet its audio is what it would be alone.
    assert_recording_is_run(record, final["stream"], tmp_path, final["chunksReceived"])
    assert not first.script_errors + second.script_errors + third.script_errors


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # no fake device and no camera on the machine
        (["--use-fake-ui-for-media-stream"], "No camera found: connect a camera"),
        # a camera, but headless Chromium answers the permission prompt with "block"
        (["--use-fake-device-for-media-stream"], "Camera permission was denied: allow camera access"),
    ],
    ids=["no camera", "permission denied"],
)
def test_a_missing_or_refused_camera_is_explained_on_the_page(server, playwright, flags, message):
    url, _ = server
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", *flags])
    try:
        page = chromium.new_page()
        page.goto(f"{url}?source=camera&autostart=1")
        page.wait_for_function("window.soundreactorLive.stats().error", timeout=30_000)
        assert message in page.locator("#error").inner_text()
        assert page.locator("#start").is_enabled() and not stats(page)["running"]
    finally:
        chromium.close()


def test_a_video_file_streams_like_the_camera(server, browser, tmp_path):
    if pick_video_encoder() != "h264":
        pytest.skip("this FFmpeg has no H.264 encoder, and Chromium plays no MPEG-4 part 2")
    url, _ = server
    video = make_demo_video(tmp_path / "clip.mp4", seconds=2, size=CAMERA_HW)
    page = browser.new_context().new_page()
    page.goto(url)
    page.set_input_files("#file", str(video))
    page.check('input[name="source"][value="file"]', force=True)  # the radio is drawn as a tab
    page.click("#start")
    wait_chunks(page, 15)
    final = stop(page)
    assert final["framesSent"] - MAX_IN_FLIGHT <= final["chunksReceived"] + final["serverDropped"]
    assert final["chunksReceived"] + final["serverDropped"] <= final["framesSent"]
    page.context.close()
