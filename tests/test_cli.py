"""The command line end to end on the tiny preset: demo, init + run, and the errors users see."""

import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
from test_export import export_once

from soundreactor.cli import main
from soundreactor.default_model import CHECKPOINT as DEFAULT_CHECKPOINT
from soundreactor.demo_video import make_demo_video
from soundreactor.export import exporter
from soundreactor.runtime.session import Session

# A meta-path finder that makes torch and onnx unimportable, as in an environment with numpy + onnxruntime only.
BLOCK_TORCH_AND_ONNX = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx", "onnxscript"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, Block())
"""


def without_torch_and_onnx(lines: list[str]) -> subprocess.CompletedProcess:
    script = BLOCK_TORCH_AND_ONNX + "\n".join(lines)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_demo_writes_wav_mp4_and_latency(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path), "--seconds", "1", "--nfe", "1", "--threads", "1"]) == 0
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


def test_export_check_and_run_on_onnxruntime(tmp_path, tmp_path_factory, capsys):
    """The export path end to end: ORT audio equals the torch backend's for the same checkpoint and seed. The export
    goes into a folder holding another export (a copy of the suite's shared one: 2 slots, another size), which it
    replaces as a whole, and says so."""
    checkpoint = tmp_path / "tiny.safetensors"
    main(["init", "--preset", "tiny", "--seed", "4", "--out", str(checkpoint)])
    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.4, size=(64, 112), seed=5)
    engines = Path(shutil.copytree(export_once(tmp_path_factory)[0], tmp_path / "engines"))
    export = ["export", "--checkpoint", str(checkpoint), "--out", str(engines), "--frame-size", "64x112"]
    capsys.readouterr()
    assert main([*export, "--nfe", "2", "--slots", "1"]) == 0
    assert f"replaced the export that was in {engines}" in capsys.readouterr().out
    assert main(["check", str(engines)]) == 0
    common = ["run", "--video", str(video), "--checkpoint", str(checkpoint), "--nfe", "2"]
    assert main([*common, "--out", str(tmp_path / "torch.wav")]) == 0
    ort = [*common, "--backend", "onnxruntime", "--engines", str(engines)]
    assert main([*ort, "--out", str(tmp_path / "ort.wav")]) == 0
    reference = soundfile.read(tmp_path / "torch.wav")[0]
    np.testing.assert_allclose(soundfile.read(tmp_path / "ort.wav")[0], reference, atol=1e-5)  # fp32 graphs

    # Another size than the export's: every frame is scaled to 64x112, in an environment without torch or onnx.
    other = make_demo_video(tmp_path / "other.mp4", seconds=0.2, size=(48, 80))
    ort_run = ["run", "--video", str(other), "--backend", "onnxruntime", "--engines", str(engines)]
    result = without_torch_and_onnx(
        [
            "from soundreactor.cli import main",
            f"sys.exit(main({ort_run!r} + ['--out', {str(tmp_path / 'x.wav')!r}]))",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "frames are scaled to the session's 64x112" in result.stdout
    scaled, _ = soundfile.read(tmp_path / "x.wav", always_2d=True)
    assert scaled.shape == (6 * 1600, 2) and np.isfinite(scaled).all()  # 0.2 s at 30 fps: the whole video
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folders


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="checks the no-TensorRT message")
def test_tensorrt_commands_explain_a_missing_install(tmp_path, capsys):
    assert main(["build", "--engines", str(tmp_path)]) == 2
    assert "tensorrt" in capsys.readouterr().err.lower()


def test_parser_imports_neither_torch_nor_onnx():
    result = without_torch_and_onnx(
        [
            "from soundreactor.cli import build_parser, main",
            "build_parser()",
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx')))",
            "sys.exit(main(['calibrate', '--engines', 'e', '--out', 'q']))",
        ]
    )
    assert result.stdout.strip() == "[]"
    assert result.returncode == 2
    assert result.stderr.startswith("error: `soundreactor calibrate` needs the onnx package")
    assert "Traceback" not in result.stderr


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_outputs_are_checked_before_any_work(tmp_path, capsys):
    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.2, size=(48, 80))
    original = video.read_bytes()
    # The checkpoint does not exist: an output error must come first, before anything is loaded.
    run = ["run", "--video", str(video), "--checkpoint", str(tmp_path / "none.safetensors")]
    cases = [
        (["--out", str(video)], "--out {v} is the input --video {v}"),
        (["--out", str(tmp_path / "a.wav"), "--mux", str(video)], "--mux {v} is the input --video {v}"),
        (["--out", str(tmp_path / "a.wav"), "--mux", str(tmp_path / "." / "a.wav")], "both name"),
        (["--out", str(tmp_path / "missing" / "a.wav")], f"the folder {tmp_path / 'missing'} does not exist"),
        (["--out", str(tmp_path)], f"--out {tmp_path} is a directory"),
        (["--out", str(tmp_path / "a.wav"), "--mux", str(tmp_path / "no" / "m.mp4")], f"{tmp_path / 'no'}"),
    ]
    for extra, message in cases:
        assert main([*run, *extra]) == 2
        assert message.format(v=video) in _one_error_line(capsys)
    assert video.read_bytes() == original  # the input survives every attempt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
    checkpoint = tmp_path / "ck.safetensors"
    checkpoint.write_bytes(b"x")
    export = ["export", "--checkpoint", str(checkpoint), "--out"]
    assert (
        main([*export, str(tmp_path)]) == 2
    )  # the folder holds the checkpoint: replacing it would delete it
    assert "holds the input --checkpoint" in _one_error_line(capsys)
    assert main([*export, str(video)]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    assert main(["init", "--preset", "tiny", "--vae", str(checkpoint), "--out", str(checkpoint)]) == 2
    assert f"--out {checkpoint} is the input --vae {checkpoint}" in _one_error_line(capsys)
    assert checkpoint.read_bytes() == b"x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_folder_is_named(tmp_path, capsys):
    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.2, size=(48, 80))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["run", "--video", str(video), "--checkpoint", "x", "--out", str(locked / "a.wav")]) == 2
    assert f"the folder {locked} is not writable" in _one_error_line(capsys)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    assert main(["init", "--preset", "tiny", "--seed", "1", "--out", str(checkpoint)]) == 0
    return checkpoint


def test_ctrl_c_keeps_the_audio_and_exits_130(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.3, size=(48, 80))
    step, calls = Session.step, []

    def interrupted_at_the_fourth_frame(self, frame):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return step(self, frame)

    monkeypatch.setattr(Session, "step", interrupted_at_the_fourth_frame)
    wav = tmp_path / "clip.wav"
    args = ["run", "--video", str(video), "--checkpoint", str(tiny_checkpoint), "--nfe", "1"]
    assert main([*args, "--out", str(wav), "--mux", str(tmp_path / "m.mp4")]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: kept 0.10 s of audio in {wav}" in err and "Traceback" not in err
    assert soundfile.info(wav).frames == 3 * 1600
    assert not (tmp_path / "m.mp4").exists()


def test_sigterm_during_run_is_a_ctrl_c(tmp_path, tiny_checkpoint):
    """A real SIGTERM to `soundreactor run`: exit 130, a finished header holding every frame written."""
    video = make_demo_video(tmp_path / "long.mp4", seconds=20, size=(32, 48))
    wav = tmp_path / "long.wav"
    command = [sys.executable, "-m", "soundreactor", "run", "--video", str(video), "--checkpoint"]
    child = subprocess.Popen(
        [*command, str(tiny_checkpoint), "--nfe", "1", "--out", str(wav)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not (wav.exists() and soundfile.info(wav).frames >= 2 * 1600):
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert "interrupted: kept" in err and "Traceback" not in err
    frames = soundfile.info(wav).frames
    assert frames % 1600 == 0 and 2 * 1600 <= frames < 600 * 1600
    assert f"kept {frames / 48000:.2f} s of audio" in err
    with open(wav, "rb") as f:  # the header's RIFF size is the file's: finished, as strict readers require
        assert f.read(4) == b"RIFF" and int.from_bytes(f.read(4), "little") == wav.stat().st_size - 8


def test_run_covers_a_video_whose_size_changes(tmp_path, tiny_checkpoint, capsys):
    """A call recording that switches resolution: MPEG-TS segments of 32x48 and 48x64 concatenate into one stream.
    The model is built for the first frame's size and every later frame is scaled to it."""
    segments = []
    for i, (h, w) in enumerate([(32, 48), (48, 64)]):
        segments.append(tmp_path / f"{i}.ts")
        with av.open(str(segments[-1]), "w", format="mpegts") as out:
            stream = out.add_stream("mpeg2video", rate=30)
            stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
            for k in range(6):
                frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 40 * k, np.uint8), format="rgb24")
                frame.pts = 6 * i + k
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    video = tmp_path / "call.ts"
    video.write_bytes(b"".join(s.read_bytes() for s in segments))
    with av.open(str(video)) as c:
        shown = [(f.height, f.width) for f in c.decode(video=0)]
    assert {(32, 48), (48, 64)} <= set(shown)
    wav = tmp_path / "call.wav"
    args = ["run", "--video", str(video), "--checkpoint", str(tiny_checkpoint), "--nfe", "1"]
    assert main([*args, "--out", str(wav)]) == 0
    assert soundfile.info(wav).frames == len(shown) * 1600  # one frame of audio per frame shown (30 fps)


def test_demo_refuses_a_non_positive_length(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path / "d"), "--seconds", "0"]) == 2
    assert _one_error_line(capsys) == "error: --seconds must be positive, got 0"
    assert not (tmp_path / "d").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_device_without_cuda_is_one_error_line(tmp_path, capsys):
    checkpoint = tmp_path / "tiny.safetensors"
    assert main(["init", "--preset", "tiny", "--out", str(checkpoint)]) == 0
    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.1, size=(64, 112), seed=3)
    capsys.readouterr()
    for backend in ("torch", "cuda-graph"):
        argv = [
            "run",
            "--video",
            str(video),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "x.wav"),
        ]
        assert main([*argv, "--backend", backend, "--device", "cuda"]) == 2
        assert "sees no CUDA device" in _one_error_line(capsys)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"soundreactor {importlib.metadata.version('soundreactor')}"


def test_the_shipped_model_is_named_default(tmp_path, capsys, monkeypatch):
    """`--checkpoint default` is the shipped model in `run`, `export` and `evaluate`; `run` on torch uses it when no
    checkpoint is given, and says so."""
    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.1, size=(56, 112))
    run = ["run", "--video", str(video), "--nfe", "1", "--out"]
    assert main([*run, str(tmp_path / "named.wav"), "--checkpoint", "default"]) == 0
    capsys.readouterr()
    assert main([*run, str(tmp_path / "omitted.wav")]) == 0
    assert "no --checkpoint: running the default model (default_small.safetensors" in capsys.readouterr().out
    named = soundfile.read(tmp_path / "named.wav")[0]
    np.testing.assert_array_equal(soundfile.read(tmp_path / "omitted.wav")[0], named)
    assert np.abs(named).max() > 0
    evaluate = [
        "evaluate",
        "--checkpoint",
        "default",
        "--scenes",
        "1",
        "--frames",
        "3",
        "--nfe",
        "1",
        "--threads",
        "1",
    ]
    assert main([*evaluate, "--out", str(tmp_path / "evaluation")]) == 0
    report = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert report["config"]["model"] == f"checkpoint {DEFAULT_CHECKPOINT}"
    exported = []

    def export_model(model, *args, **kwargs):  # what would be exported, without the 40 s export
        exported.append(model.config.preset)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(exporter, "export_model", export_model)
    export = [
        "export",
        "--checkpoint",
        "default",
        "--out",
        str(tmp_path / "engines"),
        "--frame-size",
        "56x112",
    ]
    capsys.readouterr()
    assert main(export) == 2 and exported == ["small"]
    assert _one_error_line(capsys) == "error: stopped by the test"


def test_every_command_prints_its_help(capsys):
    """argparse formats help lazily: a stray `%` in one option's text crashes that command's --help only."""
    from soundreactor.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"run", "demo", "train", "train-vae", "evaluate"} <= set(commands)
    for name, parser in commands.items():
        parser.format_help()  # raises ValueError on a bad format character
        with pytest.raises(SystemExit) as stop:
            main([name, "--help"])
        assert stop.value.code == 0, name
        assert "usage:" in capsys.readouterr().out, name
