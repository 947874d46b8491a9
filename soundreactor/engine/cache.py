"""The engine cache: serialized TensorRT engines stored under a key of everything that makes them valid.

Next to the export's graphs, per graph and setup:

    <graph>.<key>.engine   the serialized engine
    <graph>.<key>.json     its sidecar: ONNX content sha256, build options, TensorRT version, GPU identity
                           (name, compute capability, SM count, total memory), engine size and sha256

key = sha256 of (graph, ONNX content sha256, build options, TensorRT version, GPU identity). Engines for other
GPUs or TensorRT versions may share the directory; a build replaces only its own setup's engine.

Nothing stale or foreign loads silently: a lookup that finds no engine for this setup names the fields in which
the closest one differs and the command that rebuilds it. The sidecar is the commit record: removed before an
engine is replaced, written after it (each file atomically: temp file in the same directory, fsync,
os.replace), so a crash mid-build leaves no engine that loads, and a truncated or altered engine file fails
its size or sha256 check.

No TensorRT, CUDA or onnx here: callers pass the TensorRT version and GPU identity (`tensorrt_env` reads them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from soundreactor.export.manifest import Manifest
from soundreactor.files import write_bytes as atomic_write

FORMAT = "soundreactor-engine/1"
# What TensorRT parses is the export after these passes; bump when engine/kv_scatter.py changes its output.
GRAPH_PASSES = "kv-tensor-scatter/1"
GPU_FIELDS = {
    "name": "GPU name",
    "compute_capability": "compute capability",
    "sm_count": "SM count",
    "total_memory": "total memory",
}


class EngineCacheError(ValueError):
    """An engine that is missing, stale, built for another setup, or damaged; the message names the fix."""


def rebuild_hint(directory: str | Path) -> str:
    return f"rebuild with `soundreactor build --engines {directory}`"


@dataclass(frozen=True)
class GpuIdentity:
    name: str
    compute_capability: str  # "9.0"
    sm_count: int
    total_memory: int  # bytes

    def describe(self) -> str:
        sm = self.compute_capability.replace(".", "")
        return f"{self.name} (sm_{sm}, {self.sm_count} SMs, {self.total_memory / 2**30:.1f} GiB)"


@dataclass(frozen=True)
class BuildOptions:
    version_compatible: bool = (
        False  # BuilderFlag.VERSION_COMPATIBLE: runs on later TensorRT of the same major
    )
    refittable: bool = False  # BuilderFlag.REFIT: weights can be replaced without a rebuild
    workspace_mib: int | None = None  # MemoryPoolType.WORKSPACE limit; None: TensorRT's default


@dataclass(frozen=True)
class EngineTarget:
    """Everything an engine depends on; its hash is the cache key."""

    graph: str
    onnx_sha256: str
    options: BuildOptions
    tensorrt_version: str
    gpu: GpuIdentity

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def paths(self, directory: str | Path) -> tuple[Path, Path]:
        """(engine file, sidecar) of this target in `directory`."""
        stem = f"{self.graph}.{self.key}"
        return Path(directory) / f"{stem}.engine", Path(directory) / f"{stem}.json"


@dataclass(frozen=True)
class EngineRecord:
    """The sidecar: what an engine file was built from and for, and its size and sha256."""

    target: EngineTarget
    engine_bytes: int
    engine_sha256: str
    build_seconds: float
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineRecord:
        target = data.get("target")
        if not isinstance(target, dict) or not all(
            isinstance(target.get(k), dict) for k in ("options", "gpu")
        ):
            raise ValueError("its target must be an object with options and gpu objects")
        target = dict(target)
        target["options"] = BuildOptions(**target["options"])
        target["gpu"] = GpuIdentity(**target["gpu"])
        return cls(**{**data, "target": EngineTarget(**target)})


def onnx_content_sha256(manifest: Manifest, graph: str) -> str:
    """What TensorRT parses for `graph`: its ONNX file, the weight files, and the passes the builder applies.

    Which weight files a graph reads is only recorded inside the ONNX file (ar_audio and ar_vision share one),
    so every weight file counts: an export with new weights rebuilds every engine.
    """
    weights = {name: sha for name, sha in manifest.files.items() if not name.endswith(".onnx")}
    content = {
        "graph": manifest.files[manifest.graph(graph).file],
        "weights": weights,
        "passes": GRAPH_PASSES,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:4])


def tensorrt_runs(built: str, installed: str, version_compatible: bool) -> bool:
    """Whether an engine built with TensorRT `built` deserializes in TensorRT `installed`."""
    if built == installed:
        return True
    old, new = version_tuple(built), version_tuple(installed)
    return version_compatible and old[:1] == new[:1] and new >= old


def and_join(items: list[str]) -> str:
    return " and ".join(filter(None, [", ".join(items[:-1]), items[-1]]))


def differences(record: EngineRecord, onnx_sha256: str, tensorrt_version: str, gpu: GpuIdentity) -> list[str]:
    """Why an engine does not fit this export, TensorRT and GPU: one phrase per differing field."""
    target = record.target
    found = []
    if target.onnx_sha256 != onnx_sha256:
        found.append("it was built from other ONNX graphs or weights (the directory was re-exported since)")
    if not tensorrt_runs(target.tensorrt_version, tensorrt_version, target.options.version_compatible):
        note = " (a version-compatible engine runs on later releases of the same major only)"
        found.append(
            f"it was built with TensorRT {target.tensorrt_version}, this is TensorRT {tensorrt_version}"
            + note * target.options.version_compatible
        )
    differing = [
        label for field, label in GPU_FIELDS.items() if getattr(target.gpu, field) != getattr(gpu, field)
    ]
    if differing:
        found.append(
            f"it was built for {target.gpu.describe()}, this GPU is {gpu.describe()} ({and_join(differing)} differ)"
        )
    return found


def write_engine(
    directory: str | Path, target: EngineTarget, data: bytes, build_seconds: float
) -> EngineRecord:
    """Store an engine and then its sidecar; the old sidecar goes first, so a crash leaves nothing loadable."""
    engine_path, sidecar_path = target.paths(directory)
    sidecar_path.unlink(missing_ok=True)
    atomic_write(engine_path, data)
    record = EngineRecord(target, len(data), hashlib.sha256(data).hexdigest(), round(build_seconds, 3))
    atomic_write(sidecar_path, record.to_json().encode())
    return record


def read_sidecars(directory: str | Path, graph: str) -> list[tuple[Path, EngineRecord | str]]:
    """Every sidecar of `graph` in `directory`, parsed, or the reason it could not be."""
    found: list[tuple[Path, EngineRecord | str]] = []
    for path in sorted(Path(directory).glob(f"{graph}.*.json")):
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, this tool reads {FORMAT!r}")
            record = EngineRecord.from_dict(data)
            # the engine file is named from the record: it must be this graph's, next to this sidecar
            if record.target.graph != graph or record.target.paths(directory)[1] != path:
                raise ValueError(f"it describes another engine ({record.target.graph}.{record.target.key})")
            found.append((path, record))
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            found.append((path, f"{path.name} is not a readable engine sidecar ({err})"))
    return found


def read_engine(directory: str | Path, record: EngineRecord) -> bytes:
    """The engine file of `record`, after checking its size and sha256 against the sidecar."""
    path, sidecar = record.target.paths(directory)
    if not path.is_file():
        raise EngineCacheError(
            f"{path.name} is missing but its sidecar {sidecar.name} exists; {rebuild_hint(directory)}"
        )
    data = path.read_bytes()
    if len(data) != record.engine_bytes:
        raise EngineCacheError(
            f"{path.name} is {len(data)} bytes, its sidecar records {record.engine_bytes}: the file is truncated "
            f"or was replaced; {rebuild_hint(directory)}"
        )
    if hashlib.sha256(data).hexdigest() != record.engine_sha256:
        raise EngineCacheError(
            f"{path.name} does not match the sha256 its sidecar records (damaged or replaced); {rebuild_hint(directory)}"
        )
    return data


def find_engine(
    directory: str | Path, graph: str, onnx_sha256: str, tensorrt_version: str, gpu: GpuIdentity
) -> EngineRecord:
    """The sidecar of the engine of `graph` that fits this export, TensorRT and GPU, whatever its build options.

    Prefers an engine built with exactly this TensorRT over a version-compatible one from an older release.
    """
    sidecars = read_sidecars(directory, graph)
    records = [(path, r) for path, r in sidecars if isinstance(r, EngineRecord)]
    fitting = [r for _, r in records if not differences(r, onnx_sha256, tensorrt_version, gpu)]
    if fitting:
        return min(fitting, key=lambda r: (r.target.tensorrt_version != tensorrt_version, r.target.key))
    if not sidecars:
        raise EngineCacheError(
            f"{directory} has no TensorRT engine for {graph}: build the engines with "
            f"`soundreactor build --engines {directory}`"
        )
    problems = [r for _, r in sidecars if isinstance(r, str)]
    if records:
        path, closest = min(
            records, key=lambda pr: len(differences(pr[1], onnx_sha256, tensorrt_version, gpu))
        )
        problems.insert(
            0,
            f"{path.with_suffix('.engine').name}: "
            + "; ".join(differences(closest, onnx_sha256, tensorrt_version, gpu)),
        )
    raise EngineCacheError(
        f"no engine for {graph} in {directory} fits this setup: {'; '.join(problems)}; {rebuild_hint(directory)}"
    )


def cached_record(directory: str | Path, target: EngineTarget) -> EngineRecord | None:
    """The record of `target` when its engine is stored complete and intact, else None (it needs a build)."""
    _, sidecar = target.paths(directory)
    for path, record in read_sidecars(directory, target.graph):
        if path == sidecar and isinstance(record, EngineRecord) and record.target == target:
            with contextlib.suppress(EngineCacheError):
                read_engine(directory, record)
                return record
    return None


def remove_superseded(directory: str | Path, target: EngineTarget) -> list[Path]:
    """Delete this setup's other engines for the graph (older exports or other options); returns the files.

    Engines for other GPUs or TensorRT versions stay: they are not this setup's to replace.
    """
    removed = []
    for path, record in read_sidecars(directory, target.graph):
        if path == target.paths(directory)[1] or not isinstance(record, EngineRecord):
            continue
        other = record.target
        if (other.gpu, other.tensorrt_version) == (target.gpu, target.tensorrt_version):
            for stale in (
                path,
                path.with_suffix(".engine"),
            ):  # sidecar first: never an engine without its check
                stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed
