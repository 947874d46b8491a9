"""`soundreactor compare`: the same inputs through ONNX Runtime (the exported graphs) and TensorRT (the built
engines), per output the max abs / rel difference against the tolerance, compared by polygraphy.

Inputs are random but valid: uint8 frames, normal floats (state and caches included), frame indices past the
ring's first wrap, a mix of active and skipped slots. Engines whose caches TensorRT updates in place take them
folded ([L*B, Hkv, W, D], the same bytes); inputs and outputs are reshaped across that, so outputs are compared
in the manifest's shapes by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from soundreactor.export.manifest import GraphSpec, load_manifest

# elementwise: an element fails when it exceeds both. fp32 engines run matmuls in TF32 (TensorRT's default).
TOLERANCES = {"fp32": (1e-2, 1e-2), "fp16": (5e-2, 5e-2)}


@dataclass(frozen=True)
class OutputDiff:
    graph: str
    output: str
    max_abs: float
    max_rel: float
    passed: bool


def random_feed(graph: GraphSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feed = {}
    for t in graph.inputs:
        if t.dtype == "uint8":
            feed[t.name] = rng.integers(0, 256, t.shape, dtype=np.uint8)
        elif t.dtype == "bool":
            feed[t.name] = np.arange(np.prod(t.shape)).reshape(t.shape) % 2 == 0  # odd slots skipped
        elif t.dtype == "int64":
            feed[t.name] = rng.integers(0, 1000, t.shape, dtype=np.int64)
        else:
            feed[t.name] = rng.standard_normal(t.shape).astype(t.dtype)
    return feed


def compare_outputs(
    graph: str, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], atol: float, rtol: float
) -> list[OutputDiff]:
    """Per output of `reference`, polygraphy's elementwise check of `candidate` against it."""
    from polygraphy.comparator import CompareFunc, IterationResult
    from polygraphy.logger import G_LOGGER

    compare = CompareFunc.simple(atol=atol, rtol=rtol, check_shapes=True)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # the table below says it once
        results = compare(
            IterationResult(reference, runner_name="onnxruntime"),
            IterationResult(candidate, runner_name="tensorrt"),
        )
    diffs = []
    for name in reference:
        result = results.get(name, False)
        if isinstance(result, bool):  # missing output or mismatched shape: polygraphy has no statistics
            diffs.append(OutputDiff(graph, name, float("inf"), float("inf"), False))
        else:
            diffs.append(
                OutputDiff(graph, name, float(result.max_absdiff), float(result.max_reldiff), bool(result))
            )
    return diffs


def run_onnxruntime(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    with OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"])) as runner:
        return dict(runner.infer(feed))


def run_tensorrt(engine: Any, graph: GraphSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from polygraphy.backend.trt import TrtRunner

    shaped = {name: value.reshape(tuple(engine.get_tensor_shape(name))) for name, value in feed.items()}
    with TrtRunner(engine) as runner:
        outputs = runner.infer(shaped)
    return {t.name: np.asarray(outputs[t.name]).reshape(t.shape) for t in graph.outputs}


def compare_directory(
    directory: str | Path,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[OutputDiff]:
    """Compare every graph of the export in `directory` with its engine; logs a table, returns its rows."""
    from soundreactor.engine.tensorrt_env import current_gpu, load_engine, require_cudart, require_tensorrt

    directory = Path(directory)
    manifest = load_manifest(directory)
    if manifest.precision not in TOLERANCES:
        raise ValueError(
            f"{directory} holds {manifest.precision} graphs, which ONNX Runtime's CPU provider cannot run; "
            "compare an fp32 or fp16 export of the same checkpoint"
        )
    default_atol, default_rtol = TOLERANCES[manifest.precision]
    atol, rtol = default_atol if atol is None else atol, default_rtol if rtol is None else rtol
    trt, cudart = require_tensorrt(), require_cudart()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    gpu = current_gpu(cudart)
    rng = np.random.default_rng(seed)
    log(f"{'graph':<12} {'output':<18} {'max abs':>10} {'max rel':>10}  (atol {atol:g}, rtol {rtol:g})")
    rows = []
    for graph in manifest.graphs:
        engine, _ = load_engine(trt, runtime, directory, manifest, graph.name, gpu)
        feed = random_feed(graph, rng)
        reference = run_onnxruntime(directory / graph.file, feed)
        for diff in compare_outputs(graph.name, reference, run_tensorrt(engine, graph, feed), atol, rtol):
            verdict = "ok" if diff.passed else "FAILED"
            log(f"{diff.graph:<12} {diff.output:<18} {diff.max_abs:>10.3g} {diff.max_rel:>10.3g}  {verdict}")
            rows.append(diff)
    failed = [f"{d.graph}.{d.output}" for d in rows if not d.passed]
    log(
        f"{len(rows) - len(failed)}/{len(rows)} outputs within tolerance"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return rows
