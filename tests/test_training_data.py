"""Training data: the synthetic audio-visual set, the folder-of-videos set and the DINOv2 grid cache."""

import numpy as np
import pytest

from soundreactor.training.synthetic import SAMPLES_PER_FRAME, SyntheticAV, make_clip


def _isolated(clips, before_s: float, after_s: float):
    """(clip, event) pairs with no other impact from before_s seconds before to after_s after."""
    out = []
    for clip in clips:
        samples = np.array([e.sample for e in clip.events])
        for e in clip.events:
            near = (samples > e.sample - before_s * 48000) & (samples < e.sample + after_s * 48000)
            if near.sum() == 1:
                out.append((clip, e))
    return out


@pytest.fixture(scope="module")
def clips():
    return [make_clip(seed, 150) for seed in range(8)]


@pytest.fixture(scope="module")
def solo_events():
    """Impacts of one shape alone, at least 0.3 s after any other, so no earlier ringing masks them."""
    return _isolated([make_clip(seed, 150, shapes=1) for seed in range(10)], 0.3, 0.05)


def test_synthetic_is_deterministic_and_shaped():
    a, b = make_clip(11, 20, hum=True), make_clip(11, 20, hum=True)
    assert a.frames.shape == (20, 56, 112, 3) and a.frames.dtype == np.uint8
    assert a.audio.shape == (2, 20 * SAMPLES_PER_FRAME) and a.audio.dtype == np.float32
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.audio, b.audio)
    assert a.events == b.events
    assert not np.array_equal(a.audio, make_clip(12, 20, hum=True).audio)
    data = SyntheticAV(seed=3, length=4, n_frames=8)
    np.testing.assert_array_equal(data[2].audio, SyntheticAV(seed=3, length=4, n_frames=8)[2].audio)
    assert not np.array_equal(data[1].frames, data[2].frames)
    with pytest.raises(IndexError):
        data[4]


def test_impacts_start_at_their_frames_sample(clips):
    firsts = [c.events[0] for c in clips if c.events]
    assert len(firsts) >= 6
    for clip in clips:
        assert all(e.sample == e.frame * SAMPLES_PER_FRAME for e in clip.events)
        assert all(0 < e.frame < len(clip.frames) for e in clip.events)
        if clip.events:  # without a hum, the clip is exactly silent until the first impact, then sounds
            start = clip.events[0].sample
            assert not clip.audio[:, :start].any()
            assert np.abs(clip.audio[:, start : start + 48]).max() > 1e-3


def test_pan_follows_x(solo_events):
    assert len(solo_events) >= 20
    balance, x = [], []
    for clip, e in solo_events:
        left, right = (clip.audio[:, e.sample : e.sample + 960].astype(np.float64) ** 2).sum(1)
        balance.append((right - left) / (right + left))
        x.append(e.x)
    assert np.corrcoef(balance, x)[0, 1] > 0.95
    # Equal-power pan (gains cos, sin of x pi/2) puts the energy balance at -cos(pi x).
    np.testing.assert_allclose(balance, -np.cos(np.pi * np.array(x)), atol=0.1)


def test_pitch_follows_size(solo_events):
    peaks, sizes = [], []
    for clip, e in solo_events:
        mono = clip.audio[:, e.sample : e.sample + 4800].sum(0)
        spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono)), n=48000))  # 1 Hz bins
        spectrum[:100] = 0  # below any impact's pitch
        peaks.append(np.argmax(spectrum))
        sizes.append(e.size)
    assert len(set(sizes)) >= 8
    # Smaller shapes ring higher: strongly negative correlation in log-log.
    assert np.corrcoef(np.log(peaks), np.log(sizes))[0, 1] < -0.9


def _write_av(
    path,
    seconds: float,
    fps: int = 25,
    rate: int = 44100,
    click_s: float = 0.5,
    audio: bool = True,
    delay: int = 0,
):
    """A ffv1 + mono PCM MKV: gray level 8 + 4 * i in input frame i; silence but one click at click_s.

    The audio stream starts `delay` samples after the first video frame.
    """
    import av

    with av.open(str(path), "w") as out:
        video = out.add_stream("ffv1", rate=fps)
        video.width, video.height, video.pix_fmt = 48, 32, "yuv420p"
        if audio:
            sound = out.add_stream("pcm_s16le", rate=rate, layout="mono")
        for i in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 8 + 4 * i, np.uint8), format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if audio:
            samples = np.zeros((1, round(seconds * rate)), np.int16)
            samples[0, round(click_s * rate)] = 20000
            for start in range(0, samples.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(
                    samples[:, start : start + 1024], format="s16", layout="mono"
                )
                frame.sample_rate, frame.pts = rate, start + delay
                out.mux(sound.encode(frame))
            out.mux(sound.encode(None))
    return path


def test_video_folder_resamples_to_30_fps_and_48_khz_stereo(tmp_path):
    from soundreactor.training.data import VideoFolder

    _write_av(tmp_path / "a.mkv", 1.0)
    _write_av(tmp_path / "silent.mkv", 1.0, audio=False)
    (tmp_path / "notes.txt").write_text("not a video")
    data = VideoFolder(tmp_path, n_frames=12)
    assert len(data) == 2  # 30 frames at 30 fps: two whole clips of 12
    assert [p.name for p, _ in data.skipped] == ["notes.txt", "silent.mkv"]
    clip = data[1]
    assert clip.frames.shape == (12, 32, 48, 3) and clip.frames.dtype == np.uint8
    assert clip.audio.shape == (2, 12 * SAMPLES_PER_FRAME) and clip.audio.dtype == np.float32
    assert clip.events == ()
    # Output frame 12 + j shows the latest 25 fps input frame at or before (12 + j) / 30 s.
    levels = [round((float(f.mean()) - 8) / 4) for f in clip.frames]
    assert levels == [(12 + j) * 25 // 30 for j in range(12)]
    # Mono is copied to both channels; the click at 0.5 s lands at 48 kHz sample 24000, i.e. 4800 into clip 1.
    np.testing.assert_array_equal(clip.audio[0], clip.audio[1])
    assert abs(int(np.argmax(np.abs(clip.audio[0]))) - 4800) <= 2
    assert data.clip_id(0) != data.clip_id(1)
    with pytest.raises(IndexError):
        data[2]


def test_audio_is_aligned_to_the_first_video_frame(tmp_path):
    from soundreactor.training.data import read_audio

    # Audio starting 0.1 s late: its click at 0.5 s of its own is 0.6 s after the first frame.
    audio = read_audio(_write_av(tmp_path / "late.mkv", 1.0, delay=4410))
    assert audio.shape[0] == 2 and not audio[:, :4700].any()
    assert abs(int(np.argmax(np.abs(audio[0]))) - 28800) <= 2


def test_video_folder_errors_name_the_problem(tmp_path):
    from soundreactor.training.data import VideoFolder

    with pytest.raises(FileNotFoundError, match="video folder not found"):
        VideoFolder(tmp_path / "missing", 8)
    _write_av(tmp_path / "silent.mkv", 0.5, audio=False)
    with pytest.raises(ValueError, match="no video under"):
        VideoFolder(tmp_path, 8)


def _truncate(path, fraction: float):
    """Keep the first `fraction` of the file's bytes: its header still states the whole duration."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _write_audio_only(path):
    import av

    with av.open(str(path), "w") as out:
        sound = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        out.mux(sound.encode(frame))
        out.mux(sound.encode(None))


def test_video_folder_reports_every_skipped_file_with_its_reason(tmp_path):
    from soundreactor.training.data import VideoFolder

    _write_av(tmp_path / "good.mkv", 1.0)
    _write_av(tmp_path / "silent.mkv", 1.0, audio=False)
    _write_av(tmp_path / "short.mkv", 0.2, click_s=0.1)
    _write_audio_only(tmp_path / "podcast.mkv")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x01 not a container " * 50)
    (tmp_path / "notes.txt").write_text("not a video")
    (tmp_path / ".cache").mkdir()
    _write_av(tmp_path / ".cache" / "hidden.mkv", 1.0)  # dot folders (a grid cache, say) are not data
    data = VideoFolder(tmp_path, n_frames=12)
    assert len(data) == 2 and data.videos == 1
    reasons = {path.name: why for path, why in data.skipped}
    assert set(reasons) == {"silent.mkv", "short.mkv", "podcast.mkv", "broken.mp4", "notes.txt"}
    assert reasons["silent.mkv"] == "no audio track"
    assert reasons["short.mkv"] == "too short: 0.20 s with sound, a clip is 0.40 s"
    assert reasons["podcast.mkv"] == "not a video: it has no video stream"
    assert reasons["broken.mp4"].startswith("unreadable: ")
    assert reasons["notes.txt"].startswith("not a video (read: .mp4")
    report = data.report()
    assert report[0] == f"{tmp_path}: 2 clips of 12 frames from 1 video"
    assert (
        report[1] == "skipped 5 files:"
        and "  short.mkv: too short: 0.20 s with sound, a clip is 0.40 s" in report
    )


def test_a_truncated_file_gives_the_clips_it_holds_not_those_its_header_states(tmp_path):
    from soundreactor.media import probe_video
    from soundreactor.training.data import VideoFolder, measured_seconds

    path = _truncate(_write_av(tmp_path / "cut.mkv", 2.0), 0.5)
    assert probe_video(path).duration_s == 2.0  # the header still says 2 s
    seconds = measured_seconds(path)
    assert 0.8 < seconds < 1.2  # half the bytes: about half the (constant-rate) content
    data = VideoFolder(tmp_path, n_frames=12)
    assert len(data) == int(seconds * 30) // 12
    for i in range(len(data)):
        assert data[i].frames.shape == (12, 32, 48, 3)  # every clip admitted is read whole
    assert not data.replaced


def test_a_clip_found_unreadable_in_training_is_replaced_not_a_crash(tmp_path, capsys):
    from soundreactor.training.data import VideoFolder

    _write_av(tmp_path / "a.mkv", 1.0)
    _write_av(tmp_path / "b.mkv", 1.0)
    scanned = VideoFolder(tmp_path, n_frames=12)  # a, b: two clips each
    first = scanned[0]
    _truncate(tmp_path / "b.mkv", 0.6)  # cut while training runs (a copy still in progress, a full disk)
    clip = scanned[3]  # b's second clip is gone: the next readable one, wrapping round, is a's first
    np.testing.assert_array_equal(clip.frames, first.frames)
    np.testing.assert_array_equal(clip.audio, first.audio)
    assert scanned.replaced == {3: 0} and scanned.clip_id(3) == scanned.clip_id(0)
    err = capsys.readouterr().err
    assert f"skipping {tmp_path / 'b.mkv'} frames 12..23: {tmp_path / 'b.mkv'} ends at frame" in err
    assert f"reading {tmp_path / 'a.mkv'} frames 0..11 instead" in err
    # a resumed run measures the truncated file: b now gives one clip, readable, so none is replaced
    resumed = VideoFolder(tmp_path, n_frames=12)
    assert len(resumed) == 3 and all(resumed[i].frames.shape[0] == 12 for i in range(3))
    assert not resumed.replaced


@pytest.fixture(scope="module")
def tiny_model():
    from soundreactor.model.soundreactor import init_model

    return init_model("tiny", seed=0)[0]


def test_clip_grids_equal_the_streaming_vision_encoder(tiny_model):
    import torch

    from soundreactor.training.data import clip_grids

    frames = make_clip(2, 5).frames
    grids = clip_grids(tiny_model, frames, batch=2)
    cfg = tiny_model.config
    assert grids.shape == (5, *cfg.grid_hw, cfg.dinov2.dim) and grids.dtype == torch.float32
    with torch.no_grad():
        zeros = torch.zeros(1, *cfg.grid_hw, cfg.dinov2.dim)
        for i in range(5):
            _, grid = tiny_model.vision(torch.from_numpy(frames[i : i + 1]), zeros, torch.tensor([False]))
            # Same modules in fp32; batching may change the summation order only.
            torch.testing.assert_close(grids[i], grid[0], rtol=1e-5, atol=1e-5)


def test_grid_cache_hits_and_is_keyed_by_weights(tiny_model, tmp_path):
    import torch

    from soundreactor.model.soundreactor import init_model
    from soundreactor.training.data import GridCache, clip_grids

    frames = make_clip(4, 3).frames
    cache = GridCache(tmp_path, tiny_model)
    first = cache.grids("synthetic/4/3", frames)
    second = cache.grids("synthetic/4/3", frames)
    assert (cache.misses, cache.hits) == (1, 1)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # warm and cold give the same values
    # float16 storage: relative rounding 2**-11 of each value.
    fresh = clip_grids(tiny_model, frames)
    torch.testing.assert_close(first, fresh, rtol=2**-10, atol=1e-6)
    assert not list(tmp_path.rglob("*.tmp"))
    other = GridCache(tmp_path, init_model("tiny", seed=1)[0])
    assert other.root != cache.root
    regrid = other.grids("synthetic/4/3", frames)
    assert (other.misses, other.hits) == (1, 0)
    assert not torch.allclose(regrid, first)
    again = GridCache(tmp_path, tiny_model)
    again.grids("synthetic/4/3", frames)
    assert (again.misses, again.hits) == (0, 1)  # a new instance on the same weights reads the files


def test_a_damaged_or_non_finite_grid_cache_file_is_computed_again(tiny_model, tmp_path):
    import torch
    from safetensors.torch import save_file

    from soundreactor.training.data import GridCache

    frames = make_clip(4, 3).frames
    cache = GridCache(tmp_path, tiny_model)
    want = cache.grids("clip", frames)
    path = cache.path("clip", frames.shape[1:3])
    path.write_bytes(path.read_bytes()[:-64])  # cut short
    torch.testing.assert_close(cache.grids("clip", frames), want, rtol=0, atol=0)
    nan = torch.full(want.shape, float("nan"), dtype=torch.float16)
    save_file({"grids": nan}, str(path), metadata={"clip_id": "clip"})
    torch.testing.assert_close(cache.grids("clip", frames), want, rtol=0, atol=0)
    assert (cache.misses, cache.hits) == (3, 0)
    again = GridCache(tmp_path, tiny_model)  # the file was rewritten whole
    torch.testing.assert_close(again.grids("clip", frames), want, rtol=0, atol=0)
    assert again.hits == 1
