"""`run` and `stream` on videos and output paths as users have them: pipes, FIFOs, standard input, live captures
without a duration, non-finite audio, names that do not say WAV or MP4, file systems that refuse a write.

The model is replaced by a stand-in whose audio is each frame's mean level, so what reached it (how many frames,
in which order, of which size) can be read back from the WAV; the CLI, the reader and the writers are real.
"""

import os
import subprocess
import sys
import textwrap
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from soundreactor import cli
from soundreactor.cli import main
from soundreactor.runtime.session import Session, Streams, check_frames

SAMPLES = 1600
HW = (24, 32)  # the stand-in session's frame size


class LevelStreams(Streams):
    """Audio of frame k: every sample is the frame's mean level / 255; `nan_at` makes one frame's audio NaN."""

    slots, samples_per_frame, sample_rate = 1, SAMPLES, 48000

    def __init__(self, frame_hw=HW, nan_at: int | None = None):
        self.frame_hw, self.nan_at, self.seen = frame_hw, nan_at, []

    def step(self, frames, active=None):
        frames = check_frames(frames, 1, self.frame_hw)
        self.seen.append(frames[0])
        level = np.nan if len(self.seen) - 1 == self.nan_at else frames.mean() / 255
        return np.full((1, 2, SAMPLES), level, np.float32)

    def reset(self, slot=None):
        self.seen.clear()


def _levels_video(
    path: Path, levels: list[int], size=(32, 48), codec="libvpx", fmt=None, options=None
) -> Path:
    """Flat frames at 30 fps, frame i at gray level levels[i]."""
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream(codec, rate=30)
        stream.height, stream.width, stream.pix_fmt = *size, "yuv420p"
        stream.bit_rate = 4_000_000
        for i, level in enumerate(levels):
            frame = av.VideoFrame.from_ndarray(np.full((*size, 3), level, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 30)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


LEVELS = [20, 60, 100, 140, 180, 220, 100, 40, 200]


def _wav_levels(wav: Path) -> list[int]:
    audio, rate = soundfile.read(wav, dtype="float32", always_2d=True)
    assert rate == 48000 and len(audio) % SAMPLES == 0
    return [round(float(a) * 255) for a in audio[::SAMPLES, 0]]


@pytest.fixture
def stand_in(monkeypatch):
    """`run` gets a LevelStreams session sized to HW; the test reads what reached it from `streams`."""
    made = []

    def session(args, video):
        made.append(LevelStreams())
        return Session(made[-1])

    monkeypatch.setattr(cli, "_session", session)
    return made


def _one_error_line(capsys) -> str:
    """The one `error:` line on stderr (beside the progress bar's), with no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _muxed_frames(path: Path) -> tuple[int, float]:
    with av.open(str(path)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        audio = sum(f.samples for f in c.decode(audio=0))
    return frames, audio / 48000


def test_run_reads_standard_input_once_and_muxes_it(tmp_path, stand_in, monkeypatch, capsys):
    # a live capture (no duration in its header), as `ffmpeg -i camera -f webm -` sends it
    video = _levels_video(tmp_path / "clip.webm", LEVELS, fmt="webm", options={"live": "1"})
    wav, mp4 = tmp_path / "out.wav", tmp_path / "out.mp4"
    with open(video, "rb") as pipe:
        monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"buffer": pipe})())
        assert main(["run", "--video", "-", "--out", str(wav), "--mux", str(mp4)]) == 0
    levels = _wav_levels(wav)
    assert len(levels) == len(LEVELS) and np.abs(np.subtract(levels, LEVELS)).max() <= 3
    frames, seconds = _muxed_frames(mp4)
    assert frames == len(LEVELS) and seconds == pytest.approx(len(LEVELS) / 30, abs=0.03)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.webm", "out.mp4", "out.wav"]  # no copy left


def test_run_reads_a_fifo(tmp_path, stand_in, capsys):
    video = _levels_video(tmp_path / "clip.webm", LEVELS)
    fifo = tmp_path / "camera"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as f:
            f.write(video.read_bytes())

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        wav, mp4 = tmp_path / "out.wav", tmp_path / "out.mp4"
        assert main(["run", "--video", str(fifo), "--out", str(wav), "--mux", str(mp4)]) == 0
    finally:
        writer.join(timeout=30)
    assert len(_wav_levels(wav)) == len(LEVELS)
    assert _muxed_frames(mp4)[0] == len(LEVELS)


def test_live_capture_without_a_duration_is_read_to_its_end(tmp_path, stand_in, capsys):
    """Browser MediaRecorder and live muxers write WebM with no duration in the header."""
    video = _levels_video(tmp_path / "live.webm", LEVELS, fmt="webm", options={"live": "1"})
    with av.open(str(video)) as c:
        assert c.duration is None and c.streams.video[0].duration is None  # the case under test
    assert main(["run", "--video", str(video), "--out", str(tmp_path / "out.wav")]) == 0
    assert len(_wav_levels(tmp_path / "out.wav")) == len(LEVELS)


def test_a_folder_as_video_says_so(tmp_path, stand_in, capsys):
    (tmp_path / "clips").mkdir()
    assert main(["run", "--video", str(tmp_path / "clips"), "--out", str(tmp_path / "a.wav")]) == 2
    assert f"{tmp_path / 'clips'} is a folder: give a video file" in _one_error_line(capsys)


def test_non_finite_audio_stops_the_run_and_keeps_what_was_good(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_session", lambda args, video: Session(LevelStreams(nan_at=4)))
    video = _levels_video(tmp_path / "clip.webm", LEVELS)
    wav, mp4 = tmp_path / "out.wav", tmp_path / "out.mp4"
    assert main(["run", "--video", str(video), "--out", str(wav), "--mux", str(mp4)]) == 2
    err = _one_error_line(capsys)
    assert "NaN or infinite audio at frame 4" in err and f"kept 0.13 s of audio in {wav}" in err
    assert f"--mux {mp4} was not written" in err
    assert len(_wav_levels(wav)) == 4 and np.isfinite(soundfile.read(wav)[0]).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.webm", "out.wav"]


def test_ctrl_c_with_mux_says_the_mp4_was_not_written(tmp_path, monkeypatch, capsys):
    class Interrupting(LevelStreams):
        def step(self, frames, active=None):
            if len(self.seen) == 3:
                raise KeyboardInterrupt
            return super().step(frames, active)

    monkeypatch.setattr(cli, "_session", lambda args, video: Session(Interrupting()))
    video = _levels_video(tmp_path / "clip.webm", LEVELS)
    wav, mp4 = tmp_path / "out.wav", tmp_path / "out.mp4"
    assert main(["run", "--video", str(video), "--out", str(wav), "--mux", str(mp4)]) == 130
    err = capsys.readouterr().err
    assert f"kept 0.10 s of audio in {wav}" in err and f"--mux {mp4} was not written" in err
    assert not mp4.exists() and not list(tmp_path.glob("*.partial"))


def test_output_names_must_say_what_is_written(tmp_path, stand_in, capsys):
    video = _levels_video(tmp_path / "clip.webm", LEVELS[:2])
    run = ["run", "--video", str(video)]
    assert main([*run, "--out", str(tmp_path / "a.mp3")]) == 2
    assert "'.mp3' names another format; name it a.wav" in _one_error_line(capsys)
    assert main([*run, "--out", str(tmp_path / "a")]) == 2
    assert "it has no extension; name it a.wav" in _one_error_line(capsys)
    assert main([*run, "--out", str(tmp_path / "a.wav"), "--mux", str(tmp_path / "a.mkv")]) == 2
    assert "an MP4 file is written there but '.mkv' names another format; name it a.mp4" in _one_error_line(
        capsys
    )
    assert stand_in == []  # refused before any session was made
    assert main([*run, "--out", str(tmp_path / "A.WAV"), "--mux", str(tmp_path / "a.M4V")]) == 0
    assert (tmp_path / "A.WAV").is_file() and (tmp_path / "a.M4V").is_file()


def test_a_wav_name_that_is_not_utf8_is_written_and_shown(tmp_path, stand_in, capsys):
    video = _levels_video(tmp_path / "clip.webm", LEVELS[:3])
    name = os.fsdecode(b"caf\xe9.wav")  # Latin-1 bytes: not valid UTF-8
    assert main(["run", "--video", str(video), "--out", str(tmp_path / name)]) == 0
    assert b"caf\xe9.wav" in os.listdir(os.fsencode(tmp_path))
    assert "wrote " + str(tmp_path) + "/caf\\xe9.wav" in capsys.readouterr().out
    assert len(_wav_levels(os.fsencode(tmp_path / name))) == 3


def test_an_output_the_file_system_refuses_at_open_is_one_error_line(tmp_path, stand_in, capsys):
    """/proc takes no new files whoever we are (root passes every permission check before the open)."""
    video = _levels_video(tmp_path / "clip.webm", LEVELS[:2])
    assert main(["run", "--video", str(video), "--out", "/proc/soundreactor-test.wav"]) == 2
    assert "/proc/soundreactor-test.wav" in _one_error_line(capsys)
    wav = str(tmp_path / "a.wav")
    assert main(["run", "--video", str(video), "--out", wav, "--mux", "/proc/soundreactor-test.mp4"]) == 2
    assert "/proc/soundreactor-test.mp4" in _one_error_line(capsys)
    assert main(["init", "--preset", "tiny", "--out", "/proc/soundreactor-test.safetensors"]) == 2
    assert "/proc/soundreactor-test.safetensors" in _one_error_line(capsys)


FULL_DISK = """
import resource, signal, sys
import numpy as np
from soundreactor import cli
from soundreactor.runtime.session import Session
sys.path.insert(0, {tests!r})
from test_video_io import LevelStreams
cli._session = lambda args, video: Session(LevelStreams())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (3 * 12800 + 200, resource.RLIM_INFINITY))
sys.exit(cli.main(["run", "--video", {video!r}, "--out", {wav!r}]))
"""


def test_a_full_disk_is_one_error_line_keeping_what_was_written(tmp_path):
    video = _levels_video(tmp_path / "clip.webm", LEVELS)
    wav = tmp_path / "out.wav"
    script = FULL_DISK.format(tests=str(Path(__file__).parent), video=str(video), wav=str(wav))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"writing {wav} failed" in errors[0] and "is the disk full?" in errors[0]
    kept = soundfile.info(wav).frames  # what reached the disk, a part of the refused chunk included
    assert 3 * SAMPLES <= kept < 4 * SAMPLES and f"holds the first {kept / 48000:.2f} s" in errors[0]
    assert soundfile.read(wav)[0][: 3 * SAMPLES : SAMPLES, 0] * 255 == pytest.approx(LEVELS[:3], abs=3)


class FakeStreamClient:
    """tritonclient's side of `stream`: a served model taking HW frames, answered by LevelStreams."""

    streams: LevelStreams
    ends: list[bool]

    def __init__(self, url, model, sequence_id, timeout_s):
        FakeStreamClient.streams, FakeStreamClient.ends = LevelStreams(), []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def frame_hw(self):
        return HW

    def step(self, frame, end=False):
        FakeStreamClient.ends.append(end)
        return FakeStreamClient.streams.step(frame[None])[0]


def test_stream_reads_stdin_to_its_end_and_scales_frames_as_run_does(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tritonclient.grpc")
    monkeypatch.setattr("soundreactor.serving.client.StreamClient", FakeStreamClient)
    video = _levels_video(tmp_path / "live.webm", LEVELS, size=(48, 64), fmt="webm", options={"live": "1"})
    wav = tmp_path / "out.wav"
    with open(video, "rb") as pipe:
        monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"buffer": pipe})())
        argv = ["stream", "--url", "127.0.0.1:1", "--video", "-", "--out", str(wav), "--no-pace"]
        assert main(argv) == 0
    seen = FakeStreamClient.streams.seen
    assert len(seen) == len(LEVELS) and all(f.shape == (*HW, 3) for f in seen)  # 48x64 scaled to 24x32
    assert FakeStreamClient.ends == [False] * (len(LEVELS) - 1) + [True]
    assert np.abs(np.subtract(_wav_levels(wav), LEVELS)).max() <= 3
    assert "frames are scaled to the served model's 24x32" in capsys.readouterr().out


def test_the_real_cli_reads_a_pipe_as_it_reads_the_file(tmp_path):
    """`cat clip | soundreactor run --video - ...` with the tiny model: the same audio as from the file."""
    from soundreactor.model.soundreactor import init_model

    checkpoint = tmp_path / "tiny.safetensors"
    init_model("tiny", seed=1)[0].save(checkpoint)
    video = _levels_video(tmp_path / "clip.webm", LEVELS[:6], size=(32, 48))
    run = [sys.executable, "-m", "soundreactor", "run", "--checkpoint", str(checkpoint), "--nfe", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(video, "rb") as pipe:
        piped = subprocess.run(
            [*run, "--video", "-", "--out", str(tmp_path / "pipe.wav"), "--mux", str(tmp_path / "pipe.mp4")],
            stdin=pipe,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    assert piped.returncode == 0, piped.stderr
    from_file = subprocess.run(
        [*run, "--video", str(video), "--out", str(tmp_path / "file.wav")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert from_file.returncode == 0, from_file.stderr
    audio = soundfile.read(tmp_path / "pipe.wav")[0]
    assert audio.shape == (6 * SAMPLES, 2) and np.abs(audio).max() > 0
    np.testing.assert_array_equal(audio, soundfile.read(tmp_path / "file.wav")[0])
    assert _muxed_frames(tmp_path / "pipe.mp4")[0] == 6
