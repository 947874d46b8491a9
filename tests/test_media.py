import itertools
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile as sf

from soundreactor.demo_video import demo_frames, make_demo_video
from soundreactor.media import (
    TIMESTAMP_TOLERANCE,
    WAV_SIZE_LIMIT,
    VideoReader,
    WavWriter,
    mux,
    pick_video_encoder,
    probe_video,
    read_frames,
    write_wav,
)

SIZE = (64, 112)
LEVEL_STEP = 4  # gray level of input frame i is 8 + LEVEL_STEP * i, so decoded levels identify the frame


def _write_level_video(path, times: list[Fraction], codec: str, time_base: Fraction):
    """Flat gray frames, frame i at times[i], level 8 + LEVEL_STEP * i."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=round(1 / time_base))
        stream.width, stream.height, stream.pix_fmt = SIZE[1], SIZE[0], "yuv420p"
        stream.codec_context.time_base = time_base
        if codec == "h264":
            stream.options = {"qp": "0"}  # lossless
        elif codec != "ffv1":  # lossy: at a high rate flat frames decode within a level or two
            stream.bit_rate = 4_000_000
        for i, t in enumerate(times):
            rgb = np.full((*SIZE, 3), 8 + LEVEL_STEP * i, np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = int(t / time_base), time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def _decoded_indices(path) -> list[int]:
    frames = list(read_frames(path, fps=30))
    # Repeated frames are separate arrays, so a caller may modify one without touching the next.
    assert not any(np.shares_memory(a, b) for a, b in itertools.pairwise(frames))
    for f in frames:  # flat frames stay flat (at most 2 levels of yuv rounding)
        assert f.max() - f.min() <= 2
    return [round((float(f.mean()) - 8) / LEVEL_STEP) for f in frames]


def _latest_at_or_before(times: list[Fraction], t: Fraction) -> int:
    return max(i for i, ti in enumerate(times) if ti <= t + TIMESTAMP_TOLERANCE)


@pytest.fixture(scope="module")
def demo_mp4(tmp_path_factory):
    return make_demo_video(tmp_path_factory.mktemp("media") / "demo.mp4", seconds=1.0, size=SIZE)


def test_demo_frames_deterministic_per_seed():
    a, b = list(demo_frames(5, SIZE, seed=3)), list(demo_frames(5, SIZE, seed=3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], next(demo_frames(1, SIZE, seed=4)))
    assert not np.array_equal(a[0], a[4])  # shapes move


def test_read_demo_video(demo_mp4):
    info = probe_video(demo_mp4)
    assert (info.height, info.width, info.fps, info.frame_count) == (*SIZE, 30.0, 30)
    assert info.duration_s == pytest.approx(1.0, abs=1e-6)
    frames = list(read_frames(demo_mp4))
    assert len(frames) == 30
    assert all(f.shape == (*SIZE, 3) and f.dtype == np.uint8 for f in frames)
    # Lossy H.264 at crf 18: frames match their source within a few gray levels on average.
    errors = [np.abs(f.astype(int) - s).mean() for f, s in zip(frames, demo_frames(30, SIZE), strict=True)]
    assert max(errors) < 6.0, errors


def test_resample_60fps_drops_every_other_frame(tmp_path):
    path = tmp_path / "60.mkv"
    _write_level_video(path, [Fraction(i, 60) for i in range(60)], "ffv1", Fraction(1, 60))
    assert _decoded_indices(path) == [2 * k for k in range(30)]


def test_resample_24fps_mp4_repeats_frames(tmp_path):
    path = tmp_path / "24.mp4"
    _write_level_video(path, [Fraction(i, 24) for i in range(24)], pick_video_encoder(), Fraction(1, 24))
    # Output k shows input floor(k * 24 / 30): 0, 0, 1, 2, 3, 4, 4, ...
    assert _decoded_indices(path) == [k * 24 // 30 for k in range(30)]


def test_resample_variable_frame_rate(tmp_path):
    gaps_ms = np.random.default_rng(0).integers(10, 70, 24)
    times = [Fraction(int(ms), 1000) for ms in np.concatenate([[0], np.cumsum(gaps_ms)[:-1]])]
    path = tmp_path / "vfr.mkv"
    _write_level_video(path, times, "ffv1", Fraction(1, 1000))
    got = _decoded_indices(path)
    expected = [_latest_at_or_before(times, Fraction(k, 30)) for k in range(int(times[-1] * 30) + 1)]
    # The last frame's display time is not stored in MKV, so the tail may hold one more repeat.
    assert got[: len(expected)] == expected
    assert len(got) - len(expected) in (0, 1)


def test_bad_inputs_name_the_file(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(FileNotFoundError, match=r"missing\.mp4"):
        read_frames(missing)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 10)
    with pytest.raises(ValueError, match=r"notes\.mp4"):
        probe_video(text)
    wav = tmp_path / "sound.wav"
    write_wav(wav, np.zeros((2, 1600), np.float32))
    with pytest.raises(ValueError, match=r"sound\.wav has no video stream"):
        read_frames(wav)
    with pytest.raises(ValueError, match=r"shape \[2, N\]"):
        write_wav(wav, np.zeros((1600, 2), np.float32))


def test_wav_round_trip_is_exact(tmp_path):
    audio = np.random.default_rng(0).uniform(-1.2, 1.2, (2, 4800)).astype(np.float32)
    write_wav(tmp_path / "a.wav", audio)
    data, rate = sf.read(tmp_path / "a.wav", dtype="float32", always_2d=True)
    assert rate == 48000 and data.shape == (4800, 2)
    np.testing.assert_array_equal(data.T, audio)  # float WAV: bit exact, overshoot past 1 kept


def test_wav_writer_keeps_chunks_on_exception(tmp_path):
    path = tmp_path / "stream.wav"
    chunks = np.random.default_rng(1).standard_normal((3, 2, 1600)).astype(np.float32)
    with pytest.raises(RuntimeError, match="frame 3 failed"), WavWriter(path) as writer:
        for chunk in chunks:
            writer.write(chunk)
        # Flushed but still open: everything written so far is readable.
        assert sf.read(path, always_2d=True)[0].shape == (4800, 2)
        raise RuntimeError("frame 3 failed")
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    assert rate == 48000 and writer.frames_written == 4800
    np.testing.assert_array_equal(data.T, np.concatenate(list(chunks), axis=1))


def test_wav_writer_counts_what_reached_the_file(tmp_path, monkeypatch):
    """An interrupt between a chunk reaching the file and the writer counting it: the file's count is told."""
    writer = WavWriter(tmp_path / "stream.wav")
    writer.write(np.zeros((2, 1600), np.float32))
    flush = writer._file.flush

    def interrupted_flush():
        flush()
        monkeypatch.undo()  # once
        raise KeyboardInterrupt  # where a SIGTERM's handler can land: written, not yet counted

    monkeypatch.setattr(writer._file, "flush", interrupted_flush)
    with pytest.raises(KeyboardInterrupt):
        writer.write(np.zeros((2, 1600), np.float32))
    assert writer.frames_written == 1600 and writer.frames_on_disk() == 3200


def _decode_audio(path) -> tuple[np.ndarray, int, int]:
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        audio = np.concatenate([f.to_ndarray() for f in c.decode(stream)], axis=1)
        return audio, stream.rate, stream.channels


def _stream_kinds(path) -> list[tuple[str, str]]:
    with av.open(str(path)) as c:
        return [(s.type, s.codec_context.name) for s in c.streams]


def test_mux_copies_video_and_trims_audio(tmp_path, demo_mp4):
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(72000) / 48000).astype(np.float32)
    write_wav(tmp_path / "a.wav", np.stack([tone, tone]))  # 1.5 s for a 1 s video
    mux(demo_mp4, tmp_path / "a.wav", tmp_path / "out.mp4")
    assert _stream_kinds(tmp_path / "out.mp4") == [("video", pick_video_encoder()), ("audio", "aac")]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.mp4").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    audio, rate, channels = _decode_audio(tmp_path / "out.mp4")
    assert (rate, channels) == (48000, 2)
    assert abs(audio.shape[1] - 48000) <= 1024  # AAC pads to whole 1024-sample frames
    assert len(list(read_frames(tmp_path / "out.mp4"))) == 30


def test_mux_reencodes_unsupported_codec_and_pads_audio(tmp_path):
    video = tmp_path / "levels.mkv"  # VP8, which MP4 cannot hold
    _write_level_video(video, [Fraction(i, 30) for i in range(30)], "libvpx", Fraction(1, 30))
    write_wav(tmp_path / "a.wav", np.full((2, 24000), 0.5, np.float32))  # 0.5 s for a 1 s video
    mux(video, tmp_path / "a.wav", tmp_path / "out.mp4")
    assert _stream_kinds(tmp_path / "out.mp4") == [("video", pick_video_encoder()), ("audio", "aac")]
    audio, _, _ = _decode_audio(tmp_path / "out.mp4")
    assert abs(audio.shape[1] - 48000) <= 1024
    assert np.abs(audio[:, -12000:]).max() < 1e-3  # padded tail is silence
    assert _decoded_indices(tmp_path / "out.mp4") == list(range(30))


def _encode(path, frames: list[np.ndarray], codec: str = "mpeg4", start_pts: int = 0, fmt=None, **options):
    """Encode RGB frames at 30 fps, frame i at pts start_pts + i (time base 1/30)."""
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=30)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        if codec == "libx264":
            stream.options = options
        else:
            for name, value in options.items():
                setattr(stream.codec_context, name, value)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = start_pts + i, Fraction(1, 30)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def _set_display_matrix(path, matrix: tuple[int, ...]) -> None:
    """Write a 3x3 display matrix (a b u c d v x y w; 16.16 and 2.30 fixed point) into an MP4's track header,
    as phones store portrait clips (ISO/IEC 14496-12 tkhd); PyAV has no API for stream side data."""
    data = bytearray(path.read_bytes())
    at = data.index(b"tkhd")
    version = data[at + 4]
    # tkhd: version+flags, 3 times (4 or 8 bytes), track id, reserved, duration; then reserved 8, layer,
    # alternate group, volume, reserved 2, matrix.
    offset = at + 8 + (32 if version == 1 else 20) + 16
    data[offset : offset + 36] = struct.pack(">9i", *matrix)
    path.write_bytes(data)


def _marked_frame(height: int, width: int) -> np.ndarray:
    """Dark frame with a bright block at the stored top-left corner, so orientation is visible."""
    rgb = np.full((height, width, 3), 30, np.uint8)
    rgb[: height // 2, : width // 3] = 220
    return rgb


# Display matrices as phones write them, and how FFmpeg shows the stored frame (np.rot90 turns counterclockwise).
ROTATIONS = {
    90: ((0, 1 << 16, 0, -(1 << 16), 0, 0, 32 << 16, 0, 1 << 30), lambda f: np.rot90(f, -1)),
    180: ((-(1 << 16), 0, 0, 0, -(1 << 16), 0, 48 << 16, 32 << 16, 1 << 30), lambda f: np.rot90(f, 2)),
    270: ((0, -(1 << 16), 0, 1 << 16, 0, 0, 0, 48 << 16, 1 << 30), lambda f: np.rot90(f, 1)),
}


@pytest.mark.parametrize("degrees", sorted(ROTATIONS))
def test_rotated_clip_reaches_the_model_as_displayed(tmp_path, degrees):
    stored = _marked_frame(32, 48)
    path = _encode(tmp_path / "phone.mp4", [stored] * 3)
    matrix, display = ROTATIONS[degrees]
    _set_display_matrix(path, matrix)
    expected = display(stored)
    info = probe_video(path)
    assert (info.height, info.width, info.rotation) == (*expected.shape[:2], degrees)
    frames = list(read_frames(path))
    assert len(frames) == 3 and frames[0].shape == expected.shape
    assert np.abs(frames[0].astype(int) - expected).mean() < 6  # lossy MPEG-4, flat regions
    # Scaling to a session size keeps the displayed orientation.
    scaled = next(read_frames(path, size=(expected.shape[0] * 2, expected.shape[1] * 2)))
    assert np.abs(scaled[::2, ::2].astype(int) - expected).mean() < 12


def test_resolution_change_midway_is_scaled_to_one_size(tmp_path):
    """A call recording whose resolution changes: MPEG-TS segments concatenate into one stream."""
    first = _encode(tmp_path / "a.ts", [_marked_frame(32, 48)] * 4, "mpeg2video", fmt="mpegts")
    second = _encode(tmp_path / "b.ts", [_marked_frame(48, 64)] * 4, "mpeg2video", start_pts=4, fmt="mpegts")
    joined = tmp_path / "call.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    as_stored = list(read_frames(joined))
    assert {f.shape for f in as_stored} == {(32, 48, 3), (48, 64, 3)}  # the stream really changes size
    frames = list(read_frames(joined, size=(32, 48)))
    assert len(frames) == len(as_stored) >= 6 and {f.shape for f in frames} == {(32, 48, 3)}
    for f in frames:  # both halves show the marker where the source had it
        assert f[:12, :12].mean() > 150 and f[20:, 24:].mean() < 60


@pytest.mark.parametrize("suffix, codec", [("mp3", "libmp3lame"), ("flac", "flac")])
def test_audio_with_cover_art_has_no_video(tmp_path, suffix, codec):
    path = tmp_path / f"song.{suffix}"
    with av.open(str(path), "w") as out:
        audio = out.add_stream(codec, rate=48000, layout="stereo")
        cover = out.add_stream("png", rate=1)
        cover.width, cover.height, cover.pix_fmt = 16, 16, "rgb24"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 200, np.uint8), format="rgb24")
        picture.pts = 0
        out.mux([*cover.encode(picture), *cover.encode(None)])
        samples = audio.codec_context.frame_size or 1152
        fmt = audio.codec_context.format.name
        for i in range(3):
            silent = av.AudioFrame(format=fmt, layout="stereo", samples=samples)
            for plane in silent.planes:
                plane.update(bytes(plane.buffer_size))
            silent.sample_rate, silent.pts = 48000, i * samples
            out.mux(audio.encode(silent))
        out.mux(audio.encode(None))
    with av.open(str(path)) as c:  # the cover is a video stream to FFmpeg, claiming 90,000 fps
        assert [s.type for s in c.streams] == ["audio", "video"]
    for call in (probe_video, read_frames):
        with pytest.raises(ValueError, match=r"has no video stream \(it holds audio and 1 attached picture"):
            call(path)


def _first_times(path) -> dict[str, float]:
    """Presentation time of the first decoded frame of each stream kind."""
    times = {}
    with av.open(str(path)) as c:
        for kind in ("video", "audio"):
            stream = getattr(c.streams, kind)[0]
            c.seek(0)
            frame = next(c.decode(stream))
            times[kind] = float(frame.pts * frame.time_base)
    return times


def test_mux_starts_audio_at_the_first_shown_frame(tmp_path):
    video = _encode(tmp_path / "late.mp4", [_marked_frame(32, 48)] * 6, start_pts=300)  # first frame at 10 s
    write_wav(tmp_path / "a.wav", np.full((2, 9600), 0.25, np.float32))  # 6 frames of 1600 samples
    mux(video, tmp_path / "a.wav", tmp_path / "out.mp4")
    times = _first_times(tmp_path / "out.mp4")
    assert times["video"] == pytest.approx(10.0, abs=1e-3)
    assert times["audio"] == pytest.approx(10.0, abs=1024 / 48000)  # AAC priming: at most one frame early
    audio, _, _ = _decode_audio(tmp_path / "out.mp4")
    assert abs(audio.shape[1] - 9600) <= 2048


def test_mux_copies_b_frame_mkv_with_every_frame(tmp_path):
    levels = [np.full((32, 48, 3), 20 + 25 * i, np.uint8) for i in range(8)]
    codec = "libx264" if pick_video_encoder() == "h264" else "mpeg4"
    options = {"bframes": "2"} if codec == "libx264" else {"max_b_frames": 2}
    video = _encode(tmp_path / "b.mkv", levels, codec, **options)
    with av.open(str(video)) as c:  # the MKV demuxer leaves the keyframe's DTS unset
        packets = [p for p in c.demux(c.streams.video[0]) if p.size]
        assert len(packets) == 8 and packets[0].is_keyframe
        if codec == "libx264":
            assert packets[0].dts is None
    write_wav(tmp_path / "a.wav", np.zeros((2, 8 * 1600), np.float32))
    name = "h264" if codec == "libx264" else "mpeg4"
    assert mux(video, tmp_path / "a.wav", tmp_path / "out.mp4") == [f"video stream 0 ({name}): copied"]
    decoded = [round((float(f.mean()) - 20) / 25) for f in read_frames(tmp_path / "out.mp4")]
    assert decoded == list(range(8))


def test_mux_copies_every_video_stream(tmp_path):
    video = tmp_path / "two.mkv"
    with av.open(str(video), "w") as out:
        streams = [out.add_stream("mpeg4", rate=30), out.add_stream("libvpx", rate=30)]
        for stream, (h, w) in zip(streams, [(32, 48), (16, 32)], strict=True):
            stream.height, stream.width, stream.pix_fmt, stream.bit_rate = h, w, "yuv420p", 2_000_000
        for i in range(6):
            for stream in streams:
                frame = av.VideoFrame.from_ndarray(
                    np.full((stream.height, stream.width, 3), 40 * i, np.uint8), format="rgb24"
                )
                frame.pts, frame.time_base = i, Fraction(1, 30)
                out.mux(stream.encode(frame))
        for stream in streams:
            out.mux(stream.encode(None))
    write_wav(tmp_path / "a.wav", np.zeros((2, 6 * 1600), np.float32))
    lines = mux(video, tmp_path / "a.wav", tmp_path / "out.mp4")
    assert [line.split(":")[1].split()[0] for line in lines] == ["copied", "re-encoded"]
    with av.open(str(tmp_path / "out.mp4")) as c:
        kinds = [(s.type, s.width if s.type == "video" else None) for s in c.streams]
        assert kinds == [("video", 48), ("video", 32), ("audio", None)]
        counts = [sum(1 for _ in c.decode(s)) for s in c.streams.video[:1]]
    assert counts == [6]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary file was renamed into place


def test_mux_failure_leaves_no_partial_file(tmp_path, demo_mp4):
    write_wav(tmp_path / "a.wav", np.zeros((2, 1600), np.float32))
    (tmp_path / "out.mp4").write_bytes(b"previous")
    with pytest.raises(ValueError):
        mux(tmp_path / "a.wav", tmp_path / "a.wav", tmp_path / "out.mp4")  # not a video
    assert (tmp_path / "out.mp4").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "out.mp4"]


def _riff_sizes(path) -> tuple[bytes, int, int, int]:
    """(magic, RIFF size, data chunk size, data offset) read from the chunk headers, as a strict reader does."""
    data = path.read_bytes()
    magic, riff_size = data[:4], struct.unpack("<I", data[4:8])[0]
    at = 12
    while data[at : at + 4] != b"data":
        at += 8 + struct.unpack("<I", data[at + 4 : at + 8])[0]
    return magic, riff_size, struct.unpack("<I", data[at + 4 : at + 8])[0], at + 8


def test_wav_header_is_current_after_every_write(tmp_path):
    path = tmp_path / "live.wav"
    with WavWriter(path) as writer:
        for n in range(1, 4):
            writer.write(np.zeros((2, 1600), np.float32))
            magic, riff_size, data_size, offset = _riff_sizes(path)
            size = path.stat().st_size
            assert (magic, riff_size, data_size) == (b"RIFF", size - 8, n * 1600 * 2 * 4)
            assert offset + data_size == size


def test_wav_survives_sigkill(tmp_path):
    """A real SIGKILL while the file is open: the header already holds the sizes of everything written."""
    path = tmp_path / "killed.wav"
    script = textwrap.dedent(
        f"""
        import sys, time
        import numpy as np
        from soundreactor.media import WavWriter
        writer = WavWriter({str(path)!r})
        for i in range(5):
            writer.write(np.full((2, 1600), i / 10, np.float32))
        print("written", flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "written"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    magic, riff_size, data_size, _ = _riff_sizes(path)
    assert (magic, riff_size, data_size) == (b"RIFF", path.stat().st_size - 8, 5 * 1600 * 2 * 4)
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    assert rate == 48000
    np.testing.assert_array_equal(audio[:, 0], np.repeat(np.arange(5, dtype=np.float32) / 10, 1600))


def test_wav_past_4_gib_switches_to_rf64_and_says_so(tmp_path):
    """libsndfile rewrites the header as RF64 once the file is longer than WAV's 32-bit sizes allow. The file is
    made that long sparsely (a hole, no data on disk) instead of writing 4 GiB."""
    path = tmp_path / "long.wav"
    notes = []
    with WavWriter(path, on_switch=notes.append) as writer:
        writer.write(np.zeros((2, 1600), np.float32))
        assert writer.container == "WAV" and not notes
        os.truncate(path, WAV_SIZE_LIMIT + 1)
        writer.write(np.zeros((2, 1600), np.float32))
        assert writer.container == "RF64"
        writer.write(np.zeros((2, 1600), np.float32))
    assert len(notes) == 1 and "continues as RF64" in notes[0] and str(path) in notes[0]
    with open(path, "rb") as f:
        head = f.read(12)
    assert head[:4] == b"RF64" and head[8:12] == b"WAVE"
    info = sf.info(str(path))  # the whole length, which a 32-bit WAV header cannot state
    assert info.format == "RF64" and info.frames * 8 > 2**32 - 1024


# Mirrored display matrices (a selfie camera's, or an editor's flip): a b c d of the 3x3 matrix in 16.16, the
# translation placing the picture; and how the stored frame is shown. The matrix maps stored (x, y) to
# (a x + c y, b x + d y) on screen (libavutil/display.h), so a < 0 flips columns and d < 0 flips rows.
ONE = 1 << 16
MIRRORS = {
    "hflip": ((-ONE, 0, 0, 0, ONE, 0, 48 << 16, 0, 1 << 30), lambda f: f[:, ::-1], 0),
    "vflip": ((ONE, 0, 0, 0, -ONE, 0, 0, 32 << 16, 1 << 30), lambda f: f[::-1], 180),
    "transpose": ((0, ONE, 0, ONE, 0, 0, 0, 0, 1 << 30), lambda f: f.transpose(1, 0, 2), 90),
    "antitranspose": (
        (0, -ONE, 0, -ONE, 0, 0, 32 << 16, 48 << 16, 1 << 30),
        lambda f: f.transpose(1, 0, 2)[::-1, ::-1],
        270,
    ),
}


@pytest.mark.parametrize("name", sorted(MIRRORS))
def test_mirrored_clip_reaches_the_model_as_displayed(tmp_path, name):
    stored = _marked_frame(32, 48)
    path = _encode(tmp_path / "mirror.mp4", [stored] * 3)
    matrix, display, degrees = MIRRORS[name]
    _set_display_matrix(path, matrix)
    expected = display(stored)
    info = probe_video(path)
    assert (info.height, info.width, info.rotation, info.mirrored) == (*expected.shape[:2], degrees, True)
    frames = list(read_frames(path))
    assert len(frames) == 3 and frames[0].shape == expected.shape
    assert np.abs(frames[0].astype(int) - expected).mean() < 6
    # Rotation alone would put the bright block in another corner.
    assert np.abs(frames[0].astype(int) - np.rot90(stored, -degrees // 90)).mean() > 30


def test_video_from_a_fifo_is_read_once_in_one_pass(tmp_path, demo_mp4):
    """A FIFO can be read once: the reader takes size and frames from one open (reopening would block)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(demo_mp4.read_bytes()))
    writer.start()
    try:
        with VideoReader(fifo, keep=tmp_path / "copy.mp4") as reader:
            assert (reader.info.height, reader.info.width) == SIZE
            frames = list(reader.frames())
            assert reader.finish() == tmp_path / "copy.mp4"
    finally:
        writer.join(timeout=30)
    expected = list(read_frames(demo_mp4))
    assert len(frames) == len(expected) == 30
    assert all(np.array_equal(a, b) for a, b in zip(frames, expected, strict=True))
    assert (tmp_path / "copy.mp4").read_bytes() == demo_mp4.read_bytes()  # every byte kept, for muxing


def test_a_folder_is_not_called_missing(tmp_path):
    with pytest.raises(ValueError, match="is a folder: give a video file"):
        probe_video(tmp_path)


def test_mux_copies_av1_whose_decoder_has_another_name(tmp_path):
    """FFmpeg decodes AV1 with libdav1d: the stream is still AV1, which MP4 holds, so it is copied."""
    try:
        encoder = next(n for n in ("libsvtav1", "libaom-av1", "librav1e") if _has_encoder(n))
    except StopIteration:
        pytest.skip("this FFmpeg build has no AV1 encoder to make the test clip")
    video = _encode(tmp_path / "av1.mkv", [np.full((64, 64, 3), 10 * i, np.uint8) for i in range(6)], encoder)
    write_wav(tmp_path / "a.wav", np.zeros((2, 9600), np.float32))
    lines = mux(video, tmp_path / "a.wav", tmp_path / "out.mp4")
    assert lines == ["video stream 0 (av1): copied"]
    assert _stream_kinds(tmp_path / "out.mp4")[0][0] == "video"
    with av.open(str(tmp_path / "out.mp4")) as c:
        assert c.streams.video[0].codec_context.codec.canonical_name == "av1"
        assert sum(1 for _ in c.decode(video=0)) == 6


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except av.codec.codec.UnknownCodecError:
        return False
    return True


def test_a_one_pixel_wide_video_muxes(tmp_path):
    """VP8 is re-encoded for MP4; yuv420p needs even sides, which must round up to 2, never down to 0."""
    video = _encode(tmp_path / "thin.webm", [np.full((8, 1, 3), 100, np.uint8)] * 4, "libvpx")
    write_wav(tmp_path / "a.wav", np.zeros((2, 6400), np.float32))
    mux(video, tmp_path / "a.wav", tmp_path / "out.mp4")
    with av.open(str(tmp_path / "out.mp4")) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 4 and (frames[0].width, frames[0].height) == (2, 8)


def test_mux_never_feeds_nan_to_the_encoder(tmp_path, demo_mp4):
    audio = np.zeros((2, 48000), np.float32)
    audio[1, 24000] = np.nan
    write_wav(tmp_path / "a.wav", audio)
    with pytest.raises(ValueError, match=r"a\.wav holds NaN or infinite samples \(0\.50 s in\)"):
        mux(demo_mp4, tmp_path / "a.wav", tmp_path / "out.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]


def test_mux_killed_midway_leaves_a_visible_partial_that_the_next_mux_replaces(tmp_path, demo_mp4):
    """A real SIGKILL while muxing (held after the first audio packet): no out.mp4, a `out.mp4.partial` in plain
    sight (not a hidden dot file); muxing again writes out.mp4 and leaves no partial."""
    write_wav(tmp_path / "a.wav", np.zeros((2, 48000), np.float32))
    script = textwrap.dedent(
        f"""
        import sys, time
        from soundreactor import media
        packets = media._audio_packets
        def held(*args, **kwargs):
            for i, packet in enumerate(packets(*args, **kwargs)):
                yield packet
                if i == 0:
                    print("muxing", flush=True)
                    time.sleep(60)
        media._audio_packets = held
        media.mux({str(demo_mp4)!r}, {str(tmp_path / "a.wav")!r}, {str(tmp_path / "out.mp4")!r})
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "muxing"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "out.mp4.partial"]
    mux(demo_mp4, tmp_path / "a.wav", tmp_path / "out.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "out.mp4"]
    with av.open(str(tmp_path / "out.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 30


def test_mux_refuses_a_name_that_is_not_mp4(tmp_path, demo_mp4):
    write_wav(tmp_path / "a.wav", np.zeros((2, 1600), np.float32))
    with pytest.raises(ValueError, match=r"'\.mkv' names another format; name it out\.mp4"):
        mux(demo_mp4, tmp_path / "a.wav", tmp_path / "out.mkv")
    assert not (tmp_path / "out.mkv").exists()


def test_wav_writer_turns_refusals_into_errors_naming_the_file(tmp_path):
    with pytest.raises(OSError, match=r"cannot write /proc/soundreactor\.wav"):
        WavWriter("/proc/soundreactor.wav")  # a virtual file system: no new files, whoever we are
    with pytest.raises(ValueError, match=r"'\.flac' names another format"):
        WavWriter(tmp_path / "a.flac")
    name = tmp_path / os.fsdecode(b"\xff.wav")
    with WavWriter(name) as out:
        out.write(np.zeros((2, 1600), np.float32))
    assert sf.info(os.fsencode(name)).frames == 1600


def test_wav_writer_refuses_non_finite_chunks_keeping_the_rest(tmp_path):
    with WavWriter(tmp_path / "a.wav") as out:
        out.write(np.full((2, 1600), 0.25, np.float32))
        for bad in (np.nan, np.inf, -np.inf):
            chunk = np.zeros((2, 1600), np.float32)
            chunk[0, 7] = bad
            with pytest.raises(ValueError, match=r"NaN or infinite samples was not written to .*a\.wav"):
                out.write(chunk)
        out.write(np.full((2, 1600), 0.5, np.float32))
    audio, _ = sf.read(tmp_path / "a.wav", dtype="float32")
    assert audio.shape == (3200, 2) and np.isfinite(audio).all()
    assert (audio[:1600] == 0.25).all() and (audio[1600:] == 0.5).all()
