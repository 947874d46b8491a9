"""Rewrite the exported KV-cache writes as ONNX TensorScatter, which TensorRT runs in place.

Choice: TensorRT's own KV-cache update rather than our Triton decode-attention kernel as an AOT plugin. The
export already computes the step's attention in plain ONNX ops over the read-only cache (`window_attention`)
and writes the new rows with one ScatterND per cache; only that write needs changing, and TensorScatter is a
standard op (opset 24) that TensorRT 10.15+ imports as IKVCacheUpdateLayer, whose output shares the cache
input's memory. No plugin library to compile per GPU architecture and ship with the engines, and ONNX Runtime
runs the rewritten graph, so the rewrite is checked numerically on a CPU. Either way no frame copies the cache:
the ScatterND's ONNX semantics (a new output tensor) would.

The ar_* graphs write with ScatterND(data=k_cache [L, B, Hkv, W, D], indices [L, B, Hkv, 4] = (layer, slot,
head, ring row), updates [L, B, Hkv, D]) -> k_cache_out (export/graphs.py `write_rows`). TensorRT imports
TensorScatter for 4D caches with the sequence at axis -2, and its layer has a linear mode only, so per cache:

    k_cache      graph input, now [L*B, Hkv, W, D] (the same bytes) -> Reshape [L, B, Hkv, W, D] -> old readers
    ring row     indices[l, b, 0, 3] = pos mod W; a linear write of one row there is the circular write
    k_cache_out  TensorScatter(k_cache, updates -> [L*B, Hkv, 1, D], ring row -> [L*B], axis=-2, "linear")

The old readers (every layer's attention and the gather that keeps inactive slots' rows) read the input cache.
In place that is still correct: attention masks the step's own ring row, so it reads the same values before
or after the write, and the gather feeds the update, so it runs first.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

TENSOR_SCATTER_OPSET = 24


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of every value shape inference can pin down (external weights are not needed for that)."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def set_shape(value: onnx.ValueInfoProto, shape: tuple[int, ...]) -> None:
    dims = value.type.tensor_type.shape.dim
    del dims[:]
    for size in shape:
        dims.add().dim_value = size


def cache_writes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The ScatterND nodes that write a rank-5 graph input straight into a graph output."""
    inputs = {v.name: v for v in model.graph.input}
    outputs = {v.name for v in model.graph.output}
    return [
        node
        for node in model.graph.node
        if node.op_type == "ScatterND"
        and node.output[0] in outputs
        and node.input[0] in inputs
        and len(inputs[node.input[0]].type.tensor_type.shape.dim) == 5
    ]


def scatter_nodes(
    cache: str, indices: str, updates: str, out: str, folded: tuple[int, ...]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes (and their constants) writing `updates` [L, B, Hkv, D] into the folded cache [L*B, Hkv, W, D] at
    the ring row `indices[l, b, 0, 3]`, as TensorScatter."""
    rows, heads, _, dim = folded
    prefix = f"{out}/tensor_scatter"
    constants = {
        "ring_axis": np.array(3, np.int64),
        "first_head": np.array(0, np.int64),
        "index_shape": np.array([rows], np.int64),
        "update_shape": np.array([rows, heads, 1, dim], np.int64),
    }
    name = {key: f"{prefix}/{key}" for key in [*constants, "ring_rows", "ring_row", "write_index", "update"]}
    nodes = [
        helper.make_node("Gather", [indices, name["ring_axis"]], [name["ring_rows"]], axis=-1),  # [L, B, Hkv]
        helper.make_node(
            "Gather", [name["ring_rows"], name["first_head"]], [name["ring_row"]], axis=2
        ),  # [L, B]
        helper.make_node("Reshape", [name["ring_row"], name["index_shape"]], [name["write_index"]]),
        helper.make_node("Reshape", [updates, name["update_shape"]], [name["update"]]),
        helper.make_node(
            "TensorScatter", [cache, name["update"], name["write_index"]], [out], axis=-2, mode="linear"
        ),
    ]
    return nodes, [numpy_helper.from_array(value, name[key]) for key, value in constants.items()]


def use_tensor_scatter(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of `model` with each cache write as an in-place TensorScatter, and the pairs {output: input} it
    updates in place (folded to [L*B, Hkv, W, D]). A graph without cache writes comes back unchanged."""
    if not cache_writes(model):
        return model, {}
    model = copy.deepcopy(model)
    shapes = static_shapes(model)
    graph = model.graph
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    unfold: list[onnx.NodeProto] = []  # Reshape of each folded cache input for its old readers, first of all
    aliases = {}
    for node in cache_writes(model):
        cache, indices, updates = node.input
        out = node.output[0]
        layers, slots, heads, window, dim = shape = shapes[cache]
        expected = {indices: (layers, slots, heads, 4), updates: (layers, slots, heads, dim)}
        reduction = next((a.s for a in node.attribute if a.name == "reduction"), b"none")
        if reduction != b"none" or any(shapes.get(name) != want for name, want in expected.items()):
            raise ValueError(
                f"ScatterND {node.name!r} writing {out!r} is not one row per (layer, slot, head) as "
                f"export/graphs.py write_rows emits (indices {shapes.get(indices)}, updates {shapes.get(updates)}, "
                f"reduction {reduction.decode()}); re-export with this version of soundreactor"
            )
        folded = (layers * slots, heads, window, dim)
        unfolded = f"{cache}/unfolded"
        for reader in graph.node:
            reader.input[:] = [unfolded if name == cache else name for name in reader.input]
        graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), f"{unfolded}/shape"))
        unfold.append(helper.make_node("Reshape", [cache, f"{unfolded}/shape"], [unfolded]))
        nodes, constants = scatter_nodes(cache, indices, updates, out, folded)
        graph.initializer.extend(constants)
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, added in enumerate(nodes):
            graph.node.insert(position + offset, added)
        set_shape(inputs[cache], folded)
        set_shape(outputs[out], folded)
        aliases[out] = cache
    for offset, reshape in enumerate(unfold):
        graph.node.insert(offset, reshape)
    default = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    default.version = max(default.version, TENSOR_SCATTER_OPSET)
    return model, aliases
