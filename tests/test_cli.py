"""The command line end to end on the tiny preset: demo, init + run, and the errors users see."""

import importlib.util

import av
import numpy as np
import pytest
import soundfile

from soundreactor.cli import main
from soundreactor.demo_video import make_demo_video


def test_demo_writes_wav_mp4_and_latency(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path), "--seconds", "1", "--nfe", "1"]) == 0
    audio, rate = soundfile.read(tmp_path / "demo.wav", always_2d=True)
    assert rate == 48_000 and audio.shape == (30 * 1600, 2)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
    with av.open(str(tmp_path / "demo.mp4")) as container:
        assert {s.type for s in container.streams} == {"video", "audio"}
    out = capsys.readouterr().out
    assert "p50" in out and "real-time factor" in out


def test_init_then_run(tmp_path, capsys):
    checkpoint = tmp_path / "tiny.safetensors"
    assert main(["init", "--preset", "tiny", "--seed", "2", "--out", str(checkpoint)]) == 0
    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.5, size=(64, 112), seed=3)
    wav = tmp_path / "clip.wav"
    args = ["run", "--video", str(video), "--checkpoint", str(checkpoint), "--out", str(wav), "--nfe", "2"]
    assert main([*args, "--mux", str(tmp_path / "muxed.mp4")]) == 0
    first, rate = soundfile.read(wav, always_2d=True)
    assert rate == 48_000 and first.shape == (15 * 1600, 2)
    assert main(args) == 0  # same seed, same audio
    np.testing.assert_array_equal(soundfile.read(wav, always_2d=True)[0], first)
    assert (tmp_path / "muxed.mp4").stat().st_size > 0


def test_run_on_the_cuda_graph_backend_matches_torch(tmp_path):
    """--backend cuda-graph runs eagerly off CUDA (same buffer logic); in fp32 it equals the torch backend."""
    checkpoint = tmp_path / "tiny.safetensors"
    assert main(["init", "--preset", "tiny", "--seed", "6", "--out", str(checkpoint)]) == 0
    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.4, size=(64, 112), seed=7)
    common = ["run", "--video", str(video), "--checkpoint", str(checkpoint), "--nfe", "2", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "torch.wav")]) == 0
    graph = [*common, "--backend", "cuda-graph", "--dtype", "fp32", "--vae-dtype", "fp32"]
    assert main([*graph, "--out", str(tmp_path / "graph.wav")]) == 0
    reference = soundfile.read(tmp_path / "torch.wav")[0]
    np.testing.assert_allclose(soundfile.read(tmp_path / "graph.wav")[0], reference, atol=1e-5)
    assert np.abs(reference).max() > 1e-3
    assert (
        main([*common, "--backend", "cuda-graph", "--out", str(tmp_path / "bf16.wav")]) == 0
    )  # the defaults
    bf16 = soundfile.read(tmp_path / "bf16.wav")[0]
    assert np.abs(bf16 - reference).max() < 3e-2 * np.abs(reference).max()


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["run", "--video", str(tmp_path / "missing.mp4"), "--checkpoint", "x", "--out", "y.wav"]) == 2
    assert "video file not found" in capsys.readouterr().err
    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.2, size=(64, 112))
    assert (
        main(
            ["run", "--video", str(video), "--checkpoint", str(tmp_path / "no.safetensors"), "--out", "y.wav"]
        )
        == 2
    )
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["init", "--preset", "huge", "--out", str(tmp_path / "x")])


def test_export_check_and_run_on_onnxruntime(tmp_path, capsys):
    """The export path end to end: ORT audio equals the torch backend's for the same checkpoint and seed."""
    checkpoint = tmp_path / "tiny.safetensors"
    main(["init", "--preset", "tiny", "--seed", "4", "--out", str(checkpoint)])
    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.4, size=(64, 112), seed=5)
    engines = tmp_path / "engines"
    export = ["export", "--checkpoint", str(checkpoint), "--out", str(engines), "--frame-size", "64x112"]
    assert main([*export, "--nfe", "2", "--slots", "1"]) == 0
    assert main(["check", str(engines)]) == 0
    common = ["run", "--video", str(video), "--checkpoint", str(checkpoint), "--nfe", "2"]
    assert main([*common, "--out", str(tmp_path / "torch.wav")]) == 0
    ort = [*common, "--backend", "onnxruntime", "--engines", str(engines)]
    assert main([*ort, "--out", str(tmp_path / "ort.wav")]) == 0
    reference = soundfile.read(tmp_path / "torch.wav")[0]
    np.testing.assert_allclose(soundfile.read(tmp_path / "ort.wav")[0], reference, atol=1e-5)  # fp32 graphs

    other = make_demo_video(tmp_path / "other.mp4", seconds=0.2, size=(48, 80))
    capsys.readouterr()
    bad = ["run", "--video", str(other), "--backend", "onnxruntime", "--engines", str(engines)]
    assert main([*bad, "--out", str(tmp_path / "x.wav")]) == 2
    assert "48x80 does not match" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="checks the no-TensorRT message")
def test_tensorrt_commands_explain_a_missing_install(tmp_path, capsys):
    assert main(["build", "--engines", str(tmp_path)]) == 2
    assert "tensorrt" in capsys.readouterr().err.lower()
