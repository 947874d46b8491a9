"""`manifest.json` of an export directory: each graph's inputs, outputs and state pairs, what the graphs were built
from, and the checks that a directory still is what its manifest says.

No torch here: the ONNX Runtime backend and `soundreactor check` read manifests without it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORMAT = "soundreactor-onnx/1"
MANIFEST_NAME = "manifest.json"
# The order a frame runs its graphs in; ar_audio needs nothing from the frame, so it may run before it arrives.
FRAME_ORDER = ("ar_audio", "vision", "ar_vision", "sampler", "vae_decoder")
REEXPORT = "re-export the directory with `soundreactor export`"


class ExportDirError(ValueError):
    """An export directory that does not match its manifest, its checkpoint or this runtime."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy spelling: float32, float16, bfloat16, uint8, bool, int64
    meaning: str
    slot_axis: int = 0  # the stream-slot (batch) axis; 1 for the KV caches [L, B, Hkv, W, D]


@dataclass(frozen=True)
class GraphSpec:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # output -> the state input it replaces, for the graphs after it in the frame and for the next frame
    state: dict[str, str]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class Manifest:
    preset: str
    config: dict[str, Any]  # the full ModelConfig as a dict
    checkpoint_sha256: str | None  # None when exported from an in-memory model
    nfe: int
    guidance: float  # default guidance weight w; the `guidance` input of ar_vision can change it per slot
    frame_hw: tuple[int, int]
    slots: int
    precision: str  # fp32 | fp16 | bf16: weights, activations and state tensors
    opset: int
    tools: dict[str, str]  # versions of torch, onnx, onnxruntime, onnxscript at export
    graphs: tuple[GraphSpec, ...]  # in FRAME_ORDER
    files: dict[str, str]  # every file the graphs need (graphs and weight files) -> sha256
    format: str = FORMAT

    def graph(self, name: str) -> GraphSpec:
        for graph in self.graphs:
            if graph.name == name:
                return graph
        raise KeyError(f"no graph {name!r} in the manifest; it has {[g.name for g in self.graphs]}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        def tensor(t: dict[str, Any]) -> TensorSpec:
            return TensorSpec(**{**t, "shape": tuple(t["shape"])})

        graphs = tuple(
            GraphSpec(
                **{
                    **g,
                    "inputs": tuple(map(tensor, g["inputs"])),
                    "outputs": tuple(map(tensor, g["outputs"])),
                }
            )
            for g in data["graphs"]
        )
        return cls(**{**data, "graphs": graphs, "frame_hw": tuple(data["frame_hw"])})

    def save(self, directory: str | Path) -> None:
        (Path(directory) / MANIFEST_NAME).write_text(self.to_json())


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(directory: str | Path) -> Manifest:
    """The manifest of an export directory, with every listed file present and matching its hash."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ExportDirError(f"{directory} has no {MANIFEST_NAME}: is it an export directory? ({REEXPORT})")
    try:
        data = json.loads(path.read_text())
        fmt = data.get("format")
        if fmt != FORMAT:
            raise ExportDirError(f"{path} has format {fmt!r}, this runtime reads {FORMAT!r}; {REEXPORT}")
        manifest = Manifest.from_dict(data)
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise ExportDirError(f"{path} is not a readable manifest ({err!r}); {REEXPORT}") from err
    problems = []
    for name, expected in manifest.files.items():
        if not (directory / name).is_file():
            problems.append(f"{name} is missing")
        elif file_sha256(directory / name) != expected:
            problems.append(f"{name} differs from the file that was exported (sha256 mismatch)")
    if problems:
        raise ExportDirError(f"{directory} does not match its manifest: {'; '.join(problems)}; {REEXPORT}")
    return manifest


def check_checkpoint(manifest: Manifest, checkpoint: str | Path) -> None:
    """Raise unless the graphs were exported from this checkpoint file."""
    actual = file_sha256(checkpoint)
    if manifest.checkpoint_sha256 != actual:
        exported = manifest.checkpoint_sha256 or "an in-memory model"
        raise ExportDirError(
            f"the graphs were exported from {exported[:16]}..., not from {checkpoint} (sha256 {actual[:16]}...): "
            f"export this checkpoint with `soundreactor export --checkpoint {checkpoint}`"
        )


def check_single_stream(
    manifest: Manifest, directory: str | Path, nfe: int | None, rebuild: str = ""
) -> None:
    """A one-stream session needs a 1-slot export with the caller's NFE (the sampler's steps are unrolled)."""
    if nfe is not None and nfe != manifest.nfe:
        raise ExportDirError(
            f"{directory} was exported for nfe={manifest.nfe}; the sampler's steps are unrolled in the graph, "
            f"so re-export with `soundreactor export --nfe {nfe}`{rebuild}"
        )
    if manifest.slots != 1:
        raise ExportDirError(
            f"{directory} was exported for {manifest.slots} slots; a single-stream session needs --slots 1"
        )


def io_mismatches(
    spec: GraphSpec,
    inputs: list[tuple[str, tuple[int | str, ...], str]],
    outputs: list[tuple[str, tuple[int | str, ...], str]],
) -> list[str]:
    """Differences between a graph's actual (name, shape, dtype) inputs/outputs and its manifest entry."""
    problems = []
    for kind, expected, actual in (("input", spec.inputs, inputs), ("output", spec.outputs, outputs)):
        want = {t.name: (tuple(t.shape), t.dtype) for t in expected}
        have = {name: (tuple(shape), dtype) for name, shape, dtype in actual}
        problems += [f"{kind} {n!r} is missing" for n in want if n not in have]
        problems += [f"unexpected {kind} {n!r}" for n in have if n not in want]
        problems += [
            f"{kind} {n!r} is {list(have[n][0])} {have[n][1]}, the manifest says {list(shape)} {dtype}"
            for n, (shape, dtype) in want.items()
            if n in have and have[n] != (shape, dtype)
        ]
    return problems


def version_mismatch(exported: str, installed: str) -> bool:
    """Whether two versions differ in major or minor (patch releases don't change operator coverage)."""
    return exported.split(".")[:2] != installed.split(".")[:2]
