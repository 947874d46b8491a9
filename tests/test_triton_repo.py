"""`soundreactor triton-repo` and `serve` argument handling, without a server: the written config is read back
through Triton's own ModelConfig protobuf schema (shipped with tritonclient), and bad arguments get clear errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from soundreactor.cli import main
from soundreactor.serving.params import ServingParams

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from soundreactor.model.soundreactor import init_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    init_model("tiny", seed=0, input_hw=(28, 42))[0].save(path)
    return path


def read_config(model_dir: Path):
    text_format = pytest.importorskip("google.protobuf.text_format")
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_checkpoint_repository_for_two_gpus(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(checkpoint.parent)  # a relative checkpoint path is read from here
    argv = ["triton-repo", "--checkpoint", checkpoint.name, "--out", str(tmp_path / "repo"), "--backend",
            "cuda-graph", "--gpus", "0,1", "--slots", "4", "--frame-size", "28x42", "--nfe", "2", "--seed", "3",
            "--seed-policy", "slot", "--idle-timeout-s", "2.5", "--queue-delay-us", "500"]  # fmt: skip
    assert main(argv) == 0
    model_dir = tmp_path / "repo" / "soundreactor"
    config = read_config(model_dir)
    assert config.backend == "python" and config.max_batch_size == 4
    (frame,), (audio,) = config.input, config.output
    assert (frame.name, list(frame.dims), frame.data_type) == ("FRAME", [28, 42, 3], 2)  # TYPE_UINT8
    assert (audio.name, list(audio.dims), audio.data_type) == ("AUDIO", [2, 1600], 11)  # TYPE_FP32
    batching = config.sequence_batching
    assert batching.max_sequence_idle_microseconds == 2_500_000
    assert batching.direct.max_queue_delay_microseconds == 500
    assert batching.direct.minimum_slot_utilization == 1.0
    assert {c.name for c in batching.control_input} == {"START", "END", "READY"}
    assert [(g.kind, list(g.gpus), g.count) for g in config.instance_group] == [
        (1, [0], 1),
        (1, [1], 1),
    ]  # GPU
    params = ServingParams.from_config({k: v.string_value for k, v in config.parameters.items()})
    stored = "1/checkpoint.safetensors"  # in the repository, relative to the model folder
    assert params == ServingParams(backend="cuda-graph", slots=4, frame_hw=(28, 42), checkpoint=stored,
                                   nfe=2, seed=3, seed_policy="slot")  # fmt: skip
    assert (model_dir / stored).read_bytes() == checkpoint.read_bytes()
    model_py = (model_dir / "1" / "model.py").read_text()
    assert "from soundreactor.serving.triton_model import TritonPythonModel" in model_py
    for text in (
        model_py,
        (model_dir / "config.pbtxt").read_text(),
    ):  # no absolute path: the repository moves
        assert str(ROOT) not in text and str(checkpoint.parent) not in text and str(tmp_path) not in text


def test_cpu_repository_has_one_cpu_instance(checkpoint, tmp_path):
    assert (
        main(
            ["triton-repo", "--checkpoint", str(checkpoint), "--out", str(tmp_path), "--frame-size", "28x42"]
        )
        == 0
    )
    config = read_config(tmp_path / "soundreactor")
    assert [(g.kind, g.count) for g in config.instance_group] == [(2, 1)]  # KIND_CPU
    assert config.parameters["backend"].string_value == "torch"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["triton-repo", "--out", "r"], "give --checkpoint FILE"),
        (["triton-repo", "--checkpoint", "missing.safetensors", "--out", "r"], "checkpoint not found"),
        (["triton-repo", "--checkpoint", "CKPT", "--out", "r", "--backend", "cuda-graph"], "pass --gpus"),
        (
            ["triton-repo", "--checkpoint", "CKPT", "--out", "r", "--backend", "onnxruntime"],
            "needs --engines",
        ),
        (["serve", "--repo", "no/such/repo"], "model repository not found"),
    ],
)
def test_bad_arguments_get_clear_errors(argv, message, checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([str(checkpoint) if a == "CKPT" else a for a in argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_stream_without_a_server_says_so(tmp_path, capsys):
    pytest.importorskip("tritonclient.grpc")
    from soundreactor.demo_video import make_demo_video

    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.1, size=(28, 42))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["stream", "--url", f"127.0.0.1:{port}", "--video", str(video), "--out", str(tmp_path / "a.wav")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--timeout-s", "5"])
    assert exit_info.value.code == 2
    assert "cannot read model 'soundreactor'" in capsys.readouterr().err
    assert not (tmp_path / "a.wav").exists()


def test_stream_never_writes_over_its_input_or_into_a_missing_folder(tmp_path, capsys):
    """Output paths are checked before any connection (no server needed), as `run` checks them."""
    from soundreactor.demo_video import make_demo_video

    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.1, size=(28, 42))
    before = video.read_bytes()
    base = ["stream", "--url", "127.0.0.1:1", "--video", str(video), "--timeout-s", "1"]
    assert main([*base, "--out", str(video)]) == 2
    assert "would destroy the input" in capsys.readouterr().err
    assert video.read_bytes() == before
    assert main([*base, "--out", str(tmp_path / "missing" / "a.wav")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_repository_folder_holding_other_things_is_refused(checkpoint, tmp_path, capsys):
    repo = tmp_path / "runs"
    repo.mkdir()
    (repo / "notes.txt").write_text("not a model")
    argv = ["triton-repo", "--checkpoint", str(checkpoint), "--out", str(repo), "--frame-size", "28x42"]
    assert main(argv) == 2
    assert "not Triton models (notes.txt)" in capsys.readouterr().err
    assert not (repo / "soundreactor").exists()
    (repo / "notes.txt").unlink()
    assert main(argv) == 0  # an empty folder, and then a rewrite of its own model, are fine
    assert main(argv) == 0


def test_serve_refuses_a_repository_without_models(tmp_path, capsys):
    (tmp_path / ".hidden").mkdir()  # tritonserver would start, say ready, and serve nothing
    assert main(["serve", "--repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no model" in err and f"triton-repo --out {tmp_path}" in err


def test_serve_names_a_taken_port_and_why(checkpoint, tmp_path, capsys):
    argv = ["triton-repo", "--checkpoint", str(checkpoint), "--out", str(tmp_path), "--frame-size", "28x42"]
    assert main(argv) == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        others = []
        for _ in range(2):  # the other ports free, whatever else runs on the machine
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                others.append(str(s.getsockname()[1]))
        argv = ["serve", "--repo", str(tmp_path), "--grpc-port", str(port), "--http-port", others[0]]
        with pytest.raises(SystemExit) as exit_info:  # refused before tritonserver is looked for or started
            main([*argv, "--metrics-port", others[1]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"the grpc port {port} on 127.0.0.1 cannot be used: Address already in use" in err
    assert "--grpc-port" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("triton.example", "triton.example:8001"),  # gRPC alone would dial port 443
        ("10.0.0.5:9001", "10.0.0.5:9001"),
        ("::1", "[::1]:8001"),
        ("[::1]", "[::1]:8001"),
        ("[::1]:9001", "[::1]:9001"),
    ],
)
def test_a_url_without_a_port_means_tritons_grpc_port(url, address):
    pytest.importorskip("tritonclient.grpc")
    from soundreactor.serving.client import grpc_address

    assert grpc_address(url) == address


def test_sequence_ids_are_numbers_or_strings(capsys):
    from soundreactor.serving.commands import correlation_id

    assert correlation_id("42") == 42 and correlation_id("camera-7") == "camera-7"
    base = ["stream", "--url", "h", "--video", "v.mp4", "--out", "a.wav", "--sequence-id"]
    for bad in ("0", str(2**63), ""):
        with pytest.raises(SystemExit):
            main([*base, bad])
        assert "sequence ID" in capsys.readouterr().err


def test_an_export_is_stored_in_the_repository_and_read_relative_to_it(checkpoint, tmp_path):
    from soundreactor.serving.repository import write_repository

    blobs = tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc").write_bytes(b"weights")
    export = tmp_path / "export"
    (export / "sub").mkdir(parents=True)
    (export / "manifest.json").write_text("{}")
    (export / "sub" / "model.onnx").symlink_to(blobs / "abc")  # a cache's layout: links are followed
    params = ServingParams(backend="onnxruntime", slots=2, frame_hw=(28, 42), engines=str(export))
    model_dir = write_repository(tmp_path / "repo", params)
    stored = model_dir / "1" / "engines"
    assert (stored / "manifest.json").read_text() == "{}"
    assert (stored / "sub" / "model.onnx").read_bytes() == b"weights"
    assert not (stored / "sub" / "model.onnx").is_symlink()
    config = read_config(model_dir)
    read = ServingParams.from_config({k: v.string_value for k, v in config.parameters.items()})
    assert read.engines == "1/engines"
    moved = tmp_path / "elsewhere"
    (tmp_path / "repo").rename(moved)
    assert Path(read.located_in(moved / "soundreactor").engines) == moved / "soundreactor" / "1" / "engines"
    # a rewrite given the stored export itself keeps it
    write_repository(moved, ServingParams(backend="onnxruntime", slots=2, frame_hw=(28, 42),
                                          engines=str(moved / "soundreactor" / "1" / "engines")))  # fmt: skip
    assert (moved / "soundreactor" / "1" / "engines" / "sub" / "model.onnx").read_bytes() == b"weights"
    assert sorted(p.name for p in (moved / "soundreactor" / "1").iterdir()) == ["engines", "model.py"]
    # a rewrite for a checkpoint drops the export it no longer serves
    write_repository(
        moved, ServingParams(backend="torch", slots=2, frame_hw=(28, 42), checkpoint=str(checkpoint))
    )
    stored = sorted(p.name for p in (moved / "soundreactor" / "1").iterdir())
    assert stored == ["checkpoint.safetensors", "model.py"]
