import itertools
from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile as sf

from soundreactor.demo_video import demo_frames, make_demo_video
from soundreactor.media import (
    TIMESTAMP_TOLERANCE,
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
