"""Which device buffer each engine tensor binds to, per frame parity, and how engine I/O maps onto the manifest.

Values pass by name as in the ONNX Runtime backend (an output feeds the later graphs' input of the same name; a
state output replaces its state input from then on). The plan gives every value a caller-owned buffer:

- host inputs (frames, frame_index, active, guidance, noise) and host outputs (audio): one buffer each, copied
  from / to pinned host memory inside the frame's CUDA graph;
- values passed between engines (h_audio, vision_token, h_vision): one buffer each;
- state TensorRT updates in place (the engine aliases k_cache_out to k_cache): one buffer, never copied;
- other state (prev_latent/latent, prev_grid/grid, vae_state_k/_out): two buffers. A writer reads one and writes
  the other, so the roles swap every frame without a copy. A captured CUDA graph holds fixed addresses, so the
  backend captures one graph per parity: `bindings[parity][graph][tensor] -> buffer`.

Plain Python: engines are described through the attributes of TensorRT's ICudaEngine only, so tests use fakes.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from soundreactor.engine.cache import EngineCacheError, rebuild_hint
from soundreactor.export.manifest import GraphSpec, Manifest, TensorSpec, io_mismatches

ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "uint8": 1,
    "bool": 1,
    "int64": 8,
    "int32": 4,
    "int8": 1,
}
TRT_DTYPES = {  # tensorrt.DataType member names -> the manifest's numpy spelling
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "UINT8": "uint8",
    "BOOL": "bool",
    "INT64": "int64",
    "INT32": "int32",
    "INT8": "int8",
}

TensorIO = tuple[str, tuple[int, ...], str]  # (name, shape, dtype)


@dataclass(frozen=True)
class Buffer:
    name: str
    shape: tuple[int, ...]
    dtype: str
    slot_axis: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    def slot_span(self, slot: int) -> tuple[int, int, int, int]:
        """Where stream slot `slot` lies: (offset, pitch, width, height) in bytes, i.e. `height` rows of `width`
        bytes starting at `offset`, `pitch` apart (the arguments of cudaMemset2D)."""
        width = math.prod(self.shape[self.slot_axis + 1 :]) * ITEMSIZE[self.dtype]
        return (
            slot * width,
            self.shape[self.slot_axis] * width,
            width,
            math.prod(self.shape[: self.slot_axis]),
        )


@dataclass(frozen=True)
class BindingPlan:
    buffers: dict[str, Buffer]
    host_inputs: tuple[str, ...]  # written by the host every frame
    host_outputs: tuple[str, ...]  # read back every frame
    state_buffers: tuple[str, ...]  # every buffer holding stream state; reset(slot) zeroes the slot in each
    bindings: tuple[dict[str, dict[str, str]], ...]  # [parity][graph][tensor name] -> buffer name

    def ping_pong(self) -> dict[str, tuple[str, str]]:
        """State input -> (its buffer at parity 0, at parity 1), for state that alternates between two buffers."""
        pairs = {}
        for graph, bound in self.bindings[0].items():
            for name, buffer in bound.items():
                other = self.bindings[1][graph][name]
                if buffer != other and buffer in self.state_buffers:
                    pairs[buffer.split("@")[0]] = (buffer, other)
        return pairs


def plan_bindings(manifest: Manifest, aliases: dict[str, dict[str, str]]) -> BindingPlan:
    """The buffers and per-parity bindings of a frame; `aliases[graph]` maps the outputs an engine writes in
    place to their inputs (TensorRT's get_aliased_input_tensor), which must be state pairs of that graph."""
    graphs = manifest.graphs
    for graph in graphs:
        for output, source in aliases.get(graph.name, {}).items():
            if graph.state.get(output) != source:
                raise ValueError(
                    f"{graph.name}: the engine writes {output!r} in place of {source!r}, but the manifest pairs "
                    f"{output!r} with {graph.state.get(output)!r}; rebuild the engines from this export"
                )
    specs: dict[str, TensorSpec] = {}
    for graph in graphs:
        for t in (*graph.inputs, *graph.outputs):
            specs.setdefault(t.name, t)
    # non-aliased writes per state and frame; their parity decides where each frame starts
    writes = Counter(
        state
        for g in graphs
        for output, state in g.state.items()
        if aliases.get(g.name, {}).get(output) != state
    )
    state_inputs = list(dict.fromkeys(s for g in graphs for s in g.state.values()))
    buffers: dict[str, Buffer] = {}

    def buffer(name: str, spec: TensorSpec) -> str:
        known = buffers.setdefault(name, Buffer(name, spec.shape, spec.dtype, spec.slot_axis))
        if (known.shape, known.dtype) != (spec.shape, spec.dtype):
            raise ValueError(
                f"{spec.name!r} is {list(spec.shape)} {spec.dtype} here but {list(known.shape)} {known.dtype} "
                f"where buffer {name!r} was first used; the manifest's graphs disagree, re-export"
            )
        return name

    bindings = []
    for parity in (0, 1):
        current = {
            s: buffer(f"{s}@{parity * writes[s] % 2}" if writes[s] else s, specs[s]) for s in state_inputs
        }
        per_graph = {}
        for graph in graphs:
            bound = {}
            for t in graph.inputs:
                if t.name not in current:
                    current[t.name] = buffer(t.name, t)  # a host input
                bound[t.name] = buffer(current[t.name], t)  # checks the value has the shape this graph reads
            for t in graph.outputs:
                state = graph.state.get(t.name)
                if state is None:
                    target = buffer(t.name, t)
                elif aliases.get(graph.name, {}).get(t.name) == state:
                    target = current[state]
                else:
                    base, _, index = current[state].partition("@")
                    target = buffer(f"{base}@{1 - int(index)}", specs[state])
                    current[state] = target
                bound[t.name] = current[t.name] = target
            per_graph[graph.name] = bound
        bindings.append(per_graph)

    produced = {t.name for g in graphs for t in g.outputs}
    consumed = {t.name for g in graphs for t in g.inputs}
    host_inputs = [
        t.name for g in graphs for t in g.inputs if t.name not in produced and t.name not in state_inputs
    ]
    host_outputs = [
        t.name for g in graphs for t in g.outputs if t.name not in g.state and t.name not in consumed
    ]
    state_buffers = [name for name in buffers if name.split("@")[0] in state_inputs]
    return BindingPlan(
        buffers,
        tuple(dict.fromkeys(host_inputs)),
        tuple(host_outputs),
        tuple(state_buffers),
        tuple(bindings),
    )


def fold_cache_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """[L, B, Hkv, W, D] -> [L*B, Hkv, W, D]: the layout IKVCacheUpdateLayer takes, the same bytes."""
    return (shape[0] * shape[1], *shape[2:])


def engine_graph_spec(graph: GraphSpec, aliases: dict[str, str]) -> GraphSpec:
    """The I/O an engine of `graph` has: the caches it updates in place are folded (engine/kv_scatter.py)."""
    folded = set(aliases) | set(aliases.values())

    def fold(t: TensorSpec) -> TensorSpec:
        return replace(t, shape=fold_cache_shape(t.shape)) if t.name in folded else t

    return replace(graph, inputs=tuple(map(fold, graph.inputs)), outputs=tuple(map(fold, graph.outputs)))


def engine_io(engine: Any) -> tuple[list[TensorIO], list[TensorIO], dict[str, str]]:
    """(inputs, outputs, in-place aliases output -> input) of a deserialized ICudaEngine."""
    inputs, outputs, aliases = [], [], {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        dtype = engine.get_tensor_dtype(name).name
        described = (name, tuple(engine.get_tensor_shape(name)), TRT_DTYPES.get(dtype, dtype))
        if engine.get_tensor_mode(name).name == "INPUT":
            inputs.append(described)
        else:
            outputs.append(described)
            source = engine.get_aliased_input_tensor(name)
            if source:
                aliases[name] = source
    return inputs, outputs, aliases


def check_engine_io(graph: GraphSpec, engine: Any, directory: str) -> dict[str, str]:
    """The engine's in-place aliases, after checking its I/O against the manifest entry of `graph`."""
    inputs, outputs, aliases = engine_io(engine)
    problems = io_mismatches(engine_graph_spec(graph, aliases), inputs, outputs)
    problems += [
        f"output {output!r} is written in place of {source!r}, not of its state input {graph.state.get(output)!r}"
        for output, source in aliases.items()
        if graph.state.get(output) != source
    ]
    if problems:
        raise EngineCacheError(
            f"the {graph.name} engine in {directory} does not match the manifest: {'; '.join(problems)}; "
            f"{rebuild_hint(directory)}"
        )
    return aliases
