"""The committed default model: it loads in every backend, its committed evaluation is reproduced, and the demo's
audio has its impacts where the demo scene's collisions are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch
from safetensors import safe_open

from soundreactor import default_model
from soundreactor.checkpoint import STORAGE_KEY, load_checkpoint
from soundreactor.cli import DEMO_HW, main
from soundreactor.model.soundreactor import init_model
from soundreactor.runtime.cuda_graph_backend import GraphStreams
from soundreactor.runtime.session import Session
from soundreactor.runtime.torch_backend import TorchStreams
from soundreactor.training import evaluate
from soundreactor.training.synthetic import make_clip

HW = (56, 112)  # the small preset's vision size: frames pass the resize unchanged


@pytest.fixture(scope="module")
def model():
    return default_model.load_default(HW)


@pytest.fixture(scope="module")
def scene():
    return evaluate.held_out_clips(1, 12)[0]


def test_the_checkpoint_is_a_few_mb_of_half_stored_float32(model):
    assert default_model.CHECKPOINT.stat().st_size < 4_000_000
    with safe_open(str(default_model.CHECKPOINT), framework="pt") as f:
        assert f.metadata()[STORAGE_KEY] == "float16"
    assert model.config.preset == "small" and model.config.sampler.kind == "consistency"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # widened back on load


def test_graph_backend_cpu_path_equals_torch(model, scene):
    reference = TorchStreams(model, seed=3)
    graph = GraphStreams(model, 1, 3, "cpu")
    for frame in scene.frames:
        want = reference.step(frame[None])
        # fp32, the same kernels in the same order (test_cuda_graph_backend): 1e-5 leaves room for other BLAS
        np.testing.assert_allclose(graph.step(frame[None]), want, atol=1e-5, rtol=0)


def test_onnxruntime_export_equals_torch(model, scene, tmp_path):
    from soundreactor.runtime.onnxruntime_backend import ort_session_from_dir

    checkpoint = str(default_model.CHECKPOINT)
    assert main(["export", "--checkpoint", checkpoint, "--out", str(tmp_path), "--frame-size", "56x112"]) == 0
    ort_session = ort_session_from_dir(tmp_path, 5, ["cpu"], checkpoint, None, None)
    torch_session = Session(TorchStreams(model, seed=5))
    for frame in scene.frames:
        want = torch_session.step(frame)
        # fp32 graphs of the same weights and noise: rounding only (the export tests measure ~1e-6)
        np.testing.assert_allclose(ort_session.step(frame), want, atol=1e-4, rtol=0)


def test_tensorrt_loads_the_default_model():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (it needs an NVIDIA GPU)")
    pytest.skip("building a TensorRT engine needs an NVIDIA GPU; perf/gpu_check.sh covers it on one")


def test_the_committed_report_is_reproduced():
    committed = json.loads(default_model.REPORT.read_text())
    fresh = default_model.evaluate_default(nfes=(4,))  # the headline figure; NFE 1 would double the time
    for system in ("ground_truth", "nfe4"):
        want, got = committed[system], fresh[system]
        # One detection flipping (a peak at the 3 dB threshold rounding the other way on another CPU) moves F1 by
        # at most 2 / (true + detected) onsets; allow two such flips, no more.
        margin = 4 / (want["onsets_true"] + want["onsets_detected"])
        assert got["onset_f1"] == pytest.approx(want["onset_f1"], abs=margin), system
        assert got["onset_precision"] == pytest.approx(want["onset_precision"], abs=2 * margin), system


def demo_f1(audio: np.ndarray, seed: int, seconds: float) -> float:
    clip = make_clip(seed, round(seconds * evaluate.FPS), hw=DEMO_HW)
    return evaluate.score([audio], [clip])["onset_f1"]


def test_the_demo_is_heard_where_it_is_seen(tmp_path, capsys):
    seconds, seed = 4.0, 0
    assert main(["demo", "--out-dir", str(tmp_path), "--seconds", str(seconds), "--seed", str(seed)]) == 0
    assert "impacts heard where seen: onset F1" in capsys.readouterr().out
    audio = soundfile.read(tmp_path / "demo.wav", dtype="float32", always_2d=True)[0].T
    trained = demo_f1(audio, seed, seconds)
    # the floor: the same preset with random weights, on the same scene and noise
    random_model = init_model("small", seed=seed, input_hw=DEMO_HW)[0]
    scene = make_clip(seed, round(seconds * evaluate.FPS), hw=DEMO_HW)
    floor = evaluate.score([evaluate.stream_audio(random_model, scene.frames, seed)], [scene])["onset_f1"]
    # measured: 0.86 (precision 0.80, recall 0.92: 12 of 13 impacts) against 0.14 (1 of 13); see default_model.md.
    # Issue 20's bar: +0.3 (two detections flipping on another CPU move F1 by about 0.15)
    assert trained >= floor + 0.3, (trained, floor)


def test_publish_replaces_the_model_and_its_report_together(tmp_path, monkeypatch):
    """An interrupted publish leaves the previous model and report; a finished one, the file it evaluated."""
    from pathlib import Path

    source = tmp_path / "trained.safetensors"
    init_model("tiny", seed=3)[0].save(source)
    checkpoint, report = tmp_path / "default.safetensors", tmp_path / "report.json"
    checkpoint.write_bytes(b"old model")
    report.write_text("old report")

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "evaluate_default", interrupted)
    with pytest.raises(KeyboardInterrupt):
        default_model.publish(source, checkpoint, report)
    assert checkpoint.read_bytes() == b"old model" and report.read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "default.safetensors",
        "report.json",
        "trained.safetensors",
    ]

    evaluated = []
    monkeypatch.setattr(
        default_model,
        "evaluate_default",
        lambda path: evaluated.append(Path(path).read_bytes()) or {"nfe4": 1.0},
    )
    assert default_model.publish(source, checkpoint, report) == {"nfe4": 1.0}
    assert checkpoint.read_bytes() == evaluated[0]
    assert json.loads(report.read_text()) == {"nfe4": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "default.safetensors",
        "report.json",
        "trained.safetensors",
    ]


def test_publish_stores_the_guidance_chosen_on_validation(tmp_path, monkeypatch):
    source = tmp_path / "trained.safetensors"
    init_model("tiny", seed=3)[0].save(source)
    monkeypatch.setattr(default_model, "evaluate_default", lambda path: {})
    checkpoint = tmp_path / "default.safetensors"
    default_model.publish(source, checkpoint, tmp_path / "report.json", guidance=4.5)
    published = load_checkpoint(checkpoint)[0]
    original = load_checkpoint(source)[0]
    assert published.sampler.guidance == 4.5 != original.sampler.guidance
    assert published.replace(sampler={"guidance": original.sampler.guidance}) == original
