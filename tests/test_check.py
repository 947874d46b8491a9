"""`soundreactor check`: the real export passes; small hand-built graphs with one flaw each are caught."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from test_export import FRAME_HW, export_once, run_command

from soundreactor.cli import main
from soundreactor.demo_video import make_demo_video
from soundreactor.export.check import TENSORRT_OPS, check_export_dir, check_model
from soundreactor.export.manifest import ExportDirError, file_sha256, load_manifest


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_once(tmp_path_factory)[0]


def graph_model(nodes, inputs, outputs, initializers=(), opset: int = 23) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def tensor(name: str, shape: list, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def test_a_clean_graph_passes():
    model = graph_model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], [tensor("x", [2, 3])], [tensor("y", [2, 3])]
    )
    assert check_model(model) == []


def test_dynamic_dimension_is_caught():
    model = graph_model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [tensor("x", ["batch", 3])],
        [tensor("y", ["batch", 3])],
    )
    problems = check_model(model)
    assert any("input 'x' has a dynamic or unknown shape ['batch', 3]" in p for p in problems), problems
    assert any("output 'y'" in p for p in problems)


def test_unsupported_ops_are_caught():
    assert "Unique" not in TENSORRT_OPS and "ScatterND" in TENSORRT_OPS
    model = graph_model(
        [
            helper.make_node("Unique", ["x"], ["y"], name="unique", sorted=1),
            helper.make_node("Gelu", ["x"], ["z"], name="ms_gelu", domain="com.microsoft"),
        ],
        [tensor("x", [4])],
        [tensor("y", [4]), tensor("z", [4])],
    )
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    problems = check_model(model)
    assert any("op Unique (1 node, e.g. 'unique') is not on TensorRT" in p for p in problems), problems
    assert any("op com.microsoft::Gelu" in p for p in problems), problems


def test_parser_restrictions_are_caught():
    axes_input = graph_model(
        [helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean", keepdims=0)],
        [tensor("x", [2, 3]), tensor("axes", [1], TensorProto.INT64)],
        [tensor("y", [2])],
    )
    assert any("`axes` must be an initializer" in p for p in check_model(axes_input))
    scatter_add = graph_model(
        [helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="scatter", reduction="add")],
        [tensor("x", [4]), tensor("i", [1, 1], TensorProto.INT64), tensor("u", [1])],
        [tensor("y", [4])],
    )
    assert any("reduction 'none' only" in p for p in check_model(scatter_add))
    uint8_inside = graph_model(
        [
            helper.make_node("Transpose", ["x"], ["t"], name="transpose", perm=[1, 0]),
            helper.make_node("Cast", ["t"], ["y"], name="cast", to=TensorProto.FLOAT),
        ],
        [tensor("x", [2, 3], TensorProto.UINT8)],
        [tensor("y", [3, 2])],
    )
    assert any("'t' is uint8 inside the graph" in p for p in check_model(uint8_inside))
    too_new = graph_model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [tensor("x", [2])],
        [tensor("y", [2])],
        opset=25,
    )
    assert any("opset 25 is outside 9-24" in p for p in check_model(too_new))


def test_export_passes_and_the_command_reports_it(exported, capsys):
    report = check_export_dir(exported)
    assert report.ok, report.format()
    run_command(["check", str(exported)])
    out = capsys.readouterr().out
    for name in ("ar_audio", "vision", "ar_vision", "sampler", "vae_decoder"):
        assert f"  {name}" in out
    assert "5 graphs ready for TensorRT" in out and "TensorRT parse: skipped" in out


def test_unpaired_state_and_manifest_drift_fail_the_check(exported, tmp_path, capsys):
    directory = shutil.copytree(exported, tmp_path / "export")
    # make vision's `grid` output one row short of `prev_grid`: the state pair and the manifest both disagree
    proto = onnx.load(str(directory / "vision.onnx"), load_external_data=False)
    proto.graph.output[1].type.tensor_type.shape.dim[1].dim_value -= 1
    onnx.save(proto, str(directory / "vision.onnx"))
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["vision.onnx"] = file_sha256(directory / "vision.onnx")
    (directory / "manifest.json").write_text(json.dumps(manifest))

    report = check_export_dir(directory)
    problems = next(g.problems for g in report.graphs if g.name == "vision")
    assert any("state output 'grid'" in p and "'prev_grid'" in p for p in problems), problems
    assert any(p.startswith("manifest: output 'grid'") for p in problems), problems
    with pytest.raises(SystemExit) as exit_info:
        run_command(["check", str(directory)])
    assert exit_info.value.code == 1 and "NOT ready" in capsys.readouterr().out


def edited(exported, tmp_path, change) -> Path:
    """A copy of the export whose manifest.json is the dict as `change` left it, or the list it returned."""
    directory = shutil.copytree(exported, tmp_path / "export")
    manifest = json.loads((directory / "manifest.json").read_text())
    result = change(manifest)
    (directory / "manifest.json").write_text(json.dumps(result if isinstance(result, list) else manifest))
    return directory


def refused(directory: Path, message: str, capsys) -> None:
    """`check` and `run` both refuse the directory with one `error:` line matching `message`, no traceback."""
    video = make_demo_video(directory.parent / "clip.mp4", seconds=0.1, size=FRAME_HW)
    out = directory.parent / "out.wav"
    with pytest.raises(ExportDirError, match=message):
        check_export_dir(directory)
    for argv in (
        ["check", str(directory)],
        [
            "run",
            "--backend",
            "onnxruntime",
            "--engines",
            str(directory),
            "--video",
            str(video),
            "--out",
            str(out),
        ],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err) and err.startswith("error: ") and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: [], r"manifest field \(top level\) must be a JSON object, got \[\]"),
        (
            lambda m: m.update(files=list(m["files"])),
            r"manifest field files must be an object mapping file names",
        ),
        (
            lambda m: m.update(graphs=[]),
            r"manifest field graphs must be the graphs ar_audio, vision, ar_vision, ",
        ),
        (
            lambda m: m.update(graphs=m["graphs"][:4]),
            r"graphs must be .* got \['ar_audio', 'vision', 'ar_vision', 's",
        ),
        (lambda m: m.update(slots=0), r"manifest field slots must be an integer in \[1, 4096\], got 0"),
        (
            lambda m: m.update(frame_hw=[48, -80]),
            r"manifest field frame_hw must be \[height, width\].*got \[48, -80\]",
        ),
        (
            lambda m: m.update(guidance=float("inf")),
            r"manifest field guidance must be a finite number, got inf",
        ),
        (lambda m: m["config"]["transformer"].update(n_layers=10**9), r"config is invalid: .*n_layers"),
        (
            lambda m: m["graphs"][1]["inputs"][0].update(shape=[2, -48]),
            r"graphs\[1\] \(vision\)\.inputs\[0\]\.shape",
        ),
        (
            lambda m: m["files"].pop("sampler.onnx"),
            r"graphs\[3\] \(sampler\)\.file must be a file listed \(and hashed\)",
        ),
    ],
)
def test_malformed_manifests_are_refused_naming_the_field(exported, tmp_path, capsys, change, message):
    refused(edited(exported, tmp_path, change), message, capsys)


def test_paths_outside_the_folder_are_refused(exported, tmp_path, capsys):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"not yours")
    digest = file_sha256(outside)

    def listed(name):
        return lambda m: m["files"].update({name: digest})

    for name, message in (
        ("../secret.bin", r"files: '\.\./secret\.bin' points outside the export directory"),
        (str(outside), r"files: '/.*secret\.bin' points outside the export directory"),
    ):
        refused(edited(exported, tmp_path / name.replace("/", "_"), listed(name)), message, capsys)

    # a graph file outside the folder: listed with its hash or not, it is never opened
    def graph_outside(m):
        m["graphs"][3]["file"] = "../sampler.onnx"
        m["files"]["../sampler.onnx"] = m["files"].pop("sampler.onnx")

    refused(
        edited(exported, tmp_path / "graph", graph_outside), r"'\.\./sampler\.onnx' points outside", capsys
    )

    linked = edited(exported, tmp_path / "link", listed("link.bin"))
    (linked / "link.bin").symlink_to(outside)
    refused(linked, r"files: 'link\.bin' is a link that resolves outside the export directory", capsys)


def test_external_data_not_in_files_fails_the_check(exported, tmp_path):
    # sampler.weights read by sampler.onnx but not hashed: ORT would load it unchecked
    directory = edited(exported, tmp_path, lambda m: m["files"].pop("sampler.weights"))
    report = check_export_dir(directory)
    problems = next(g.problems for g in report.graphs if g.name == "sampler")
    assert (
        "manifest: external data file 'sampler.weights' is not listed (with its sha256) in files" in problems
    )
    assert not report.ok


def hub_snapshot(exported: Path, cache: Path) -> Path:
    """The export as huggingface_hub caches a download: `snapshots/<rev>/<name>` symlinks to
    `../../blobs/<sha256>`, the files themselves in `blobs/`."""
    blobs, snapshot = cache / "blobs", cache / "snapshots" / "4f1c0e2"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in exported.iterdir():
        digest = file_sha256(file)
        shutil.copyfile(file, blobs / digest)
        (snapshot / file.name).symlink_to(Path("../../blobs") / digest)
    return snapshot


def test_a_hugging_face_cache_snapshot_of_symlinks_loads(exported, tmp_path):
    import numpy as np

    from soundreactor.runtime.onnxruntime_backend import OrtStreams

    snapshot = hub_snapshot(exported, tmp_path / "models--someone--soundreactor")
    assert load_manifest(snapshot) == load_manifest(exported)
    assert check_export_dir(snapshot).ok
    cached, plain = OrtStreams(snapshot, seed=4), OrtStreams(exported, seed=4)
    frames = np.random.default_rng(0).integers(0, 256, (plain.slots, *plain.frame_hw, 3), dtype=np.uint8)
    np.testing.assert_array_equal(cached.step(frames), plain.step(frames))  # the same graphs, the same audio


def test_a_snapshot_link_leaving_the_cache_is_refused(exported, tmp_path):
    snapshot = hub_snapshot(exported, tmp_path / "models--someone--soundreactor")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    weights = next(p.name for p in exported.iterdir() if p.suffix == ".weights")
    shutil.copyfile(exported / weights, elsewhere / weights)  # same bytes, same hash: only the place is wrong
    (snapshot / weights).unlink()
    (snapshot / weights).symlink_to(elsewhere / weights)
    with pytest.raises(ExportDirError, match=rf"'{re.escape(weights)}' is a link that resolves outside"):
        load_manifest(snapshot)
