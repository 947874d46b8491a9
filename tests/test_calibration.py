"""Calibration: Q/DQ graphs (int8 and FP8 E4M3, both run on ORT CPU) against fp32 on the tiny preset, their
structure as TensorRT needs it, deterministic statistics, a report that tracks the graphs, and bad input."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from test_export import FRAME_HW, export_once

from soundreactor.calibration import metrics
from soundreactor.calibration import report as report_module
from soundreactor.calibration.calibrate import RECORD_NAME, calibrate, check_components, write_export_dir
from soundreactor.calibration.chain import GraphChain, load_frames, open_session
from soundreactor.calibration.commands import add_commands
from soundreactor.calibration.quantize import QUANTIZED_OPS, prepare_graph, scheme, stays_float
from soundreactor.calibration.ranges import RangeCollector, summarize
from soundreactor.calibration.report import evaluate
from soundreactor.cli import main
from soundreactor.demo_video import make_demo_video
from soundreactor.export.manifest import FRAME_ORDER, load_manifest
from soundreactor.runtime.onnxruntime_backend import OrtStreams

FRAMES = 10  # > 8 frames, the tiny preset's 16-token window, so the KV ring wraps during calibration


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_once(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def source():
    return load_frames(None, FRAMES, FRAME_HW)


@pytest.fixture(scope="module")
def quantized(fp32_dir: Path, source, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every graph quantized, once per scheme."""
    base = tmp_path_factory.mktemp("calibrated")
    for name in ("int8", "fp8"):
        calibrate(fp32_dir, base / name, source, FRAME_ORDER, name)
    return {name: base / name for name in ("int8", "fp8")}


@pytest.fixture(scope="module")
def reports(fp32_dir: Path, quantized: dict[str, Path], source):
    return {name: evaluate(fp32_dir, directory, source) for name, directory in quantized.items()}


def metric(ms, name: str) -> float:
    return next(m.value for m in ms if m.name == name)


def test_int8_pipeline_within_thresholds(reports) -> None:
    report = reports["int8"]
    assert report.acceptable, report.to_markdown()
    assert set(report.quantized) == set(FRAME_ORDER)
    # the graphs really changed: quantization noise is measurable, yet well above the 20 dB bar
    latent_snr = metric(report.end_to_end, "latent SNR dB")
    assert 25 < latent_snr < 80, latent_snr


def test_fp8_runs_on_ort_cpu_and_is_coarser_than_int8(reports) -> None:
    int8, fp8 = reports["int8"], reports["fp8"]
    # E4M3 keeps 3 mantissa bits against int8's 7 over a calibrated range: its error must be larger
    assert metric(fp8.end_to_end, "latent SNR dB") < metric(int8.end_to_end, "latent SNR dB") - 3
    assert metric(fp8.components["sampler"], "latent SNR dB") < metric(
        int8.components["sampler"], "latent SNR dB"
    )
    assert 0.9 < metric(fp8.end_to_end, "vision token cosine") < 1.0
    # the verdict is the thresholds applied to the measured values, whatever they are on random weights
    assert fp8.acceptable == all(m.passed for ms in (fp8.end_to_end, *fp8.components.values()) for m in ms)


# ORT's integer kernels for Q/DQ patterns: their results depend on the CPU's instruction set
INTEGER_KERNELS = {
    "QLinearMatMul",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "QLinearConv",
    "ConvInteger",
    "QGemm",
    "DynamicQuantizeMatMul",
}


def executed_ops(path: Path, fused: bool, feeds: dict, tmp_path: Path) -> set[str]:
    """The op types ORT's profiler saw run for one call of the graph at `path`."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / f"profile_{fused}")
    session = open_session(path, fused, options)
    session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


def test_report_runs_the_qdq_arithmetic_not_integer_kernels(quantized, source, tmp_path: Path) -> None:
    """The judged chain runs quantize, dequantize, then float products (the same on every CPU); ORT's default
    optimizations run integer kernels instead (that they do shows this check can fail)."""
    calls = GraphChain(quantized["int8"]).step(source.frames[0])
    fused = set()
    for graph in FRAME_ORDER:
        path, feeds = quantized["int8"] / f"{graph}.onnx", calls[graph].inputs
        reference = executed_ops(path, False, feeds, tmp_path)
        assert {"QuantizeLinear", "DequantizeLinear"} <= reference and reference & set(QUANTIZED_OPS), graph
        assert not reference & INTEGER_KERNELS, graph
        fused |= executed_ops(path, True, feeds, tmp_path)
    assert fused & INTEGER_KERNELS


def consumer_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a product's weight, as TensorRT expects per-channel scales."""
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return {"MatMul": 1, "Conv": 0, "ConvTranspose": 1}[node.op_type]


@pytest.mark.parametrize("name, zero_type", [("int8", TensorProto.INT8), ("fp8", TensorProto.FLOAT8E4M3FN)])
def test_qdq_structure_is_what_tensorrt_takes(quantized, name: str, zero_type: int) -> None:
    for graph in load_manifest(quantized[name]).graphs:
        proto = onnx.load(quantized[name] / graph.file)
        inits = {t.name: t for t in proto.graph.initializer}
        consumers = {}
        for node in proto.graph.node:
            for tensor in node.input:
                consumers.setdefault(tensor, []).append(node)
        for node in proto.graph.node:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                continue
            zero = inits[node.input[2]]
            assert zero.data_type == zero_type, (graph.name, node.name)
            assert not numpy_helper.to_array(zero).astype(np.float32).any(), (
                "zero points must be 0 (symmetric)"
            )
            if node.op_type == "QuantizeLinear":
                continue
            users = consumers[node.output[0]]
            # only the products read Q/DQ: norms, softmax, attention, SnakeBeta and state paths stay float
            assert all(u.op_type in QUANTIZED_OPS for u in users), [u.op_type for u in users]
            scale = numpy_helper.to_array(inits[node.input[1]])
            if node.input[0] in inits:  # a stored quantized weight: per output channel
                axis = next(a.i for a in node.attribute if a.name == "axis")
                assert axis == consumer_axis(users[0]), (graph.name, users[0].op_type, axis)
                assert scale.shape == (inits[node.input[0]].dims[axis],)
                assert inits[node.input[0]].data_type == zero_type
            else:  # an activation: one scale
                assert scale.size == 1
        outputs = {o.name for o in proto.graph.output}
        assert not any(n.op_type == "DequantizeLinear" and n.output[0] in outputs for n in proto.graph.node)
        # every product outside vision.preprocess reads a Q/DQ activation and a stored quantized weight
        dequantized = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
        products = [n for n in proto.graph.node if n.op_type in QUANTIZED_OPS and not stays_float(n)]
        assert products, graph.name
        for n in products:
            activation, weight = dequantized.get(n.input[0]), dequantized.get(n.input[1])
            assert activation is not None and activation not in inits, (graph.name, n.name)
            assert weight in inits, (graph.name, n.name)


def test_frame_preprocess_stays_float(quantized) -> None:
    proto = onnx.load(quantized["int8"] / "vision.onnx")
    dequantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    preprocess = [n for n in proto.graph.node if stays_float(n) and n.op_type in QUANTIZED_OPS]
    assert preprocess, "the resize matmuls of vision.preprocess should be found by their namespace"
    assert not any(set(n.input) & dequantized for n in preprocess)


def test_quantized_dir_is_a_complete_export(fp32_dir: Path, quantized, source) -> None:
    directory = quantized["int8"]
    manifest, original = load_manifest(directory), load_manifest(fp32_dir)  # hashes of every file checked
    assert manifest.graphs == original.graphs and RECORD_NAME in manifest.files
    record = json.loads((directory / RECORD_NAME).read_text())
    assert {g: r["scheme"] for g, r in record["graphs"].items()} == dict.fromkeys(FRAME_ORDER, "int8")
    assert record["calibration_data"]["sha256"] == source.description["sha256"]
    assert record["graphs"]["sampler"]["tensor_statistics"]
    # OrtStreams loads it unchanged and runs exactly what the calibration chain runs with ORT's default kernels
    streams, chain = OrtStreams(directory, seed=0), GraphChain(directory, seed=0, fused=True)
    for frame in source.frames[:3]:
        audio = streams.step(np.broadcast_to(frame, (manifest.slots, *frame.shape)))
        np.testing.assert_array_equal(audio, chain.step(frame)["vae_decoder"].outputs["audio"])


def test_calibration_chain_is_the_reference_session(fp32_dir: Path, source) -> None:
    streams, chain = OrtStreams(fp32_dir, seed=0), GraphChain(fp32_dir, seed=0, fused=True)
    for frame in source.frames[:3]:
        audio = streams.step(np.broadcast_to(frame, (streams.slots, *frame.shape)))
        np.testing.assert_array_equal(audio, chain.step(frame)["vae_decoder"].outputs["audio"])


def test_ranges_are_deterministic_and_cover_the_inputs(fp32_dir: Path, source, tmp_path: Path) -> None:
    prepare_graph(fp32_dir / "ar_audio.onnx", tmp_path / "ar_audio.onnx")
    chain = GraphChain(fp32_dir)
    feeds = [chain.step(frame)["ar_audio"].inputs for frame in source.frames[:4]]
    for method in (scheme("int8").method, scheme("fp8").method):
        runs = []
        for _ in range(2):
            collector = RangeCollector(tmp_path / "ar_audio.onnx", QUANTIZED_OPS, method, tmp_path)
            for f in feeds:
                collector.collect(f)
            runs.append(summarize(collector.ranges()))
        assert runs[0] == runs[1] and runs[0]
    # int8 (symmetric min/max): prev_latent feeds latent_in, its range is max |x| over the frames
    largest = float(max(np.abs(f["prev_latent"]).max() for f in feeds))
    collector = RangeCollector(tmp_path / "ar_audio.onnx", QUANTIZED_OPS, scheme("int8").method, tmp_path)
    for f in feeds:
        collector.collect(f)
    assert summarize(collector.ranges())["prev_latent"] == {"lowest": -largest, "highest": largest}


def coarsened(proto: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """Activation scales times `factor`: the same graph on a grid `factor` times coarser."""
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            scale = inits[node.input[1]]
            scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * factor, scale.name))
    return proto


def test_report_tracks_the_graphs(fp32_dir: Path, quantized, reports, source, tmp_path: Path) -> None:
    directory = quantized["int8"]
    record = json.loads((directory / RECORD_NAME).read_text())
    coarse = coarsened(onnx.load(directory / "sampler.onnx"), 16.0)
    write_export_dir(directory, tmp_path / "coarse", {"sampler": coarse}, record)
    report = evaluate(fp32_dir, tmp_path / "coarse", source)
    fine = reports["int8"]
    # a 16x coarser grid (4 bits fewer) raises the sampler's quantization noise by ~24 dB; ask for 6
    assert (
        metric(report.components["sampler"], "latent SNR dB")
        < metric(fine.components["sampler"], "latent SNR dB") - 6
    )
    assert metric(report.end_to_end, "latent SNR dB") < metric(fine.end_to_end, "latent SNR dB") - 6
    # graphs that did not change score the same
    assert report.components["vision"] == fine.components["vision"]


def run_cli(argv: list[str]) -> int | None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_calibrate_command_writes_dir_and_report(fp32_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "int8"
    status = run_cli(
        [
            "calibrate",
            "--engines",
            str(fp32_dir),
            "--out",
            str(out),
            "--frames",
            "4",
            "--components",
            "sampler",
            "--report",
            "--ort-kernels",
        ]
    )
    printed = capsys.readouterr().out
    assert "verdict: int8" in printed
    assert printed.count("not judged, ORT integer kernels on this CPU") == 4
    data = json.loads((out / "calibration_report.json").read_text())
    assert status == (0 if data["acceptable"] else 1)  # scripts see the verdict
    assert data["quantized"] == {"sampler": "int8"} and data["evaluation_data"]["frames"] == 4
    assert data["components"]["sampler"][0]["value"] > 20
    assert (out / "calibration_report.png").stat().st_size > 10_000
    markdown = (out / "calibration_report.md").read_text()
    assert "| sampler | latent SNR dB |" in markdown and "Not judged: end to end on ONNX Runtime" in markdown
    assert [m["name"] for m in data["ort_kernels_not_judged"]] == [m["name"] for m in data["end_to_end"]]


@pytest.mark.parametrize("acceptable", [True, False])
def test_the_exit_status_is_the_verdict(
    fp32_dir: Path, tmp_path: Path, capsys, monkeypatch, acceptable
) -> None:
    """`calibrate --report` exits 1 on a NOT acceptable verdict, 0 on an acceptable one (either way the graphs and
    the report are written). The verdict is forced: which one random weights get is not the point here."""
    monkeypatch.setattr(report_module.AccuracyReport, "acceptable", property(lambda self: acceptable))
    argv = ["calibrate", "--engines", str(fp32_dir), "--out", str(tmp_path / "q"), "--frames", "2"]
    assert main([*argv, "--components", "sampler", "--report"]) == (0 if acceptable else 1)
    printed = capsys.readouterr().out
    assert printed.strip().endswith(
        "verdict: int8 acceptable" if acceptable else "verdict: int8 NOT acceptable"
    )
    assert (tmp_path / "q" / "calibration_report.json").is_file()


def test_bad_input_errors(fp32_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown component.*'nope'.*choose from ar_audio, vision"):
        check_components(["vision", "nope"])
    with pytest.raises(ValueError, match="unknown component"):
        run_cli(
            ["calibrate", "--engines", str(fp32_dir), "--out", str(tmp_path / "x"), "--components", "vae"]
        )
    with pytest.raises(ValueError, match="unknown quantization scheme 'int4'"):
        scheme("int4")
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match=r"calibration video .*broken.mp4 is unreadable"):
        load_frames(garbage, 4, FRAME_HW)
    short = make_demo_video(tmp_path / "short.mp4", seconds=0.2, size=FRAME_HW)
    with pytest.raises(ValueError, match=r"has 6 frames at 30 fps, fewer than the 10 asked for"):
        load_frames(short, 10, FRAME_HW)
    with pytest.raises(ValueError, match=r"is 48x80, the graphs take 56x112"):
        load_frames(short, 4, (56, 112))
    with pytest.raises(ValueError, match="at least 2 frames"):
        load_frames(None, 1, FRAME_HW)
    frames = load_frames(None, 2, FRAME_HW)
    with pytest.raises(ValueError, match="its own directory"):
        calibrate(fp32_dir, fp32_dir, frames)
    half = tmp_path / "fp16"
    shutil.copytree(fp32_dir, half)
    manifest = json.loads((half / "manifest.json").read_text())
    (half / "manifest.json").write_text(json.dumps({**manifest, "precision": "fp16"}))
    with pytest.raises(ValueError, match="calibrate an fp32 export"):
        calibrate(half, tmp_path / "q", frames)


def test_metrics_against_known_signals() -> None:
    rng = np.random.default_rng(0)
    rate, t = 48_000, np.arange(48_000) / 48_000
    tone = np.sqrt(2) * np.sin(2 * np.pi * 440 * t)  # RMS 1
    noisy = tone + 0.1 * rng.standard_normal(t.size)  # noise RMS 0.1: 20 dB
    assert metrics.snr_db(*metrics.energies(tone, noisy)) == pytest.approx(20.0, abs=0.2)
    white = rng.standard_normal((2, rate))
    assert metrics.log_mel_distance_db(white, white, rate) == 0.0
    # twice the amplitude is +6.02 dB in every (unfloored) bin
    assert metrics.log_mel_distance_db(white, 2 * white, rate) == pytest.approx(20 * np.log10(2), abs=0.05)
    bank = metrics.mel_filterbank(rate)
    freqs = np.fft.rfftfreq(metrics.N_FFT, 1 / rate)
    band = np.argmax(bank @ (np.abs(freqs - 1000) < 12))  # the band that holds 1 kHz best
    center = freqs[np.argmax(bank[band])]
    assert abs(center - 1000) < 100
    assert metrics.cosine_rows(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]))[0] == pytest.approx(2**-0.5)


def test_command_names_match_the_implementation() -> None:
    """The parser's onnx-free names (calibration/options.py) are the implemented schemes and known graphs."""
    from soundreactor.calibration.options import DEFAULT_COMPONENTS, SCHEME_NAMES
    from soundreactor.calibration.quantize import SCHEMES

    assert sorted(SCHEME_NAMES) == sorted(SCHEMES)
    assert sorted(check_components(DEFAULT_COMPONENTS)) == sorted(DEFAULT_COMPONENTS)
