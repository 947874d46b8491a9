"""Streaming sessions against the cache-free offline reference, and the session's behaviour on bad input."""

import threading
from collections import Counter

import numpy as np
import pytest
import torch

from soundreactor.demo_video import demo_frames
from soundreactor.model.soundreactor import generate_offline, init_model
from soundreactor.runtime.session import FrameError, Session
from soundreactor.runtime.torch_backend import TorchStreams

FRAME_HW = (48, 80)
# tiny preset: window 16 tokens = 8 frames, so 20 frames wrap the KV ring twice
FRAMES = 20


@pytest.fixture(scope="module")
def model():
    model, _ = init_model("tiny", seed=3, input_hw=FRAME_HW)
    return model


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.stack(list(demo_frames(FRAMES, size=FRAME_HW, seed=1)))


def run_session(session: Session, frames: np.ndarray) -> np.ndarray:
    return np.concatenate([session.step(f) for f in frames], axis=1)


@pytest.mark.parametrize("nfe", [1, 4])
def test_streaming_equals_offline(model, frames, nfe):
    model.configure_sampling(nfe=nfe)
    offline, _ = generate_offline(model, torch.from_numpy(frames), seed=7)
    streamed = run_session(Session(TorchStreams(model, seed=7)), frames)
    assert streamed.shape == (2, FRAMES * 1600)
    # fp32: the two paths differ only in rounding (cached vs recomputed K/V, read-time RoPE)
    np.testing.assert_allclose(streamed, offline.numpy(), atol=2e-5, rtol=0)  # measured 1e-6
    assert np.abs(offline.numpy()).max() > 1e-3  # not trivially silent


def test_reset_replays_the_stream(model, frames):
    session = Session(TorchStreams(model, seed=5))
    first = run_session(session, frames[:6])
    session.reset()
    np.testing.assert_array_equal(run_session(session, frames[:6]), first)


def test_bad_frames_leave_the_stream_intact(model, frames):
    model.configure_sampling(nfe=2)
    clean = Session(TorchStreams(model, seed=2))
    hit = Session(TorchStreams(model, seed=2))
    expected = run_session(clean, frames[:12])
    out = []
    bad_inputs = [
        (frames[0][:-2], "does not match"),  # wrong size
        (frames[0][..., :2], "3 colour channels"),  # wrong channel count
        (frames[0].astype(np.int32), "dtype"),  # wrong dtype
        (np.full(frames[0].shape, np.nan, np.float32), "NaN"),
        (frames[0].astype(np.float32), r"\[0, 1\]"),  # float but 0..255
        (frames[:2], "one frame"),  # a batch where one frame belongs
        (torch.from_numpy(frames[0]).to(torch.bfloat16) / 255, "bfloat16 have no numpy equivalent"),
        (torch.empty(frames[0].shape, dtype=torch.uint8, device="meta"), "meta-device tensor"),
    ]
    for i, frame in enumerate(frames[:12]):
        bad, message = bad_inputs[i % len(bad_inputs)]
        with pytest.raises(FrameError, match=message):
            hit.step(bad)
        out.append(hit.step(frame))
    np.testing.assert_array_equal(np.concatenate(out, axis=1), expected)


def test_failure_inside_the_model_rolls_back(model, frames, monkeypatch):
    """An exception after the KV cache was written must leave no trace: the retry equals a clean run."""
    model.configure_sampling(nfe=1)
    clean = Session(TorchStreams(model, seed=4))
    expected = run_session(clean, frames[:10])
    session = Session(TorchStreams(model, seed=4))
    out = [session.step(f) for f in frames[:9]]

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    with monkeypatch.context() as patch:
        patch.setattr(model.vae.decoder, "step", broken)
        with pytest.raises(RuntimeError, match="simulated"):
            session.step(frames[9])
    out.append(session.step(frames[9]))
    np.testing.assert_array_equal(np.concatenate(out, axis=1), expected)


def test_slots_are_independent(model, frames):
    """Two slots with skips and a mid-stream reset each equal a single-stream session fed the same frames."""
    model.configure_sampling(nfe=2)
    streams = TorchStreams(model, slots=2, seed=10)
    solo = [Session(TorchStreams(model, seed=10)), Session(TorchStreams(model, seed=11))]
    for i in range(14):
        active = np.array([True, i % 3 != 1])  # slot 1 skips every third frame
        if i == 8:
            streams.reset(0)
            solo[0].reset()
        audio = streams.step(np.stack([frames[i], frames[(i + 5) % FRAMES]]), active)
        # batch 2 vs batch 1 may block matmuls differently: fp32 rounding only
        np.testing.assert_allclose(audio[0], solo[0].step(frames[i]), atol=1e-5)
        if active[1]:
            np.testing.assert_allclose(audio[1], solo[1].step(frames[(i + 5) % FRAMES]), atol=1e-5)
        else:
            assert not audio[1].any()


def test_two_threads_stepping_one_session_are_serialized(model, frames):
    """Session holds a lock: 2 threads x 20 steps give exactly the 40 outputs of one thread stepping 40 times
    (same frame each step, so only the order of the calls, not their frames, decides each output)."""
    model.configure_sampling(nfe=1)
    sequential = Session(TorchStreams(model, seed=4))
    expected = [sequential.step(frames[0]).tobytes() for _ in range(40)]
    shared = Session(TorchStreams(model, seed=4))
    outputs: list[list[bytes]] = [[], []]
    start = threading.Barrier(2)

    def worker(out: list[bytes]) -> None:
        start.wait()
        out.extend(shared.step(frames[0]).tobytes() for _ in range(20))

    threads = [threading.Thread(target=worker, args=(out,)) for out in outputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(outputs[0] + outputs[1]) == Counter(expected)
    assert len(set(expected)) == 40  # every step's audio differs, so a lost or repeated update would show


def test_frame_size_advice_names_a_real_parameter(model, frames):
    """The fix a FrameError gives for a frame of another size must be callable as written."""
    import inspect

    from soundreactor.model.soundreactor import SoundReactor

    with pytest.raises(FrameError) as err:
        Session(TorchStreams(model)).step(frames[0][:-2])
    assert "SoundReactor.load(checkpoint, input_hw=(height, width))" in str(err.value)
    assert "input_hw" in inspect.signature(SoundReactor.load).parameters
