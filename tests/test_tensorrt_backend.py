"""The TensorRT path on a real tiny export: the TensorScatter rewrite checked numerically with ONNX Runtime, the
binding plan, the polygraphy comparison, the CLI without TensorRT, and the backend's torch-free import graph.

Tests that need TensorRT and a GPU skip here (SPEC 7: TensorRT cannot be installed on these machines).
"""

import argparse
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_export import SLOTS, export_once
from tolerance import rounding_atol

import soundreactor.runtime.tensorrt_backend as tensorrt_backend
from soundreactor.engine.bindings import engine_graph_spec, plan_bindings
from soundreactor.engine.commands import add_commands
from soundreactor.engine.compare import compare_outputs, random_feed, run_onnxruntime
from soundreactor.engine.kv_scatter import use_tensor_scatter
from soundreactor.export.check import check_model, describe

NO_TENSORRT = "TensorRT is not installable here (SPEC 7): the registry's tensorrt packages are stubs"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A copy of the suite's shared tiny fp32 export (2 slots): these tests write graphs and engines next to it."""
    return Path(shutil.copytree(export_once(tmp_path_factory)[0], tmp_path_factory.mktemp("export") / "tiny"))


@pytest.fixture(scope="module")
def manifest(export_dir):
    from soundreactor.export.manifest import load_manifest

    return load_manifest(export_dir)


@pytest.fixture(scope="module")
def rewritten(export_dir, manifest) -> dict[str, tuple[Path, dict[str, str]]]:
    """Each ar_* graph after the rewrite, saved next to its weights, and its in-place pairs."""
    out = {}
    for name in ("ar_audio", "ar_vision"):
        model, aliases = use_tensor_scatter(onnx.load(export_dir / f"{name}.onnx", load_external_data=False))
        path = export_dir / f"{name}.tensor_scatter.onnx"
        onnx.save(model, path)
        out[name] = path, aliases
    return out


def run(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = (
        3  # TensorScatter's note that the CPU kernel copies instead of writing in place
    )
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))


@pytest.mark.parametrize(("name", "position"), [("ar_audio", 0), ("ar_vision", 1)])
def test_tensor_scatter_rewrite_equals_the_exported_scatter(export_dir, manifest, rewritten, name, position):
    path, aliases = rewritten[name]
    graph = manifest.graph(name)
    model = onnx.load(path, load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert aliases == {"k_cache_out": "k_cache", "v_cache_out": "v_cache"}
    assert ops.count("TensorScatter") == 2 and "ScatterND" not in ops
    assert (
        check_model(model, path) == []
    )  # onnx.checker, TensorRT's operator list and restrictions, static shapes
    spec = engine_graph_spec(
        graph, aliases
    )  # the I/O the engine will have: caches folded to [L*B, Hkv, W, D]
    assert [describe(v) for v in model.graph.input] == [(t.name, t.shape, t.dtype) for t in spec.inputs]
    assert [describe(v) for v in model.graph.output] == [(t.name, t.shape, t.dtype) for t in spec.outputs]

    rng = np.random.default_rng(1)
    window = manifest.config["transformer"]["window"]
    for frame_index in ([0, 3], [5, 11], [window + 2, 4 * window - 1]):  # the ring's start, middle and wrap
        feed = random_feed(graph, rng)
        feed["frame_index"] = np.array(frame_index, dtype=np.int64)
        feed["active"] = np.array([True, False])
        reference = run(export_dir / graph.file, feed)
        folded = {k: v.reshape(spec.input(k).shape) for k, v in feed.items()}
        got = {k: v.reshape(graph.output(k).shape) for k, v in run(path, folded).items()}
        for out, state in graph.state.items():
            np.testing.assert_array_equal(got[out], reference[out])  # the same rows written, nothing else
            changed = np.argwhere((reference[out] != feed[state]).any(axis=(0, 2, 4)))  # (slot, ring row)
            ring = (2 * frame_index[0] + position) % window
            assert changed.tolist() == [[0, ring]]  # only the active slot's row pos mod W; slot 1 was skipped
        hidden = next(t.name for t in graph.outputs if t.name not in graph.state)
        # same ops, same order; ORT may fuse the rewritten graph's float ops differently (2 per layer)
        atol = rounding_atol(reference[hidden], 2 * manifest.config["transformer"]["n_layers"])
        np.testing.assert_allclose(got[hidden], reference[hidden], rtol=0, atol=atol)


def test_graphs_without_cache_writes_stay_unchanged(export_dir, manifest):
    for name in ("vision", "sampler", "vae_decoder"):
        model = onnx.load(export_dir / f"{name}.onnx", load_external_data=False)
        assert use_tensor_scatter(model) == (model, {})


def test_binding_plan_from_the_exported_manifest(manifest, rewritten):
    aliases = {name: pair for name, (_, pair) in rewritten.items()}
    plan = plan_bindings(manifest, aliases)
    vae_states = [t.name for t in manifest.graph("vae_decoder").inputs if t.name.startswith("vae_state_")]
    assert set(plan.host_inputs) == {"frame_index", "active", "frames", "guidance", "noise"}
    assert plan.host_outputs == ("audio",)
    alternating = ["prev_latent", "prev_grid", *vae_states]
    assert set(plan.ping_pong()) == set(alternating)  # not the caches: they are updated in place
    assert set(plan.state_buffers) == {
        "k_cache",
        "v_cache",
        *(f"{s}@{p}" for s in alternating for p in (0, 1)),
    }
    cfg = manifest.config["transformer"]
    cache = plan.buffers["k_cache"]
    shape = (cfg["n_layers"], SLOTS, cfg["n_heads"], cfg["window"], cfg["d_model"] // cfg["n_heads"])
    assert (cache.shape, cache.dtype, cache.slot_axis) == (shape, "float32", 1)
    assert cache.nbytes == np.prod(shape) * 4
    assert plan.buffers["frames"].nbytes == SLOTS * manifest.frame_hw[0] * manifest.frame_hw[1] * 3
    assert plan.buffers["frame_index"].dtype == "int64" and plan.buffers["active"].nbytes == SLOTS

    for parity in (0, 1):
        bound = plan.bindings[parity]
        other = 1 - parity
        for graph in ("ar_audio", "ar_vision"):  # in place: input and output share one buffer, both parities
            assert bound[graph]["k_cache"] == bound[graph]["k_cache_out"] == "k_cache"
        assert bound["ar_audio"]["prev_latent"] == bound["sampler"]["prev_latent"] == f"prev_latent@{parity}"
        assert bound["sampler"]["latent"] == bound["vae_decoder"]["latent"] == f"prev_latent@{other}"
        assert [bound["vision"]["prev_grid"], bound["vision"]["grid"]] == [
            f"prev_grid@{p}" for p in (parity, other)
        ]
        assert bound["vae_decoder"]["vae_state_3_out"] == f"vae_state_3@{other}"
        assert bound["ar_audio"]["h_audio"] == bound["sampler"]["h_audio"] == "h_audio"  # engine to engine
        assert bound["vision"]["frame_index"] == bound["ar_vision"]["frame_index"] == "frame_index"
    for name, buffer in plan.buffers.items():  # every bound tensor has its buffer's bytes
        for graph in manifest.graphs:
            for t in (*graph.inputs, *graph.outputs):
                if plan.bindings[0][graph.name][t.name] == name:
                    assert (t.shape, t.dtype) == (buffer.shape, buffer.dtype), (graph.name, t.name)

    # without in-place engines (ONNX semantics) the cache is written twice a frame: read 0 -> 1 -> 0 every frame
    copying = plan_bindings(manifest, {})
    for parity in (0, 1):
        bound = copying.bindings[parity]
        audio, vision = bound["ar_audio"], bound["ar_vision"]
        assert [audio["k_cache"], audio["k_cache_out"], vision["k_cache_out"]] == [
            "k_cache@0",
            "k_cache@1",
            "k_cache@0",
        ]
        assert vision["k_cache"] == "k_cache@1"


def test_bad_aliases_are_refused(manifest):
    with pytest.raises(ValueError, match="writes 'h_audio' in place of 'k_cache'"):
        plan_bindings(manifest, {"ar_audio": {"h_audio": "k_cache"}})


@pytest.mark.parametrize("name", ["k_cache", "vae_state_4@1", "prev_grid@0"])
def test_slot_span_covers_exactly_one_slot(manifest, name):
    plan = plan_bindings(
        manifest, {g: {"k_cache_out": "k_cache", "v_cache_out": "v_cache"} for g in ("ar_audio", "ar_vision")}
    )
    buffer = plan.buffers[name]
    for slot in range(SLOTS):
        memory = np.ones(buffer.nbytes, np.uint8)
        offset, pitch, width, height = buffer.slot_span(slot)
        for row in range(height):  # what cudaMemset2D does
            memory[offset + row * pitch : offset + row * pitch + width] = 0
        values = memory.view(buffer.dtype).reshape(buffer.shape)
        zeroed = np.moveaxis(values, buffer.slot_axis, 0) == 0
        assert zeroed[slot].all() and not zeroed[1 - slot].any()


def test_compare_reports_each_output_against_the_tolerance(export_dir, manifest, rewritten):
    graph = manifest.graph("ar_audio")
    path, aliases = rewritten["ar_audio"]
    feed = random_feed(graph, np.random.default_rng(0))
    reference = run_onnxruntime(export_dir / graph.file, feed)  # through polygraphy's OnnxrtRunner
    spec = engine_graph_spec(graph, aliases)
    candidate = run(path, {k: v.reshape(spec.input(k).shape) for k, v in feed.items()})
    candidate = {k: v.reshape(graph.output(k).shape) for k, v in candidate.items()}
    rows = compare_outputs("ar_audio", reference, candidate, atol=1e-5, rtol=1e-5)
    assert [r.output for r in rows] == ["h_audio", "k_cache_out", "v_cache_out"]
    assert all(r.passed and r.max_abs <= 1e-6 for r in rows)

    candidate["h_audio"] = candidate["h_audio"] + np.float32(0.01)  # one output off by 0.01 > atol
    rows = {r.output: r for r in compare_outputs("ar_audio", reference, candidate, atol=1e-3, rtol=1e-3)}
    assert not rows["h_audio"].passed and rows["h_audio"].max_abs == pytest.approx(0.01, rel=1e-3)
    assert rows["k_cache_out"].passed
    del candidate["v_cache_out"]
    assert not {r.output: r for r in compare_outputs("ar_audio", reference, candidate, 1e-3, 1e-3)}[
        "v_cache_out"
    ].passed


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="soundreactor")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except SystemExit as exit_:
        return int(exit_.code)
    return 0


@pytest.mark.parametrize("command", ["build", "compare"])
def test_commands_without_tensorrt_say_how_to_install(export_dir, monkeypatch, capsys, command):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on this machine, even where TensorRT is installed
    assert cli([command, "--engines", str(export_dir)]) == 2
    err = capsys.readouterr().err
    assert f"error: `soundreactor {command}` needs TensorRT: TensorRT is not installed" in err
    assert (
        "pip install 'soundreactor[tensorrt]'" in err
        and "ONNX Runtime and PyTorch backends work without it" in err
    )


def test_backend_imports_neither_torch_nor_triton(export_dir):
    script = (
        "import sys\n"
        "sys.modules['tensorrt'] = None; sys.modules['cuda'] = None  # absent\n"
        "import soundreactor.runtime.tensorrt_backend as backend, soundreactor.engine.commands\n"
        "heavy = sorted(m for m in ('torch', 'triton', 'onnxruntime', 'onnx') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "try:\n"
        f"    backend.TrtStreams({str(export_dir)!r})\n"
        "except ImportError as err:\n"
        "    print(type(err).__name__, err)\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("TensorRTMissing TensorRT is not installed: install it on a machine with")

    # statically: the backend's module-level imports are numpy, the standard library and torch-free modules of
    # ours; tensorrt and cuda are imported inside functions only (engine/tensorrt_env.py)
    allowed = {"numpy", "soundreactor", "__future__", *sys.stdlib_module_names}
    for module in (tensorrt_backend, sys.modules["soundreactor.engine.tensorrt_env"]):
        tree = ast.parse(Path(module.__file__).read_text())
        top = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        top += [n.module for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert {name.split(".")[0] for name in top} <= allowed, top
        lazy = {
            (n.names[0].name if isinstance(n, ast.Import) else n.module).split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.Import | ast.ImportFrom) and n not in tree.body
        }
        assert lazy <= {"tensorrt", "cuda"}, lazy


@pytest.fixture(scope="module")
def engines(export_dir):
    """The tiny export's engines, built on this machine's GPU (skips where TensorRT is absent)."""
    pytest.importorskip("tensorrt", reason=f"{NO_TENSORRT}; build and run the engines on a GPU machine")
    pytest.importorskip("cuda.bindings", reason=f"{NO_TENSORRT} (nor cuda-python)")
    from soundreactor.engine.builder import build_engines
    from soundreactor.engine.tensorrt_env import current_gpu, require_cudart, require_tensorrt

    build_engines(export_dir, require_tensorrt().__version__, current_gpu(require_cudart()))
    return export_dir


def test_tensorrt_streams_match_onnxruntime(engines):
    from soundreactor.runtime.onnxruntime_backend import OrtStreams
    from soundreactor.runtime.tensorrt_backend import TrtStreams

    reference, streams = OrtStreams(engines, seed=3), TrtStreams(engines, seed=3)
    rng = np.random.default_rng(0)
    h, w = streams.frame_hw
    for i in range(24):  # past the ring's wrap (window 16 tokens = 8 frames), with skips and a reset
        frames = rng.integers(0, 256, (SLOTS, h, w, 3), dtype=np.uint8)
        active = np.array([True, i % 3 != 1])
        if i == 13:
            reference.reset(1)
            streams.reset(1)
        expected, got = reference.step(frames, active), streams.step(frames, active)
        np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-2)  # TF32 matmuls in the fp32 engines
        assert not got[1].any() or active[1]  # skipped slots give silence
    streams.close()


def test_compare_command_passes_on_the_built_engines(engines, capsys):
    assert cli(["compare", "--engines", str(engines)]) == 0
    assert "outputs within tolerance" in capsys.readouterr().out
