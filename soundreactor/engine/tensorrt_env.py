"""TensorRT and CUDA in this process: lazy imports with install hints, the GPU identity engines are cached under,
and loading a cached engine checked against its sidecar and the manifest.

Written against the TensorRT 10.15+ / 11.x Python API and cuda-python's `cuda.bindings.runtime` (12.6+); neither
can be installed on the CPU machines this project is developed on (SPEC 7).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from soundreactor.engine.bindings import check_engine_io
from soundreactor.engine.cache import (
    EngineCacheError,
    GpuIdentity,
    find_engine,
    onnx_content_sha256,
    read_engine,
    rebuild_hint,
    version_tuple,
)
from soundreactor.export.manifest import Manifest

# ONNX TensorScatter -> IKVCacheUpdateLayer (the in-place KV-cache write) arrived in TensorRT 10.15.
MIN_TENSORRT = (10, 15)
INSTALL = (
    "install it on a machine with an NVIDIA GPU: `pip install 'soundreactor[tensorrt]'` (or `pip install "
    "tensorrt cuda-python`; the tensorrt wheels download from NVIDIA's index, pypi.nvidia.com). The ONNX Runtime "
    "and PyTorch backends work without it"
)


class TensorRTMissing(ImportError):
    """TensorRT or cuda-python is absent or too old; the message says how to install it."""


def require_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTMissing(f"TensorRT is not installed: {INSTALL}") from err
    if version_tuple(tensorrt.__version__)[:2] < MIN_TENSORRT:
        raise TensorRTMissing(
            f"TensorRT {tensorrt.__version__} is too old: the in-place KV-cache update (ONNX TensorScatter) needs "
            f"{'.'.join(map(str, MIN_TENSORRT))}+; upgrade with `pip install -U tensorrt`"
        )
    return tensorrt


def require_cudart() -> ModuleType:
    try:
        from cuda.bindings import runtime
    except ImportError as err:
        raise TensorRTMissing(f"cuda-python (cuda.bindings, 12.6+) is not installed: {INSTALL}") from err
    return runtime


def check_cuda(result: tuple[Any, ...], what: str) -> Any:
    """The values of a cuda-python call `(error, *values)`, raising with the call's name unless it succeeded."""
    error, *values = result
    if int(error) != 0:  # cudaSuccess
        raise RuntimeError(f"{what} failed: {getattr(error, 'name', error)}")
    return values[0] if len(values) == 1 else tuple(values)


def current_gpu(cudart: ModuleType, device: int = 0) -> GpuIdentity:
    props = check_cuda(cudart.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
    name = props.name.split(b"\0")[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuIdentity(name, f"{props.major}.{props.minor}", props.multiProcessorCount, props.totalGlobalMem)


def load_engine(
    trt: ModuleType, runtime: Any, directory: str | Path, manifest: Manifest, graph: str, gpu: GpuIdentity
) -> tuple[Any, dict[str, str]]:
    """The deserialized engine of `graph` for this TensorRT and GPU, and the outputs it writes in place."""
    sha = onnx_content_sha256(manifest, graph)
    record = find_engine(directory, graph, sha, trt.__version__, gpu)
    data = read_engine(directory, record)
    # a version-compatible engine carries its own lean runtime, which TensorRT runs only when allowed to
    runtime.engine_host_code_allowed = record.target.options.version_compatible
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise EngineCacheError(
            f"TensorRT {trt.__version__} could not deserialize {record.target.paths(directory)[0].name} (see its log "
            f"above); {rebuild_hint(directory)}"
        )
    return engine, check_engine_io(manifest.graph(graph), engine, str(directory))
