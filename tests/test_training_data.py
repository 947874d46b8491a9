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
