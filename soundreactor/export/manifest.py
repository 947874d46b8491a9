"""`manifest.json` of an export directory: each graph's inputs, outputs and state pairs, what the graphs were built
from, and the checks that a directory still is what its manifest says.

No torch here: the ONNX Runtime backend and `soundreactor check` read manifests without it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from soundreactor.files import write_text

FORMAT = "soundreactor-onnx/1"
MANIFEST_NAME = "manifest.json"
# The order a frame runs its graphs in; ar_audio needs nothing from the frame, so it may run before it arrives.
FRAME_ORDER = ("ar_audio", "vision", "ar_vision", "sampler", "vae_decoder")
REEXPORT = "re-export the directory with `soundreactor export`"
DTYPES = ("float32", "float16", "bfloat16", "uint8", "bool", "int64", "int32")


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
        write_text(Path(directory) / MANIFEST_NAME, self.to_json())


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def member_path(directory: Path, name: object, field: str) -> Path:
    """`directory / name` for a file name taken from a manifest or sidecar, refused unless it stays inside the
    export: no absolute paths, no `..`, and a symlink must resolve inside `directory` or beside the file
    `directory`'s manifest.json resolves to. The second is the layout of content-addressed caches (the Hugging
    Face Hub's `snapshots/<rev>/<name> -> ../../blobs/<sha256>`), and the rule ONNX Runtime applies to a graph's
    external data (its folder, or the folder of the graph file's real path)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise ExportDirError(f"{field}: {name!r} is not a file name; {REEXPORT}")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts:
        raise ExportDirError(f"{field}: {name!r} points outside the export directory; {REEXPORT}")
    path = directory / name
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in export_roots(directory)):
        raise ExportDirError(
            f"{field}: {name!r} is a link that resolves outside the export directory ({target}) and outside "
            f"the folder its manifest.json resolves to; {REEXPORT}"
        )
    return path


def export_roots(directory: Path) -> tuple[Path, ...]:
    """Where an export's files may really lie: the directory, and the folder its manifest.json resolves to (a
    cache's blob folder when the export is a snapshot of symlinks)."""
    directory = directory.resolve()
    return directory, (directory / MANIFEST_NAME).resolve().parent


def _require(ok: bool, field: str, wanted: str, value: object) -> None:
    if not ok:
        shown = repr(value)
        raise ExportDirError(f"manifest field {field} must be {wanted}, got {shown[:80]}; {REEXPORT}")


def _is_int(value: object, low: int, high: int = 1 << 31) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _check_tensor(t: object, field: str) -> None:
    _require(isinstance(t, dict), field, "an object", t)
    _require(isinstance(t.get("name"), str) and t["name"], f"{field}.name", "a name", t.get("name"))
    shape = t.get("shape")
    _require(
        isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d, 1) for d in shape),
        f"{field}.shape",
        "a list of positive sizes",
        shape,
    )
    _require(t.get("dtype") in DTYPES, f"{field}.dtype", f"one of {', '.join(DTYPES)}", t.get("dtype"))
    _require(isinstance(t.get("meaning", ""), str), f"{field}.meaning", "a string", t.get("meaning"))
    axis = t.get("slot_axis", 0)
    _require(_is_int(axis, 0, max(len(shape) - 1, 0)), f"{field}.slot_axis", "an axis of its shape", axis)


def check_manifest_data(data: object) -> None:
    """Schema of a parsed manifest.json: ExportDirError naming the first bad field. Graphs must be the five the
    runtime runs, in FRAME_ORDER; the stored model config must be valid (`ModelConfig.from_dict`)."""
    from soundreactor.config import ModelConfig

    _require(isinstance(data, dict), "(top level)", "a JSON object", data)
    fmt = data.get("format")
    if fmt != FORMAT:
        raise ExportDirError(f"manifest has format {fmt!r}, this runtime reads {FORMAT!r}; {REEXPORT}")
    fields = {f for f in Manifest.__dataclass_fields__}
    missing, unknown = sorted(fields - {"format"} - set(data)), sorted(set(data) - fields)
    _require(
        not missing and not unknown,
        "(names)",
        "the manifest's fields",
        f"missing {missing}, unknown {unknown}",
    )
    _require(isinstance(data["preset"], str), "preset", "a string", data["preset"])
    _require(isinstance(data["config"], dict), "config", "an object", data["config"])
    try:
        ModelConfig.from_dict(data["config"])
    except ValueError as err:
        raise ExportDirError(f"manifest field config is invalid: {err}; {REEXPORT}") from None
    sha = data["checkpoint_sha256"]
    _require(sha is None or _is_sha256(sha), "checkpoint_sha256", "null or a sha256 hex digest", sha)
    _require(_is_int(data["nfe"], 1, 64), "nfe", "an integer in [1, 64]", data["nfe"])
    guidance = data["guidance"]
    finite = isinstance(guidance, int | float) and not isinstance(guidance, bool) and math.isfinite(guidance)
    _require(finite, "guidance", "a finite number", guidance)
    hw = data["frame_hw"]
    _require(
        isinstance(hw, list) and len(hw) == 2 and all(_is_int(v, 1, 8192) for v in hw),
        "frame_hw",
        "[height, width] in pixels (1 to 8192)",
        hw,
    )
    _require(_is_int(data["slots"], 1, 4096), "slots", "an integer in [1, 4096]", data["slots"])
    _require(
        data["precision"] in ("fp32", "fp16", "bf16"), "precision", "fp32, fp16 or bf16", data["precision"]
    )
    _require(_is_int(data["opset"], 1, 1000), "opset", "an integer", data["opset"])
    tools = data["tools"]
    ok = isinstance(tools, dict) and all(isinstance(v, str) for v in tools.values())
    _require(ok, "tools", "an object of version strings", tools)
    files = data["files"]
    ok = isinstance(files, dict) and bool(files) and all(_is_sha256(v) for v in files.values())
    _require(ok, "files", "an object mapping file names to sha256 hex digests", files)
    graphs = data["graphs"]
    _require(
        isinstance(graphs, list) and all(isinstance(g, dict) for g in graphs), "graphs", "a list", graphs
    )
    names = [g.get("name") for g in graphs]
    _require(
        names == list(FRAME_ORDER), "graphs", f"the graphs {', '.join(FRAME_ORDER)} in this order", names
    )
    for i, g in enumerate(graphs):
        where = f"graphs[{i}] ({g['name']})"
        _require(set(g) == {f for f in GraphSpec.__dataclass_fields__}, where, "a graph entry", sorted(g))
        _require(g["file"] in files, f"{where}.file", "a file listed (and hashed) in files", g["file"])
        for kind in ("inputs", "outputs"):
            _require(isinstance(g[kind], list) and g[kind], f"{where}.{kind}", "a non-empty list", g[kind])
            for j, t in enumerate(g[kind]):
                _check_tensor(t, f"{where}.{kind}[{j}]")
        outputs = {t["name"] for t in g["outputs"]}
        state = g["state"]
        ok = isinstance(state, dict) and all(k in outputs and isinstance(v, str) for k, v in state.items())
        _require(ok, f"{where}.state", "an object mapping its outputs to state inputs", state)


def load_manifest(directory: str | Path) -> Manifest:
    """The manifest of an export directory, validated, with every listed file inside the directory, present and
    matching its hash. Raises ExportDirError naming the problem."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ExportDirError(f"{directory} has no {MANIFEST_NAME}: is it an export directory? ({REEXPORT})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportDirError(f"{path} is not a readable manifest ({err}); {REEXPORT}") from None
    try:
        check_manifest_data(data)
    except ExportDirError as err:
        raise ExportDirError(f"{path}: {err}") from None
    manifest = Manifest.from_dict(data)
    problems = []
    for name, expected in manifest.files.items():
        member = member_path(directory, name, f"{path} files")
        if not member.is_file():
            problems.append(f"{name} is missing")
        elif file_sha256(member) != expected:
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
