"""Q/DQ graphs for TensorRT's explicit quantization, written by ONNX Runtime's `QDQQuantizer`.

Where Q/DQ goes: on the inputs of MatMul, Gemm, Conv and ConvTranspose only (the weight-bearing products, as
TensorRT places them). Weights are stored quantized with per-output-channel scales (MatMul [K, N]: axis 1, Gemm
with transB: axis 0, Conv: axis 0, ConvTranspose [C_in, C_out, k]: axis 1); activations get one scale per tensor;
every zero point is 0 (symmetric); biases stay float (TensorRT fuses float bias). Norms, softmax, attention
scores, RoPE, SnakeBeta, the cache writes and the frame resize + normalization (`vision.preprocess`, 0..255
pixels) stay in the graph's precision.

Two small passes around the quantizer keep the graphs loadable by ONNX Runtime's CPU provider with its default
optimizations (which `OrtStreams` uses) and no less accurate:
- `flatten_matmuls` (before calibration): a MatMul over [B, T, K] activations becomes Reshape [B*T, K] ->
  MatMul -> Reshape. ORT's MatMul+Add fusion otherwise inserts its own Reshape between DQ and MatMul, and its
  Q/DQ propagation then emits QuantizeLinear nodes whose output_dtype no longer matches their zero point once
  the int8->uint8 rewrite runs (onnxruntime issue #25526): "output_dtype INT8 does not match y_zero_point".
- `keep_float_consumers` (after): a quantized tensor that also feeds float ops (e.g. the VAE's padded conv input
  whose tail becomes the next conv state) is read by those ops unquantized; only the products see Q/DQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference
from onnxruntime.quantization import CalibrationMethod, QDQQuantizer, QuantType, TensorsData
from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# module paths (the exporter's `namespace` node metadata) whose products stay float
FLOAT_MODULES = ("vision.preprocess",)


@dataclass(frozen=True)
class Scheme:
    name: str
    quant_type: QuantType
    method: CalibrationMethod


SCHEMES = {
    # scale = max |x| / 127 (activations: over the calibration frames; weights: per output channel)
    "int8": Scheme("int8", QuantType.QInt8, CalibrationMethod.MinMax),
    # ORT's float8 recipe, the only one it implements: scale = std(x) / std(all E4M3 values), matching the data's
    # spread to the format's; values beyond ~4.5 standard deviations (448 * scale) saturate.
    "fp8": Scheme("fp8", QuantType.QFLOAT8E4M3FN, CalibrationMethod.Distribution),
}


def scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; choose one of {sorted(SCHEMES)}")
    return SCHEMES[name]


def stays_float(node: onnx.NodeProto) -> bool:
    namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    return any(f"/{module}:" in namespace for module in FLOAT_MODULES)


def float_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the product nodes quantization must leave alone."""
    return [n.name for n in proto.graph.node if n.op_type in QUANTIZED_OPS and stays_float(n)]


def quantized_products(proto: onnx.ModelProto) -> list[str]:
    """Names of the product nodes that read a dequantized activation."""
    dequantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in proto.graph.node if n.op_type in QUANTIZED_OPS and n.input[0] in dequantized]


def flatten_matmuls(proto: onnx.ModelProto) -> None:
    """In place: MatMuls of rank > 2 activations by 2-D weights run on [rows, K] between two Reshapes.

    `proto` needs no weight data (initializer dims suffice).
    """
    inferred = shape_inference.infer_shapes(proto)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
    weights = {t.name: t for t in proto.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in proto.graph.node:
        is_linear = node.op_type == "MatMul" and len(getattr(weights.get(node.input[1]), "dims", ())) == 2
        activation = node.input[0]
        shape = shapes.get(activation, [])
        static = len(shape) > 2 and all(d > 0 for d in (*shape, *shapes.get(node.output[0], [0])))
        if not is_linear or not static or stays_float(node):
            nodes.append(node)
            continue
        in_shape, out_shape = shapes[activation], shapes[node.output[0]]
        flat_shape = numpy_helper.from_array(
            np.array([int(np.prod(in_shape[:-1])), in_shape[-1]], np.int64), f"{node.name}_flat_shape"
        )
        back_shape = numpy_helper.from_array(np.array(out_shape, np.int64), f"{node.name}_out_shape")
        proto.graph.initializer.extend([flat_shape, back_shape])
        flat_in, flat_out, output = f"{activation}_{node.name}_2d", f"{node.output[0]}_2d", node.output[0]
        before = helper.make_node("Reshape", [activation, flat_shape.name], [flat_in], f"{node.name}_flatten")
        after = helper.make_node("Reshape", [flat_out, back_shape.name], [output], f"{node.name}_unflatten")
        node.input[0], node.output[0] = flat_in, flat_out
        for new in (before, after):
            new.metadata_props.extend(node.metadata_props)
        nodes += [before, node, after]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def prepare_graph(source: Path, target: Path) -> None:
    """Write `source` with its MatMuls flattened to `target` (weights beside it), ready for calibration."""
    proto = onnx.load(source, load_external_data=False)
    flatten_matmuls(proto)
    onnx.external_data_helper.load_external_data_for_model(proto, str(source.parent))
    onnx.save(
        proto, target, save_as_external_data=True, location=f"{target.stem}.weights", size_threshold=1024
    )


def keep_float_consumers(proto: onnx.ModelProto) -> None:
    """In place: ops other than the quantized products read a quantized activation's float original."""
    originals = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    dequantized = {
        n.output[0]: originals[n.input[0]]
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in originals
    }
    for node in proto.graph.node:
        if node.op_type in QUANTIZED_OPS and not stays_float(node):
            continue
        for k, name in enumerate(node.input):
            if name in dequantized:
                node.input[k] = dequantized[name]


def quantize_graph(prepared: Path, ranges: TensorsData, quant: Scheme) -> onnx.ModelProto:
    """The Q/DQ version of the prepared graph at `prepared`, with activation scales from `ranges`."""
    model = load_model_with_shape_infer(prepared)
    quantizer = QDQQuantizer(
        model,
        per_channel=True,
        reduce_range=False,  # full 8-bit range (7-bit weights are for old x86 integer kernels)
        weight_qType=quant.quant_type,
        activation_qType=quant.quant_type,
        tensors_range=ranges,
        nodes_to_quantize=[],
        nodes_to_exclude=float_nodes(model),
        op_types_to_quantize=list(QUANTIZED_OPS),
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,  # TensorRT adds float biases after the product
            "MatMulConstBOnly": True,  # only products by weights (attention is Einsum/Attention, left float)
            "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),  # Q/DQ on inputs, as TensorRT wants
        },
    )
    quantizer.quantize_model()
    quantizer.model.topological_sort()  # the quantizer appends its Q/DQ nodes at the end
    proto = quantizer.model.model
    keep_float_consumers(proto)
    return proto
