"""ONNX Runtime streams against the eager torch streams, frame for frame, and their behaviour on bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_export import FRAME_HW, GUIDANCE, NFE, SLOTS, export_once, load_model

from soundreactor.demo_video import demo_frames
from soundreactor.runtime.onnxruntime_backend import OrtStreams, default_options, ort_session_from_dir
from soundreactor.runtime.session import FrameError
from soundreactor.runtime.torch_backend import TorchStreams
from soundreactor.threads import available_cores

FRAMES = 24  # tiny window: 16 tokens = 8 frames, so the KV ring wraps three times


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny graphs gain nothing from 2 threads, and a thread pool on a busy machine waits at every op for its
    descheduled worker (measured 0.2 s -> 47 s for a torch stream here): run both backends single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def single_thread() -> ort.SessionOptions:
    return default_options(threads=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_once(tmp_path_factory)


@pytest.fixture(scope="module")
def model(exported):
    return load_model(exported[1])


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.stack(list(demo_frames(FRAMES, size=FRAME_HW, seed=1)))


def pair(frames: np.ndarray, i: int) -> np.ndarray:
    return np.stack([frames[i], frames[(i + 5) % FRAMES]])


def schedule(i: int) -> np.ndarray:
    return np.array([True, i % 3 != 1])  # slot 1 skips every third frame


def run_stream(streams, frames: np.ndarray, reset_at: int | None = None) -> list[np.ndarray]:
    """Audio of a 2-slot stream where slot 1 skips frames and slot 0 restarts at `reset_at`."""
    out = []
    for i in range(FRAMES):
        if i == reset_at:
            streams.reset(0)
        out.append(streams.step(pair(frames, i), schedule(i)))
    return out


# Each backend runs its whole stream in turn: interleaved, torch's OpenMP threads and ORT's pool fight for the cores.
def test_streams_equal_torch_with_skips_and_reset(exported, model, frames):
    directory, checkpoint = exported
    expected = run_stream(TorchStreams(model, slots=SLOTS, seed=10), frames, reset_at=9)
    ort_streams = OrtStreams(directory, seed=10, checkpoint=checkpoint, options=single_thread())
    assert ort_streams.providers == ["CPUExecutionProvider"]
    for i, (audio, want) in enumerate(
        zip(run_stream(ort_streams, frames, reset_at=9), expected, strict=True)
    ):
        assert audio.shape == (SLOTS, 2, 1600) and audio.dtype == np.float32
        # fp32, same noise: rounding only (measured 1.2e-6 on audio of max |x| ~2)
        np.testing.assert_allclose(audio, want, atol=1e-5, rtol=0, err_msg=f"frame {i}")
        if not schedule(i)[1]:
            assert not audio[1].any()
    assert np.abs(np.stack(expected)).max() > 1e-2  # not trivially silent
    np.testing.assert_array_equal(ort_streams.frame_index, [FRAMES - 9, FRAMES - FRAMES // 3])


def test_fp16_streams_track_fp32_torch(tmp_path_factory, model, frames):
    directory, _ = export_once(tmp_path_factory, "fp16")
    expected = np.stack(run_stream(TorchStreams(model, slots=SLOTS, seed=3), frames))
    audio = np.stack(run_stream(OrtStreams(directory, seed=3, options=single_thread()), frames))
    # fp16 states and weights over a wrapping stream: measured 1.3e-3 on audio of max |x| ~2, no drift
    assert np.abs(audio - expected).max() < 1e-2


def test_failed_frame_leaves_the_streams_intact(exported, frames, monkeypatch):
    directory, _ = exported
    clean = OrtStreams(directory, seed=4, options=single_thread())
    expected = [clean.step(pair(frames, i), schedule(i)) for i in range(10)]
    streams = OrtStreams(directory, seed=4, options=single_thread())
    out = [streams.step(pair(frames, i), schedule(i)) for i in range(9)]

    def broken(binding):
        raise RuntimeError("simulated device failure")

    with monkeypatch.context() as patch:  # fails after ar_audio, ar_vision and the sampler have run
        patch.setattr(streams.sessions["vae_decoder"], "run_with_iobinding", broken)
        with pytest.raises(RuntimeError, match="simulated"):
            streams.step(pair(frames, 9), schedule(9))
    with pytest.raises(FrameError, match="3 colour channels"):
        streams.step(pair(frames, 9)[..., :2], schedule(9))
    out.append(streams.step(pair(frames, 9), schedule(9)))
    np.testing.assert_array_equal(np.stack(out), np.stack(expected))


def test_sessions_run_on_the_threads_picked_for_the_model(exported, monkeypatch):
    """The tiny model gets one intra-op thread per session by default; `threads` sets another count."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def counts(streams: OrtStreams) -> set[int]:
        return {s.get_session_options().intra_op_num_threads for s in streams.sessions.values()}

    assert counts(OrtStreams(exported[0])) == {1}
    cores = available_cores()
    assert counts(OrtStreams(exported[0], threads=cores)) == {cores}


def test_wrong_frame_size_names_the_fix(exported, frames):
    streams = OrtStreams(exported[0])
    wrong = np.zeros((SLOTS, 64, 112, 3), np.uint8)
    with pytest.raises(FrameError, match=r"64x112 does not match the session.s 48x80: .*--frame-size HxW"):
        streams.step(wrong)


@pytest.mark.parametrize("guidance", [float("inf"), float("nan"), -1.0])
def test_absurd_guidance_is_refused_before_any_session(exported, guidance):
    """An infinite guidance weight made all-NaN audio with exit 0."""
    with pytest.raises(
        ValueError, match=r"SamplerConfig\.guidance must be a finite number in \[0\.0, 1000\.0\]"
    ):
        OrtStreams(exported[0], guidance=guidance)


def test_requested_provider_fallback_warns(exported):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here; nothing falls back")
    with pytest.warns(RuntimeWarning, match=r"CUDAExecutionProvider was requested .*onnxruntime-gpu"):
        streams = OrtStreams(exported[0], providers=["cuda", "cpu"])
    assert streams.providers == ["CPUExecutionProvider"] and streams.device == "cpu"


def test_session_from_dir_checks_what_the_caller_expects(exported):
    directory, checkpoint = exported
    with pytest.raises(ValueError, match=f"exported for nfe={NFE}.*--nfe 4"):
        ort_session_from_dir(directory, nfe=4)
    with pytest.raises(ValueError, match=f"exported for {SLOTS} slots.*--slots 1"):
        ort_session_from_dir(directory, checkpoint=checkpoint, nfe=NFE)
    assert OrtStreams(directory).guidance.tolist() == [GUIDANCE] * SLOTS


def test_runtime_imports_no_torch(exported):
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from soundreactor.runtime.onnxruntime_backend import OrtStreams, default_options
        streams = OrtStreams({str(exported[0])!r})
        for _ in range(3):
            audio = streams.step(np.full(({SLOTS}, {FRAME_HW[0]}, {FRAME_HW[1]}, 3), 128, np.uint8))
        assert np.isfinite(audio).all() and np.abs(audio).max() > 0
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not loaded, loaded
        print("no torch")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "no torch" in result.stdout, result.stderr
