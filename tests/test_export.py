"""ONNX export: every graph against the PyTorch model it came from (ORT CPU), the manifest, and bad export dirs.

`export_once` is shared with test_check.py, test_calibration.py and test_onnxruntime_backend.py: an export takes
~10 s, so each precision is exported once per test run (through the `export` command) and reused.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from soundreactor.config import ModelConfig
from soundreactor.export.commands import add_commands
from soundreactor.export.exporter import cast_model, publish, set_softmax_precision, to_onnx
from soundreactor.export.graphs import frame_graphs
from soundreactor.export.manifest import ExportDirError, GraphSpec, file_sha256, load_manifest
from soundreactor.model.soundreactor import SoundReactor, init_model
from soundreactor.model.transformer import KVCache
from soundreactor.runtime.onnxruntime_backend import OrtStreams

FRAME_HW = (48, 80)
SLOTS = 2
NFE = 2
GUIDANCE = 2.5


def run_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    args.func(args)


def export_once(tmp_path_factory: pytest.TempPathFactory, precision: str = "fp32") -> tuple[Path, Path]:
    """(export dir, checkpoint) of the tiny preset, exported by `soundreactor export` once per test run: under
    pytest-xdist the workers share one copy (the first to need it exports, under a lock; the others wait for it).
    Read only: a test that changes an export copies it first."""
    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        base = base.parent  # this run's folder, shared by its workers
    with open(base / "export_tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        checkpoint = base / "tiny.safetensors"
        if not checkpoint.exists():
            init_model("tiny", seed=3)[0].save(checkpoint)
        out = base / f"export_tiny_{precision}"
        if not (out / "manifest.json").exists():
            options = {"--nfe": NFE, "--guidance": GUIDANCE, "--precision": precision, "--slots": SLOTS}
            options["--frame-size"] = f"{FRAME_HW[0]}x{FRAME_HW[1]}"
            run_command(
                ["export", "--checkpoint", str(checkpoint), "--out", str(out)]
                + [str(x) for pair in options.items() for x in pair]
            )
    return out, checkpoint


def load_model(checkpoint: Path) -> SoundReactor:
    model = SoundReactor.load(checkpoint, input_hw=FRAME_HW)
    model.configure_sampling(nfe=NFE, guidance=GUIDANCE)
    return model


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory) -> tuple[Path, Path]:
    return export_once(tmp_path_factory)


@pytest.fixture(scope="module")
def model(fp32_export) -> SoundReactor:
    return load_model(fp32_export[1])


def random_inputs(graph: GraphSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs covering a first frame (slot 0) and a frame past the ring wrap (slot 1), one slot inactive."""
    rng = np.random.default_rng(seed)
    special = {
        "frame_index": np.array([0, 13]),  # frame 13 writes positions 26, 27: ring slots 10, 11 of 16
        "active": np.array([True, False]),
        "guidance": np.array([3.0, 1.5], np.float32),
    }
    out = {}
    for t in graph.inputs:
        if t.name in special:
            out[t.name] = special[t.name]
        elif t.dtype == "uint8":
            out[t.name] = rng.integers(0, 256, t.shape, dtype=np.uint8)
        else:
            out[t.name] = rng.standard_normal(t.shape).astype(
                ml_dtypes.bfloat16 if t.dtype == "bfloat16" else t.dtype
            )
    return out


@torch.no_grad()
def reference(model: SoundReactor, graph: str, x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The graph's outputs computed by the model's own streaming API (in-place KV cache, decoder.step)."""
    tf, active = model.transformer, x["active"]

    def keep(new: torch.Tensor, old: torch.Tensor, axis: int = 0) -> torch.Tensor:
        shape = [1] * new.dim()
        shape[axis] = -1
        return torch.where(active.view(shape), new, old)

    if graph in ("ar_audio", "ar_vision"):
        cache = KVCache(tf.cfg, SLOTS)
        cache.k.copy_(x["k_cache"])
        cache.v.copy_(x["v_cache"])
        index = x["frame_index"]
        if graph == "ar_audio":
            hidden = tf.audio_step(x["prev_latent"], index == 0, cache, 2 * index)
        else:
            hidden = tf.vision_step(x["vision_token"], cache, 2 * index + 1, x["guidance"])
        return [hidden, keep(cache.k, x["k_cache"], 1), keep(cache.v, x["v_cache"], 1)]
    if graph == "vision":
        token, grid = model.vision(x["frames"], x["prev_grid"], x["frame_index"] > 0)
        return [token, keep(grid, x["prev_grid"])]
    if graph == "sampler":
        return [keep(model.sample_latent(x["h_audio"], x["h_vision"], x["noise"]), x["prev_latent"])]
    states = [x[f"vae_state_{k}"] for k in range(model.vae.decoder.n_states)]
    audio, new_states = model.vae.decoder.step(x["latent"], states)
    return [keep(audio, torch.zeros_like(audio)), *map(keep, new_states, states)]


def compare(graphs: list[GraphSpec], run, model: SoundReactor, rel_tol: float) -> None:
    """Every graph's outputs within rel_tol * max|reference| of the fp32 model (per output)."""
    for graph in graphs:
        x = random_inputs(graph)
        outputs = run(graph, x)
        floats = {t.name for t in graph.inputs if "float" in t.dtype}
        as_torch = {k: torch.from_numpy(v.astype(np.float32) if k in floats else v) for k, v in x.items()}
        expected = reference(model, graph.name, as_torch)
        for spec, out, ref in zip(graph.outputs, outputs, expected, strict=True):
            assert out.shape == spec.shape and str(out.dtype) == spec.dtype, (graph.name, spec.name)
            ref = ref.numpy()
            err = np.abs(out.astype(np.float32) - ref).max()
            assert err <= rel_tol * np.abs(ref).max(), (
                f"{graph.name}.{spec.name}: {err:.2e} of {np.abs(ref).max()}"
            )


def ort_runner(directory: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tiny graphs; a pool on a busy machine waits for descheduled workers

    def run(graph: GraphSpec, x: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = ort.InferenceSession(
            str(directory / graph.file), options, providers=["CPUExecutionProvider"]
        )
        return session.run(None, x)

    return run


def test_fp32_graphs_match_the_model(fp32_export, model):
    directory = fp32_export[0]
    # fp32 rounding only: measured <= 1.1e-6 of each output's scale (max |x| of 1.5-8)
    compare(load_manifest(directory).graphs, ort_runner(directory), model, rel_tol=1e-5)


def test_fp16_graphs_run_on_ort_cpu_within_half_precision(tmp_path_factory, model):
    """ORT CPU runs every fp16 graph (casting to fp32 where it lacks fp16 kernels); states stay fp16."""
    directory, _ = export_once(tmp_path_factory, "fp16")
    manifest = load_manifest(directory)
    assert manifest.graph("ar_audio").input("k_cache").dtype == "float16"
    assert manifest.graph("vision").input("frames").dtype == "uint8"
    assert manifest.graph("vae_decoder").output("audio").dtype == "float32"
    # fp16 weights and activations against the fp32 model: measured <= 1.3e-3 of each output's scale
    compare(manifest.graphs, ort_runner(directory), model, rel_tol=5e-3)


def test_bf16_graphs_within_bfloat16_precision(tmp_path, model):
    """ORT CPU has no bf16 kernels, so the ONNX reference evaluator runs a bf16 export of three graphs."""
    cast = cast_model(model, "bf16")
    assert cast.transformer.rope_cos.dtype == torch.float32  # RoPE tables stay fp32
    graphs = frame_graphs(cast, SLOTS)
    specs, evaluators = [], {}
    for name in ("ar_audio", "vision", "sampler"):
        module, spec = graphs[name]
        proto = to_onnx(module, spec)
        set_softmax_precision(proto)
        onnx.checker.check_model(proto, full_check=True)
        specs.append(spec)
        evaluators[name] = ReferenceEvaluator(proto)
        if name == "vision":  # DINOv2 and aggregator attention: bf16 Q, K, V with an fp32 softmax
            precisions = [
                onnx.helper.get_attribute_value(a)
                for node in proto.graph.node
                if node.op_type == "Attention"
                for a in node.attribute
                if a.name == "softmax_precision"
            ]
            assert precisions == [onnx.TensorProto.FLOAT] * 3

    def run(graph: GraphSpec, x: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(o) for o in evaluators[graph.name].run(None, x)]

    # bf16 keeps 8 mantissa bits (4e-3 relative per rounding): measured <= 1.4e-2 of each output's scale
    compare(specs, run, model, rel_tol=4e-2)


def test_manifest_describes_the_export(fp32_export, model):
    directory, _ = fp32_export
    manifest = load_manifest(directory)
    assert ModelConfig.from_dict(manifest.config) == model.config
    assert (manifest.preset, manifest.nfe, manifest.guidance, manifest.slots) == (
        "tiny",
        NFE,
        GUIDANCE,
        SLOTS,
    )
    assert (manifest.frame_hw, manifest.precision, manifest.opset) == (FRAME_HW, "fp32", 23)
    assert set(manifest.tools) == {"torch", "onnx", "onnxruntime", "onnxscript"}
    assert [g.name for g in manifest.graphs] == ["ar_audio", "vision", "ar_vision", "sampler", "vae_decoder"]
    for graph in manifest.graphs:
        proto = onnx.load(str(directory / graph.file), load_external_data=False)
        assert [i.name for i in proto.graph.input] == [t.name for t in graph.inputs]
        assert [o.name for o in proto.graph.output] == [t.name for t in graph.outputs]
        for output, state_input in graph.state.items():
            assert graph.output(output).shape == graph.input(state_input).shape
    assert manifest.graph("ar_audio").input("k_cache").shape == (2, SLOTS, 4, 16, 16)
    # the transformer's weights (those of >= 1 KiB; smaller ones stay inline) are stored once for ar_audio and
    # ar_vision, 4 KiB aligned
    large = sum(p.nbytes for p in model.transformer.parameters() if p.nbytes >= 1024)
    assert large <= (directory / "transformer.weights").stat().st_size < 1.4 * large
    assert {"ar_audio.onnx", "transformer.weights", "vision.weights"} <= set(manifest.files)


def copy_export(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_manifest(directory: Path, **changes) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        data[key] = value
    path.write_text(json.dumps(data))


def test_export_dir_mismatches_are_named(fp32_export, tmp_path):
    source, checkpoint = fp32_export
    OrtStreams(source, checkpoint=checkpoint)  # the right checkpoint passes

    missing = copy_export(source, tmp_path / "missing")
    (missing / "sampler.weights").unlink()
    with pytest.raises(ExportDirError, match=r"sampler.weights is missing.*soundreactor export"):
        OrtStreams(missing)

    changed = copy_export(source, tmp_path / "changed")
    with open(changed / "vision.weights", "r+b") as f:
        f.write(b"\1\2\3\4")
    with pytest.raises(ExportDirError, match=r"vision.weights differs .*sha256"):
        load_manifest(changed)

    # a graph whose I/O changed, with its hash updated so only the I/O check can notice
    renamed = copy_export(source, tmp_path / "renamed")
    proto = onnx.load(str(renamed / "sampler.onnx"), load_external_data=False)
    proto.graph.input[2].name = "eps"
    for node in proto.graph.node:
        node.input[:] = ["eps" if i == "noise" else i for i in node.input]
    onnx.save(proto, str(renamed / "sampler.onnx"))
    files = json.loads((renamed / "manifest.json").read_text())["files"]
    edit_manifest(renamed, files={**files, "sampler.onnx": file_sha256(renamed / "sampler.onnx")})
    with pytest.raises(
        ExportDirError, match=r"sampler.onnx does not match the manifest: input 'noise' is missing"
    ):
        OrtStreams(renamed)

    other = tmp_path / "other.safetensors"
    init_model("tiny", seed=4)[0].save(other)
    with pytest.raises(ExportDirError, match=r"not from .*other.safetensors.*--checkpoint"):
        OrtStreams(source, checkpoint=other)

    old_runtime = copy_export(source, tmp_path / "old_runtime")
    tools = json.loads((old_runtime / "manifest.json").read_text())["tools"]
    edit_manifest(old_runtime, tools={**tools, "onnxruntime": "1.20.1"})
    with pytest.warns(RuntimeWarning, match=r"onnxruntime 1.20.1, this is"):
        OrtStreams(old_runtime)

    bf16 = copy_export(source, tmp_path / "bf16")
    edit_manifest(bf16, precision="bf16")
    with pytest.raises(ExportDirError, match="bf16 graphs, which are for TensorRT"):
        OrtStreams(bf16)

    with pytest.raises(ExportDirError, match=r"no manifest\.json"):
        OrtStreams(tmp_path)


def test_export_command_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_command(["export", "--checkpoint", "x", "--out", str(tmp_path), "--frame-size", "48by80"])
    assert "480x854" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        run_command(["export", "--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)])


def _staged_export(parent: Path, tag: str) -> Path:
    """A complete stand-in export (manifest plus graph files naming its writer), staged beside the target."""
    staging = parent / f".staging-{tag}"
    staging.mkdir()
    for name in ("manifest.json", "vision.onnx", "vision.weights"):
        (staging / name).write_text(tag)
    return staging


def test_concurrent_exports_never_mix(tmp_path):
    """Two writers publishing into one folder at the same moments: it ends with one writer's complete export."""
    target = tmp_path / "engines"
    barrier = threading.Barrier(2, timeout=30)
    replaced = []

    errors = []

    def writer(tag: str) -> None:
        try:
            for i in range(25):
                staging = _staged_export(tmp_path, f"{tag}{i}")
                barrier.wait()
                replaced.append(publish(staging, target))
        except Exception as err:  # a thread's exception would otherwise only be a warning
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [e for e in errors if not isinstance(e, threading.BrokenBarrierError)], errors
    files = {p.name: p.read_text() for p in target.iterdir()}
    assert sorted(files) == ["manifest.json", "vision.onnx", "vision.weights"]
    assert len(set(files.values())) == 1
    assert (
        sum(replaced) >= 24
    )  # each round after the first: whoever came second found an export and replaced it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]  # nothing left beside it


def test_a_folder_that_is_not_an_export_is_never_replaced(tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"jpeg")
    staging = _staged_export(tmp_path, "a")
    with pytest.raises(ValueError, match=r"photos holds files but no manifest.json"):
        publish(staging, target)
    assert (target / "holiday.jpg").read_bytes() == b"jpeg"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert publish(staging, empty) is False and (empty / "manifest.json").read_text() == "a"


@pytest.mark.parametrize("layout", [{"upsample": "nearest"}, {"stereo": "pan"}], ids=["nearest", "pan"])
def test_another_decoder_layout_exports_and_matches_torch(tmp_path, layout):
    """VAEConfig.upsample = "nearest" (Resize + Conv in ONNX) and stereo = "pan" (one more state: the previous
    frame's pan logit) export through `soundreactor export`, and the decoder graph computes what the model's
    decoder.step computes."""
    base = init_model("tiny", seed=4)[0]
    model = SoundReactor(base.config.replace(vae=layout))
    torch.manual_seed(4)
    with torch.no_grad():
        for p in model.vae.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))  # non-trivial snakes and biases
    checkpoint = tmp_path / "layout.safetensors"
    model.save(checkpoint)
    out = tmp_path / "export"
    options = ["--nfe", str(NFE), "--slots", str(SLOTS), "--guidance", str(GUIDANCE)]
    options += ["--frame-size", f"{FRAME_HW[0]}x{FRAME_HW[1]}"]
    run_command(["export", "--checkpoint", str(checkpoint), "--out", str(out), *options])
    graphs = [g for g in load_manifest(out).graphs if g.name == "vae_decoder"]
    assert len(graphs) == 1
    # fp32 rounding, as above, scaled by magnitude: the perturbed decoder's convolutions reach ~4.4x its output
    # peak (10.5 against 2.4), and rounding follows the largest intermediate, not the output
    compare(graphs, ort_runner(out), load_model(checkpoint), rel_tol=5e-5)
