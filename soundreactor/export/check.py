"""`soundreactor check DIR`: is an export directory complete, consistent and ready for TensorRT? (no torch)

Per graph: onnx.checker (full), the opset and every operator against TensorRT's ONNX parser support list, the
parser's restrictions that apply to our operators, static shapes on every tensor after shape inference, the
I/O against the manifest, and state inputs paired with outputs of equal shape and dtype. Where TensorRT is
installed, each graph is also parsed by it (through polygraphy).
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from soundreactor.export.manifest import Manifest, io_mismatches, load_manifest

# Operators marked supported ("Y") in onnx-tensorrt docs/operators.md for TensorRT 10.15, which imports opsets
# 9-24; TensorRT 11.x keeps this list.
TENSORRT_OPSETS = range(9, 25)
TENSORRT_OPS = frozenset(
    [
        "Abs",
        "Acos",
        "Acosh",
        "Add",
        "And",
        "ArgMax",
        "ArgMin",
        "Asin",
        "Asinh",
        "Atan",
        "Atanh",
        "Attention",
        "AveragePool",
        "BatchNormalization",
        "BlackmanWindow",
        "Cast",
        "CastLike",
        "Ceil",
        "Celu",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "ConvTranspose",
        "Cos",
        "Cosh",
        "CumSum",
        "DeformConv",
        "DepthToSpace",
        "DequantizeLinear",
        "Div",
        "Dropout",
        "Einsum",
        "Elu",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "EyeLike",
        "Flatten",
        "Floor",
        "Gather",
        "GatherElements",
        "GatherND",
        "Gelu",
        "Gemm",
        "GlobalAveragePool",
        "GlobalLpPool",
        "GlobalMaxPool",
        "Greater",
        "GreaterOrEqual",
        "GridSample",
        "GroupNormalization",
        "GRU",
        "HammingWindow",
        "HannWindow",
        "HardSigmoid",
        "HardSwish",
        "Hardmax",
        "Identity",
        "If",
        "ImageScaler",
        "InstanceNormalization",
        "IsInf",
        "IsNaN",
        "LayerNormalization",
        "LeakyRelu",
        "Less",
        "LessOrEqual",
        "Log",
        "LogSoftmax",
        "Loop",
        "LRN",
        "LSTM",
        "LpNormalization",
        "LpPool",
        "MatMul",
        "Max",
        "MaxPool",
        "Mean",
        "MeanVarianceNormalization",
        "Min",
        "Mish",
        "Mod",
        "Mul",
        "Neg",
        "NonMaxSuppression",
        "NonZero",
        "Not",
        "OneHot",
        "Or",
        "Pad",
        "ParametricSoftplus",
        "Pow",
        "PRelu",
        "QuantizeLinear",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Range",
        "Reciprocal",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "ReduceSumSquare",
        "Relu",
        "Reshape",
        "Resize",
        "ReverseSequence",
        "RMSNormalization",
        "RNN",
        "RoiAlign",
        "RotaryEmbedding",
        "Round",
        "STFT",
        "ScaledTanh",
        "Scan",
        "Scatter",
        "ScatterElements",
        "ScatterND",
        "Selu",
        "Shape",
        "Shrink",
        "Sigmoid",
        "Sign",
        "Sin",
        "Sinh",
        "Size",
        "Slice",
        "Softmax",
        "Softplus",
        "Softsign",
        "SpaceToDepth",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tan",
        "Tanh",
        "TensorScatter",
        "ThresholdedRelu",
        "Tile",
        "TopK",
        "Transpose",
        "Trilu",
        "Unsqueeze",
        "Upsample",
        "Where",
        "Xor",
    ]
)
# Inputs the parser needs as initializers (build-time constants), by operator: input index -> its name.
CONSTANT_INPUTS = {
    **{
        f"Reduce{kind}": {1: "axes"}
        for kind in ["L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum", "SumSquare"]
    },
    "CumSum": {1: "axis"},
    "TopK": {1: "K"},
    "OneHot": {1: "depth"},
}
ELEM_NAMES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.DOUBLE: "float64",
}


def describe(value: onnx.ValueInfoProto) -> tuple[str, tuple[int | str, ...], str]:
    """(name, shape, dtype) of a graph value; unknown or symbolic dims come back as strings."""
    tensor = value.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
    return (
        value.name,
        shape,
        ELEM_NAMES.get(tensor.elem_type, onnx.TensorProto.DataType.Name(tensor.elem_type)),
    )


def _node_problems(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    problems = []
    unsupported: dict[str, list[str]] = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            unsupported.setdefault(f"{node.domain}::{node.op_type}", []).append(node.name)
        elif node.op_type not in TENSORRT_OPS:
            unsupported.setdefault(node.op_type, []).append(node.name)
        for index, what in CONSTANT_INPUTS.get(node.op_type, {}).items():
            if len(node.input) > index and node.input[index] and node.input[index] not in constants:
                problems.append(
                    f"{node.op_type} node {node.name!r}: `{what}` must be an initializer for TensorRT"
                )
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "ScatterND" and attrs.get("reduction", b"none") not in (b"none", "none"):
            problems.append(f"ScatterND node {node.name!r}: TensorRT supports reduction 'none' only")
        if node.op_type == "Attention" and (
            any(node.input[4:]) or len([o for o in node.output if o]) > 1 or attrs.get("softcap", 0.0)
        ):
            problems.append(
                f"Attention node {node.name!r} uses past/present KV, qk output or softcap: TensorRT imports "
                "Attention with Q, K, V and attn_mask only"
            )
    for op, nodes in sorted(unsupported.items()):
        problems.append(
            f"op {op} ({len(nodes)} node{'s' * (len(nodes) > 1)}, e.g. {nodes[0]!r}) is not on TensorRT "
            "10.15's ONNX operator list"
        )
    return problems


def _shape_problems(model: onnx.ModelProto) -> list[str]:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    graph = inferred.graph
    known = {v.name: v for v in [*graph.input, *graph.output, *graph.value_info]}
    problems = []
    inputs = {v.name for v in graph.input}
    outputs = {v.name for v in graph.output}
    for node in graph.node:
        for name in node.output:
            if name and name not in known:
                problems.append(f"the shape of {name!r} ({node.op_type} {node.name!r}) cannot be inferred")
    for name, value in known.items():
        _, shape, dtype = describe(value)
        if any(not isinstance(d, int) or d <= 0 for d in shape):
            kind = "input" if name in inputs else "output" if name in outputs else "tensor"
            problems.append(f"{kind} {name!r} has a dynamic or unknown shape {list(shape)}")
        if dtype == "uint8" and name not in inputs and name not in outputs:
            problems.append(f"tensor {name!r} is uint8 inside the graph; TensorRT takes uint8 as I/O only")
    return problems


def check_model(model: onnx.ModelProto, path: str | Path | None = None) -> list[str]:
    """Problems of one graph for TensorRT, as readable lines (empty when it is ready).

    `path` lets onnx.checker read external weights; without it the graph is checked as given.
    """
    problems = []
    try:
        onnx.checker.check_model(str(path) if path is not None else model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        problems.append(f"onnx.checker: {str(err).strip().splitlines()[0]}")
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if opsets.get("ai.onnx", 0) not in TENSORRT_OPSETS:
        problems.append(
            f"opset {opsets.get('ai.onnx')} is outside {TENSORRT_OPSETS.start}-{TENSORRT_OPSETS.stop - 1}, "
            "the opsets TensorRT 10.15 imports"
        )
    return problems + _node_problems(model) + _shape_problems(model)


@dataclass
class GraphCheck:
    name: str
    nodes: int
    op_types: Counter[str]
    problems: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    directory: Path
    manifest: Manifest
    graphs: list[GraphCheck]
    tensorrt: str  # what the TensorRT parse found, or why it was skipped

    @property
    def ok(self) -> bool:
        return not any(g.problems for g in self.graphs) and not self.tensorrt.startswith("FAILED")

    def format(self) -> str:
        m = self.manifest
        lines = [
            f"{self.directory}: preset {m.preset}, {m.precision}, {m.slots} slot(s), frames "
            f"{m.frame_hw[0]}x{m.frame_hw[1]}, nfe {m.nfe}, opset {m.opset}",
            "  exported with " + ", ".join(f"{k} {v}" for k, v in m.tools.items()),
        ]
        for g in self.graphs:
            status = "ok" if not g.problems else f"{len(g.problems)} problem(s)"
            lines.append(f"  {g.name:<12} {status:<14} {g.nodes} nodes, ops: {', '.join(sorted(g.op_types))}")
            lines += [f"      - {p}" for p in g.problems]
        lines.append(f"  TensorRT parse: {self.tensorrt}")
        verdict = "ready for TensorRT 10.15+" if self.ok else "NOT ready: fix the problems above"
        lines.append(f"{len(self.graphs)} graphs {verdict}")
        return "\n".join(lines)


def state_pair_problems(manifest: Manifest, model: onnx.ModelProto, name: str) -> list[str]:
    """Each state output must match its state input in shape and dtype (the runtime swaps their buffers)."""
    values = {v.name: describe(v)[1:] for v in [*model.graph.input, *model.graph.output]}
    problems = []
    for output, state_input in manifest.graph(name).state.items():
        if output in values and state_input in values and values[output] != values[state_input]:
            problems.append(
                f"state output {output!r} {values[output]} differs from its input {state_input!r} "
                f"{values[state_input]}"
            )
    return problems


def tensorrt_parse(paths: list[Path]) -> str:
    """Parse each graph with TensorRT's ONNX parser as a strongly typed network, where TensorRT is installed."""
    try:
        from polygraphy.backend.trt import NetworkFromOnnxPath
    except ImportError:
        return "skipped (polygraphy is not installed)"
    try:
        import tensorrt  # noqa: F401  (polygraphy imports it lazily; fail here with a clear reason)
    except ImportError:
        return "skipped (tensorrt is not installed)"
    failed = []
    for path in paths:
        try:
            NetworkFromOnnxPath(str(path), strongly_typed=True)()
        except Exception as err:  # polygraphy raises its own error types for parser failures
            failed.append(f"{path.name}: {str(err).strip().splitlines()[-1]}")
    return f"FAILED {'; '.join(failed)}" if failed else f"ok ({len(paths)} graphs)"


def _external_files(model: onnx.ModelProto) -> set[str]:
    return {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}


@contextmanager
def _unlinked(directory: Path, names: list[str]) -> Iterator[Path]:
    """A folder holding `names` as regular files: `directory` itself unless one is a symlink (a cache snapshot's
    layout, which load_manifest admits). onnx.checker refuses external data that is a symlink or has several hard
    links, so such a graph is checked on copies in a temporary folder (the hashes already proved them whole)."""
    if not any((directory / name).is_symlink() for name in names):
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="soundreactor-check-") as folder:
        for name in names:
            shutil.copyfile(directory / name, Path(folder) / name)
        yield Path(folder)


def unhashed_external_data(model: onnx.ModelProto, manifest: Manifest) -> list[str]:
    """Weight files a graph reads that the manifest does not hash: every file loaded must be checked. (ONNX
    Runtime itself refuses external data outside the graph's folder.)"""
    locations = _external_files(model)
    return [
        f"manifest: external data file {name!r} is not listed (with its sha256) in files"
        for name in sorted(locations - set(manifest.files))
    ]


def check_export_dir(directory: str | Path) -> CheckReport:
    directory = Path(directory)
    manifest = load_manifest(directory)
    results = []
    for spec in manifest.graphs:
        path = directory / spec.file
        model = onnx.load(str(path), load_external_data=False)
        with _unlinked(directory, [spec.file, *_external_files(model)]) as plain:
            problems = check_model(model, plain / spec.file)
        io = io_mismatches(
            spec, list(map(describe, model.graph.input)), list(map(describe, model.graph.output))
        )
        problems += [f"manifest: {p}" for p in io] + state_pair_problems(manifest, model, spec.name)
        problems += unhashed_external_data(model, manifest)
        results.append(
            GraphCheck(
                spec.name, len(model.graph.node), Counter(n.op_type for n in model.graph.node), problems
            )
        )
    tensorrt = tensorrt_parse([directory / g.file for g in manifest.graphs])
    return CheckReport(directory, manifest, results, tensorrt)
