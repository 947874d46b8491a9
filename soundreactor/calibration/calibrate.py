"""Calibrate an fp32 export directory and write its quantized copy: a complete export directory whose chosen
graphs carry Q/DQ, loadable by `OrtStreams` and the TensorRT builder like any other.

The copy's manifest is the source's with the new files; `quantization.json` (listed in the manifest's files, so
hash-checked with them) records the scheme per graph, the tensor statistics the scales came from and the
calibration data (video or demo scene, frame count and hash, noise seed).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime as ort

from soundreactor.calibration.chain import FrameSource, GraphChain
from soundreactor.calibration.options import DEFAULT_COMPONENTS
from soundreactor.calibration.quantize import (
    FLOAT_MODULES,
    QUANTIZED_OPS,
    prepare_graph,
    quantize_graph,
    quantized_products,
    scheme,
)
from soundreactor.calibration.ranges import RangeCollector, summarize
from soundreactor.export.manifest import FRAME_ORDER, Manifest, file_sha256, load_manifest
from soundreactor.files import write_text

RECORD_NAME = "quantization.json"
# The VAE decoder stays in the export's precision unless asked for: its waveform is where quantization noise is
# heard. Measured: fp8 there fails the log-mel bar on the tiny preset (2.7 dB), int8 on the (random-weight)
# paper preset passes it only just (0.98 dB); see perf/results/calibration_paper.md.


def check_components(components: Sequence[str]) -> tuple[str, ...]:
    unknown = [c for c in components if c not in FRAME_ORDER]
    if unknown or not components:
        raise ValueError(
            f"unknown component(s) {unknown or '(none given)'}: choose from {', '.join(FRAME_ORDER)} "
            "(comma-separated, e.g. --components vision,ar_audio)"
        )
    return tuple(c for c in FRAME_ORDER if c in components)


def check_target(source: Path, target: Path) -> None:
    if target.resolve() == source.resolve():
        raise ValueError(f"the quantized copy needs its own directory (--out), not the source {source}")


def write_export_dir(
    source: Path, target: Path, quantized: dict[str, onnx.ModelProto], record: dict
) -> Manifest:
    """`target` as a copy of the export directory `source` with the graphs in `quantized` replaced."""
    from soundreactor.export.exporter import GraphWriter

    check_target(source, target)
    manifest = load_manifest(source)
    target.mkdir(parents=True, exist_ok=True)
    writer = GraphWriter(target)
    for graph in manifest.graphs:  # unquantized graphs are loaded one at a time
        writer.write(
            graph.name, quantized[graph.name] if graph.name in quantized else onnx.load(source / graph.file)
        )
    for name in quantized:
        onnx.checker.check_model(str(target / manifest.graph(name).file), full_check=True)
    write_text(target / RECORD_NAME, json.dumps(record, indent=1))
    files = {name: file_sha256(target / name) for name in (*writer.files, RECORD_NAME)}
    copy = dataclasses.replace(manifest, files=files)
    copy.save(target)
    return copy


def calibrate(
    engines: str | Path,
    out: str | Path,
    source: FrameSource,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    scheme_name: str = "int8",
    seed: int = 0,
) -> Manifest:
    """Quantize `components` of the fp32 export at `engines` with scales from `source`'s frames; write to `out`.

    The graphs see the inputs the fp32 pipeline gives them frame by frame (noise seeded with `seed`).
    """
    engines, out = Path(engines), Path(out)
    check_target(engines, out)
    manifest = load_manifest(engines)
    if manifest.precision != "fp32":
        raise ValueError(
            f"{engines} holds {manifest.precision} graphs; calibrate an fp32 export (`soundreactor export "
            "--precision fp32`): Q/DQ scales are computed from fp32 statistics"
        )
    components = check_components(components)
    quant = scheme(scheme_name)
    chain = GraphChain(engines, seed)
    with tempfile.TemporaryDirectory(prefix="soundreactor-calibration-") as tmp:
        workdir = Path(tmp)
        prepared = {name: workdir / f"{name}.onnx" for name in components}
        collectors = {}
        for name in components:
            prepare_graph(engines / manifest.graph(name).file, prepared[name])
            collectors[name] = RangeCollector(prepared[name], QUANTIZED_OPS, quant.method, workdir)
        for frame in source.frames:
            calls = chain.step(frame)
            for name, collector in collectors.items():
                collector.collect(calls[name].inputs)
        ranges = {name: collector.ranges() for name, collector in collectors.items()}
        protos = {name: quantize_graph(prepared[name], ranges[name], quant) for name in components}

    def graph_record(name: str) -> dict[str, object]:
        if name not in protos:
            return {"scheme": manifest.precision}
        return {
            "scheme": quant.name,
            "quantized_nodes": len(quantized_products(protos[name])),
            "weights": "per output channel, symmetric (zero point 0)",
            "activations": "per tensor, symmetric (zero point 0)",
            "calibration": quant.method.name,
            "float_modules": list(FLOAT_MODULES),
            "tensor_statistics": summarize(ranges[name]),
        }

    record = {
        "scheme": quant.name,
        "source_precision": manifest.precision,
        "quantized_ops": list(QUANTIZED_OPS),
        "library": f"onnxruntime {ort.__version__} (onnxruntime.quantization QDQQuantizer)",
        "graphs": {g.name: graph_record(g.name) for g in manifest.graphs},
        "calibration_data": {**source.description, "noise_seed": seed, "guidance": manifest.guidance},
        "source": {"directory": str(engines), "manifest_sha256": file_sha256(engines / "manifest.json")},
    }
    return write_export_dir(engines, out, protos, record)
