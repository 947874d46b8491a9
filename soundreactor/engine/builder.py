"""`soundreactor build`: one TensorRT engine per exported graph, in manifest order, through the engine cache.

Each graph goes through the KV-cache rewrite (engine/kv_scatter.py), TensorRT's ONNX parser into a strongly
typed network (precision comes from the ONNX dtypes and Q/DQ nodes; TensorRT 11 has no FP16/INT8 builder
flags), and the builder with a persistent timing cache per GPU and TensorRT version (loaded, used, saved back).
Progress: TensorRT's top-level build phases with their seconds (an IProgressMonitor), and a line per engine.

`build_engines` takes the TensorRT version, GPU identity and build function as arguments, so the cache logic
around the build runs in tests without TensorRT; `tensorrt_build` is the real build.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from soundreactor.engine.cache import (
    BuildOptions,
    EngineRecord,
    EngineTarget,
    GpuIdentity,
    atomic_write,
    cached_record,
    onnx_content_sha256,
    remove_superseded,
    write_engine,
)
from soundreactor.engine.kv_scatter import use_tensor_scatter
from soundreactor.export.manifest import load_manifest

Log = Callable[[str], None]
# (ONNX model bytes, path of the ONNX file its external weights are relative to, options, timing cache file, log)
BuildFn = Callable[[bytes, Path, BuildOptions, Path, Log], bytes]


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a graph; the message carries its per-node errors."""


@dataclass(frozen=True)
class BuildResult:
    record: EngineRecord
    built: bool  # False: the cached engine was kept
    seconds: float


def parser_errors(parser: Any) -> list[str]:
    """One line per error of a TensorRT OnnxParser, naming the ONNX node and operator."""
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        where = (
            f"node {error.node()} {error.node_name()!r} ({error.node_operator()})"
            if error.node() >= 0
            else "graph"
        )
        lines.append(f"{where}: {error.desc()} [{error.code().name}]")
    return lines


def progress_monitor(trt: ModuleType, log: Log) -> Any:
    """A trt.IProgressMonitor that logs each top-level build phase with its seconds (thread-safe)."""

    class PhaseTimer(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.lock = threading.Lock()
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                with self.lock:
                    self.started[phase_name] = time.perf_counter()

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            with self.lock:
                start = self.started.pop(phase_name, None)
            if start is not None:
                log(f"    {phase_name}: {time.perf_counter() - start:.1f} s")

    return PhaseTimer()


def tensorrt_build(
    model: bytes, onnx_path: Path, options: BuildOptions, timing_cache: Path, log: Log
) -> bytes:
    """Parse `model` (external weights relative to `onnx_path`) as a strongly typed network and build it."""
    from soundreactor.engine.tensorrt_env import require_tensorrt

    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model, str(onnx_path)):
        errors = "\n  ".join(parser_errors(parser))
        raise EngineBuildError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}:\n  {errors}")
    config = builder.create_builder_config()
    if options.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"    {timing_cache.name} does not fit this GPU or TensorRT; starting an empty timing cache")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    monitor = progress_monitor(trt, log)  # must outlive the build
    config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} failed to build {onnx_path.name}; its log above says why"
        )
    atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def timing_cache_path(directory: Path, tensorrt_version: str, gpu: GpuIdentity) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in gpu.name).strip("-").lower()
    return (
        directory / f"timing.{slug}.sm{gpu.compute_capability.replace('.', '')}.trt{tensorrt_version}.cache"
    )


def build_engines(
    directory: str | Path,
    tensorrt_version: str,
    gpu: GpuIdentity,
    options: BuildOptions | None = None,
    force: bool = False,
    build: BuildFn = tensorrt_build,
    log: Log = print,
) -> list[BuildResult]:
    """Build (or keep from the cache) the engine of every graph of the export in `directory`, next to it."""
    directory = Path(directory)
    options = options or BuildOptions()
    manifest = load_manifest(directory)
    timing_cache = timing_cache_path(directory, tensorrt_version, gpu)
    results = []
    for graph in manifest.graphs:
        target = EngineTarget(
            graph.name, onnx_content_sha256(manifest, graph.name), options, tensorrt_version, gpu
        )
        record = None if force else cached_record(directory, target)
        if record is not None:
            log(f"{graph.name}: cached {target.paths(directory)[0].name}")
            results.append(BuildResult(record, False, 0.0))
            continue
        log(f"{graph.name}: building for {gpu.describe()} with TensorRT {tensorrt_version}")
        start = time.perf_counter()
        model, in_place = use_tensor_scatter(onnx.load(str(directory / graph.file), load_external_data=False))
        data = build(model.SerializeToString(), directory / graph.file, options, timing_cache, log)
        seconds = time.perf_counter() - start
        record = write_engine(directory, target, data, seconds)
        for path in remove_superseded(directory, target):
            log(f"    removed superseded {path.name}")
        writes = f", KV cache updated in place ({', '.join(in_place)})" if in_place else ""
        log(
            f"{graph.name}: {seconds:.1f} s -> {target.paths(directory)[0].name} ({len(data) / 2**20:.1f} MiB{writes})"
        )
        results.append(BuildResult(record, True, seconds))
    return results
