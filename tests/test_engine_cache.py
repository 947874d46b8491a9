"""The TensorRT engine cache without TensorRT: keys, sidecars, atomic writes, stale / foreign / truncated
engines, the build loop around a fake builder, engine I/O against the manifest, and the builder's helpers."""

import dataclasses
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from soundreactor import files
from soundreactor.config import tiny
from soundreactor.engine import cache
from soundreactor.engine.bindings import check_engine_io, engine_graph_spec
from soundreactor.engine.builder import build_engines, parser_errors, progress_monitor
from soundreactor.engine.cache import (
    BuildOptions,
    EngineCacheError,
    EngineRecord,
    EngineTarget,
    GpuIdentity,
    find_engine,
    read_engine,
    write_engine,
)
from soundreactor.engine.tensorrt_env import TensorRTMissing, require_cudart, require_tensorrt
from soundreactor.export.manifest import FRAME_ORDER, GraphSpec, Manifest, TensorSpec, file_sha256

H100 = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0", 132, 85_045_395_456)
H200 = GpuIdentity("NVIDIA H200", "9.0", 132, 150_754_820_096)
TRT = "10.15.1.29"
SHA = "a" * 64


def target(**changes) -> EngineTarget:
    return dataclasses.replace(EngineTarget("ar_audio", SHA, BuildOptions(), TRT, H100), **changes)


def test_key_changes_with_every_field_and_the_sidecar_round_trips(tmp_path):
    base = target()
    variants = [
        target(onnx_sha256="b" * 64),
        target(options=BuildOptions(version_compatible=True)),
        target(options=BuildOptions(refittable=True)),
        target(options=BuildOptions(workspace_mib=512)),
        target(tensorrt_version="11.0.0"),
        *(
            target(gpu=dataclasses.replace(H100, **{f: v}))
            for f, v in [
                ("name", "NVIDIA H100 PCIe"),
                ("compute_capability", "8.9"),
                ("sm_count", 114),
                ("total_memory", 1),
            ]
        ),
    ]
    keys = {base.key, *(v.key for v in variants)}
    assert len(keys) == 1 + len(variants)  # every field is part of the key
    assert target().key == base.key  # and nothing else (deterministic)

    record = write_engine(tmp_path, base, b"plan bytes", 1.5)
    engine_path, sidecar_path = base.paths(tmp_path)
    assert engine_path.name == f"ar_audio.{base.key}.engine" and engine_path.read_bytes() == b"plan bytes"
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["target"]["gpu"] == {
        "name": H100.name,
        "compute_capability": "9.0",
        "sm_count": 132,
        "total_memory": H100.total_memory,
    }
    assert sidecar["target"]["onnx_sha256"] == SHA and sidecar["target"]["tensorrt_version"] == TRT
    assert sidecar["engine_bytes"] == 10 and len(sidecar["engine_sha256"]) == 64
    assert EngineRecord.from_dict(sidecar) == record
    assert find_engine(tmp_path, "ar_audio", SHA, TRT, H100) == record
    assert read_engine(tmp_path, record) == b"plan bytes"


@pytest.mark.parametrize(
    ("field", "now", "expected"),
    [
        ("onnx", dict(onnx_sha256="b" * 64), "other ONNX graphs or weights"),
        (
            "tensorrt",
            dict(tensorrt_version="10.16.0.1"),
            "built with TensorRT 10.15.1.29, this is TensorRT 10.16.0.1",
        ),
        (
            "gpu name",
            dict(gpu=H200),
            "built for NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.2 GiB), this GPU is NVIDIA H200 (sm_90",
        ),
        ("cc", dict(gpu=dataclasses.replace(H100, compute_capability="10.0")), "(compute capability differ)"),
        ("sms", dict(gpu=dataclasses.replace(H100, sm_count=114)), "(SM count differ)"),
        ("memory", dict(gpu=dataclasses.replace(H100, total_memory=1 << 36)), "(total memory differ)"),
    ],
)
def test_stale_or_foreign_engine_names_what_differs(tmp_path, field, now, expected):
    write_engine(tmp_path, target(), b"plan", 1.0)
    current = dataclasses.replace(target(), **now)
    with pytest.raises(EngineCacheError) as err:
        find_engine(tmp_path, "ar_audio", current.onnx_sha256, current.tensorrt_version, current.gpu)
    message = str(err.value)
    assert expected in message, message
    assert f"rebuild with `soundreactor build --engines {tmp_path}`" in message
    if field == "gpu name":
        assert "GPU name and total memory differ" in message


def test_version_compatible_engines_run_on_later_tensorrt_of_the_same_major(tmp_path):
    compatible = target(options=BuildOptions(version_compatible=True))
    write_engine(tmp_path, compatible, b"lean", 1.0)
    assert find_engine(tmp_path, "ar_audio", SHA, "10.16.0.1", H100).target == compatible
    for installed in ("10.14.1", "11.0.0"):
        with pytest.raises(EngineCacheError, match="same major only"):
            find_engine(tmp_path, "ar_audio", SHA, installed, H100)
    write_engine(tmp_path, target(tensorrt_version="10.16.0.1"), b"exact", 1.0)  # an exact build wins
    assert find_engine(tmp_path, "ar_audio", SHA, "10.16.0.1", H100).target.options == BuildOptions()


def test_missing_truncated_and_altered_engine_files_are_reported(tmp_path):
    with pytest.raises(EngineCacheError, match="has no TensorRT engine for ar_audio: build the engines with"):
        find_engine(tmp_path, "ar_audio", SHA, TRT, H100)
    record = write_engine(tmp_path, target(), b"0123456789", 1.0)
    engine_path, sidecar_path = target().paths(tmp_path)
    engine_path.write_bytes(b"01234")
    with pytest.raises(EngineCacheError, match="is 5 bytes, its sidecar records 10: the file is truncated"):
        read_engine(tmp_path, record)
    engine_path.write_bytes(b"0123456780")
    with pytest.raises(EngineCacheError, match="does not match the sha256 its sidecar records"):
        read_engine(tmp_path, record)
    engine_path.unlink()
    with pytest.raises(EngineCacheError, match="is missing but its sidecar"):
        read_engine(tmp_path, record)
    sidecar_path.write_text("{not json")
    with pytest.raises(EngineCacheError, match="not a readable engine sidecar"):
        find_engine(tmp_path, "ar_audio", SHA, TRT, H100)
    for text, reason in (
        ("[]", r"it holds a JSON list, not an object"),
        ('"engine"', r"it holds a JSON str, not an object"),
        ('{"format": "soundreactor-engine/1", "target": []}', r"its target must be an object"),
    ):
        sidecar_path.write_text(text.replace("soundreactor-engine/1", cache.FORMAT))
        with pytest.raises(
            EngineCacheError, match=rf"{sidecar_path.name} is not a readable engine sidecar.*{reason}"
        ):
            find_engine(tmp_path, "ar_audio", SHA, TRT, H100)


def test_a_sidecar_cannot_name_an_engine_outside_its_graph(tmp_path):
    """The engine file's name comes from the sidecar's target: a foreign graph name (a path) is refused."""
    record = write_engine(tmp_path, target(), b"0123456789", 1.0)
    _, sidecar_path = target().paths(tmp_path)
    data = json.loads(sidecar_path.read_text())
    data["target"]["graph"] = "../ar_audio"
    sidecar_path.write_text(json.dumps(data))
    with pytest.raises(EngineCacheError, match=r"it describes another engine \(\.\./ar_audio\."):
        find_engine(tmp_path, "ar_audio", SHA, TRT, H100)
    assert record.target.graph == "ar_audio"


@pytest.mark.parametrize("crash_at", [1, 2])  # 1: while the engine is replaced, 2: while its sidecar is
def test_a_crash_mid_write_leaves_nothing_loadable(tmp_path, monkeypatch, crash_at):
    write_engine(tmp_path, target(), b"old engine", 1.0)  # a previous build of the same key
    real_replace, calls = os.replace, []

    def crashing_replace(src, dst):
        calls.append(dst)
        if len(calls) == crash_at:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        write_engine(tmp_path, target(), b"new engine!", 2.0)
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file went with the failed write
    assert not target().paths(tmp_path)[1].exists()  # the old sidecar went first: neither engine loads
    with pytest.raises(EngineCacheError, match="no TensorRT engine for ar_audio"):
        find_engine(tmp_path, "ar_audio", SHA, TRT, H100)


def write_tiny_export(directory: Path, scale: float = 1.0) -> Manifest:
    """An export directory of one-node graphs under the five names the runtime needs, enough for the build loop."""
    directory.mkdir(exist_ok=True)
    specs = []
    for name in FRAME_ORDER:
        node = helper.make_node("Mul", ["x", "k"], ["y"])
        k = helper.make_tensor("k", TensorProto.FLOAT, [], [scale])
        x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in "xy")
        onnx.save(
            helper.make_model(helper.make_graph([node], name, [x], [y], [k])), directory / f"{name}.onnx"
        )
        io = (TensorSpec("x", (2, 3), "float32", ""),), (TensorSpec("y", (2, 3), "float32", ""),)
        specs.append(GraphSpec(name, f"{name}.onnx", *io, {}))
    files = {f"{g.name}.onnx": file_sha256(directory / f"{g.name}.onnx") for g in specs}
    config = tiny().to_dict()
    manifest = Manifest("tiny", config, None, 1, 3.0, (2, 3), 2, "fp32", 23, {}, tuple(specs), files)
    manifest.save(directory)
    return manifest


def test_build_loop_caches_rebuilds_and_keeps_other_setups(tmp_path):
    built = []

    def fake_build(model, onnx_path, options, timing_cache, log):
        assert onnx.load_from_string(model).graph.name == onnx_path.stem  # the graph TensorRT would parse
        built.append(onnx_path.stem)
        return f"{onnx_path.stem}:{options}".encode()

    write_tiny_export(tmp_path)
    lines = []
    results = build_engines(tmp_path, TRT, H100, build=fake_build, log=lines.append)
    assert built == list(FRAME_ORDER) and all(r.built for r in results)
    assert any(
        line.startswith("vision: ") and " s -> vision." in line for line in lines
    )  # seconds per engine

    built.clear()
    assert not any(r.built for r in build_engines(tmp_path, TRT, H100, build=fake_build, log=lines.append))
    assert built == []  # cached
    build_engines(tmp_path, TRT, H100, force=True, build=fake_build, log=lines.append)
    assert built == list(FRAME_ORDER)

    built.clear()
    build_engines(tmp_path, TRT, H200, build=fake_build, log=lines.append)  # another GPU: its own engines
    assert built == list(FRAME_ORDER) and len(list(tmp_path.glob("vision.*.engine"))) == 2

    built.clear()
    refit = BuildOptions(refittable=True)
    build_engines(tmp_path, TRT, H100, refit, build=fake_build, log=lines.append)
    assert built == list(FRAME_ORDER)  # other options, same setup: replaces the H100 engine
    sha = results[FRAME_ORDER.index("vision")].record.target.onnx_sha256
    assert find_engine(tmp_path, "vision", sha, TRT, H100).target.options == refit
    assert find_engine(tmp_path, "vision", sha, TRT, H200).target.options == BuildOptions()
    assert len(list(tmp_path.glob("vision.*.engine"))) == len(list(tmp_path.glob("vision.*.json"))) == 2

    built.clear()
    engine = next(p for p in tmp_path.glob("sampler.*.engine") if b"refittable=True" in p.read_bytes())
    engine.write_bytes(engine.read_bytes()[:3])  # truncated: rebuilt, not trusted
    write_tiny_export(tmp_path, scale=2.0)  # re-exported with new weights in every graph
    build_engines(tmp_path, TRT, H100, refit, build=fake_build, log=lines.append)
    assert built == list(FRAME_ORDER)


def fake_engine(io: list[tuple[str, tuple[int, ...], str, str]], aliases: dict[str, str]) -> SimpleNamespace:
    """An object with the ICudaEngine attributes engine_io reads: (name, shape, dtype, INPUT|OUTPUT)."""
    names = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64", "bool": "BOOL"}
    table = {name: (shape, dtype, mode) for name, shape, dtype, mode in io}
    return SimpleNamespace(
        num_io_tensors=len(io),
        get_tensor_name=lambda i: io[i][0],
        get_tensor_shape=lambda n: list(table[n][0]),
        get_tensor_dtype=lambda n: SimpleNamespace(name=names[table[n][1]]),
        get_tensor_mode=lambda n: SimpleNamespace(name=table[n][2]),
        get_aliased_input_tensor=lambda n: aliases.get(n),
    )


AR_AUDIO = GraphSpec(
    "ar_audio",
    "ar_audio.onnx",
    (
        TensorSpec("prev_latent", (2, 64), "float32", ""),
        TensorSpec("k_cache", (2, 2, 4, 16, 16), "float32", "", 1),
    ),
    (
        TensorSpec("h_audio", (2, 64), "float32", ""),
        TensorSpec("k_cache_out", (2, 2, 4, 16, 16), "float32", "", 1),
    ),
    {"k_cache_out": "k_cache"},
)


def test_engine_io_is_checked_against_the_manifest():
    in_place = {"k_cache_out": "k_cache"}
    good = [
        ("prev_latent", (2, 64), "float32", "INPUT"),
        ("k_cache", (4, 4, 16, 16), "float32", "INPUT"),  # folded [L*B, Hkv, W, D]
        ("h_audio", (2, 64), "float32", "OUTPUT"),
        ("k_cache_out", (4, 4, 16, 16), "float32", "OUTPUT"),
    ]
    assert check_engine_io(AR_AUDIO, fake_engine(good, in_place), "dir") == in_place
    assert engine_graph_spec(AR_AUDIO, in_place).input("k_cache").shape == (4, 4, 16, 16)
    # without the in-place alias the engine must have the manifest's own shapes
    with pytest.raises(
        EngineCacheError,
        match=r"input 'k_cache' is \[4, 4, 16, 16\] float32, the manifest says \[2, 2, 4, 16, 16\]",
    ):
        check_engine_io(AR_AUDIO, fake_engine(good, {}), "dir")
    wrong_dtype = [*good[:2], ("h_audio", (2, 64), "float16", "OUTPUT"), good[3]]
    with pytest.raises(EngineCacheError, match=r"output 'h_audio' is \[2, 64\] float16"):
        check_engine_io(AR_AUDIO, fake_engine(wrong_dtype, in_place), "dir")
    with pytest.raises(EngineCacheError, match=r"output 'h_audio' is missing.*rebuild with"):
        check_engine_io(AR_AUDIO, fake_engine([good[0], good[1], good[3]], in_place), "dir")
    with pytest.raises(
        EngineCacheError, match="written in place of 'prev_latent', not of its state input 'k_cache'"
    ):
        check_engine_io(AR_AUDIO, fake_engine(good, {"k_cache_out": "prev_latent"}), "dir")


def test_parser_errors_name_node_and_operator():
    def error(node, name, op, desc):
        return SimpleNamespace(
            node=lambda: node,
            node_name=lambda: name,
            node_operator=lambda: op,
            desc=lambda: desc,
            code=lambda: SimpleNamespace(name="UNSUPPORTED_NODE"),
        )

    errors = [
        error(12, "node_TensorScatter_3", "TensorScatter", "mode circular unsupported"),
        error(-1, "", "", "bad"),
    ]
    parser = SimpleNamespace(num_errors=2, get_error=lambda i: errors[i])
    assert parser_errors(parser) == [
        "node 12 'node_TensorScatter_3' (TensorScatter): mode circular unsupported [UNSUPPORTED_NODE]",
        "graph: bad [UNSUPPORTED_NODE]",
    ]


def test_progress_monitor_logs_top_level_phases_with_seconds():
    class IProgressMonitor:  # stands in for tensorrt.IProgressMonitor
        def __init__(self):
            pass

    lines = []
    monitor = progress_monitor(SimpleNamespace(IProgressMonitor=IProgressMonitor), lines.append)
    monitor.phase_start("Building engine", None, 3)
    monitor.phase_start("Tactic selection", "Building engine", 10)
    assert monitor.step_complete("Tactic selection", 0) is True
    monitor.phase_finish("Tactic selection")
    monitor.phase_finish("Building engine")
    assert len(lines) == 1 and lines[0].startswith("    Building engine: ") and lines[0].endswith(" s")
    assert float(lines[0].split(": ")[1][:-2]) >= 0


def test_missing_tensorrt_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, even where installed
    monkeypatch.setitem(sys.modules, "cuda", None)
    with pytest.raises(TensorRTMissing, match=r"pip install 'soundreactor\[tensorrt\]'"):
        require_tensorrt()
    with pytest.raises(TensorRTMissing, match="cuda-python"):
        require_cudart()
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.8.0"))
    with pytest.raises(TensorRTMissing, match=r"TensorRT 10\.8\.0 is too old.*10\.15"):
        require_tensorrt()


def test_content_hash_follows_graph_and_weights(tmp_path):
    manifest = write_tiny_export(tmp_path)
    before = {g.name: cache.onnx_content_sha256(manifest, g.name) for g in manifest.graphs}
    assert before["vision"] != before["sampler"]
    changed = dataclasses.replace(manifest, files={**manifest.files, "vision.weights": "f" * 64})
    after = {g.name: cache.onnx_content_sha256(changed, g.name) for g in manifest.graphs}
    assert all(after[name] != before[name] for name in before)  # a weight file counts for every graph
    assert np.all([len(v) == 64 for v in after.values()])
