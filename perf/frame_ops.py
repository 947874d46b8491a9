"""Device operations per frame of the CUDA-graph backend, counted on CPU: where the frame's kernel launches go.

    python perf/frame_ops.py [--preset paper] [--dtype bf16] [--nfe 1 2 4] [--name frame_ops]

Runs the functions `GraphStreams` captures (the audio step, the frame) on the meta device, which computes shapes
and no values, and counts the aten operations that reach it, stage by stage. Views and allocations are not
counted (no kernel); `F.rms_norm` and `F.scaled_dot_product_attention` count as one each, as on CUDA, where each
is one fused kernel. With `--kernels triton` the modules the Triton kernels replace (cached attention, the VAE's
Snake activations) are stand-ins that count the kernels' launches. A count, not a timing: inside one CUDA graph a small kernel
still costs a few microseconds, so at batch 1 the count times that floor is a lower bound on the frame's time.
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from common import machine, save
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from soundreactor.model.soundreactor import init_model
from soundreactor.model.vae import FoldedSnakeBeta
from soundreactor.runtime.cuda_graph_backend import FRAME_STAGES, GraphStreams

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FUSED = {F.rms_norm: "rms_norm", F.scaled_dot_product_attention: "scaled_dot_product_attention"}
NO_KERNEL = {  # allocations, and a view that its schema does not mark as one
    "aten.empty.memory_format",
    "aten.empty_like.default",
    "aten.empty_strided.default",
    "aten._unsafe_view.default",
}
ATTENTION_LAUNCHES = 2  # decode_attention: the window-slice kernel and the merge kernel
# the stage that starts at each mark (GraphStreams marks the end of each stage)
NEXT_STAGE = dict(zip(("frame_start", *FRAME_STAGES), (*FRAME_STAGES, "commit"), strict=True))


class OpCounter(TorchDispatchMode):
    """Counts, per stage, the device operations that would launch kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = "setup"
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.inside_fused = 0

    def add(self, name: str, launches: int = 1) -> None:
        self.counts[self.stage][name] += launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not (self.inside_fused or func.is_view or name in NO_KERNEL):
            self.add(name)
        return func(*args, **(kwargs or {}))


class FusedAsOne(TorchFunctionMode):
    """Counts the functions that CUDA runs as one kernel once, and hides the ops they decompose into here."""

    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in FUSED:
            return func(*args, **(kwargs or {}))
        self.counter.add(FUSED[func])
        self.counter.inside_fused += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.inside_fused -= 1


def use_stand_ins(streams: GraphStreams, counter: OpCounter) -> None:
    """The Triton kernels' footprint where GraphStreams would route to them: output shapes and launches."""

    def attention(q, k_self, v_self, k_cache, v_cache, pos, cos, sin):
        counter.add("triton decode_attention", ATTENTION_LAUNCHES)  # it also writes the cache
        return torch.empty_like(q)

    def snake(x, alpha_exp, inv_beta):
        counter.add("triton snake_beta")
        return torch.empty_like(x)

    streams.model.transformer.attention_fn = attention
    for module in streams.model.vae.modules():
        if isinstance(module, FoldedSnakeBeta):
            module.fused = snake


@contextmanager
def counting(streams: GraphStreams, counter: OpCounter) -> Iterator[None]:
    def mark(name: str) -> None:
        counter.stage = NEXT_STAGE.get(name, counter.stage)

    streams._mark = mark
    with torch.no_grad(), counter, FusedAsOne(counter):
        yield


def count_frame(model, nfe: int, dtype: torch.dtype, kernels: str) -> dict[str, object]:
    model.configure_sampling(nfe=nfe, guidance=3.0)
    streams = GraphStreams(model, 1, 0, "meta", dtype, pipelined=True, use_triton=False)
    counter = OpCounter()
    if kernels == "triton":
        use_stand_ins(streams, counter)
    with counting(streams, counter):
        counter.stage = "audio_step"
        streams._prepare()
        counter.stage = "frame_start"
        streams._frame()
    per_stage = {stage: sum(ops.values()) for stage, ops in counter.counts.items()}
    total = collections.Counter()
    for ops in counter.counts.values():
        total.update(ops)
    return {
        "nfe": nfe,
        "kernels": kernels,
        "per_stage": per_stage,
        "total": sum(per_stage.values()),
        "ops": dict(total.most_common()),
    }


def markdown(results: dict[str, object]) -> str:
    rows = results["counts"]
    stages = ["audio_step", *FRAME_STAGES, "commit"]
    lines = [
        f"# Device operations per frame ({results['preset']} preset, {results['dtype']}, one stream, pipelined)",
        "",
        "Counted on CPU by `perf/frame_ops.py`: the captured functions run on the meta device and every aten "
        "operation that would launch a kernel is counted (views and allocations excluded; `F.rms_norm` and "
        "scaled-dot-product attention count once, as CUDA runs each as one kernel). A count, not a timing. "
        f"torch {results['machine']['torch']}.",
        "",
        "| NFE | kernels | " + " | ".join(stages) + " | frame (excl. audio step) | total |",
        "|---|---|" + "---|" * (len(stages) + 2),
    ]
    for row in rows:
        per_stage = row["per_stage"]
        cells = " | ".join(str(per_stage.get(stage, 0)) for stage in stages)
        frame = row["total"] - per_stage.get("audio_step", 0)
        lines.append(f"| {row['nfe']} | {row['kernels']} | {cells} | {frame} | {row['total']} |")
    lines += ["", "Most frequent operations:", ""]
    for row in rows:
        top = list(row["ops"].items())[:12]
        ops = ", ".join(f"{name.removeprefix('aten.')} {n}" for name, n in top)
        lines.append(f"- NFE {row['nfe']}, {row['kernels']} kernels: {ops}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--kernels", nargs="+", choices=("torch", "triton"), default=["torch", "triton"])
    parser.add_argument("--name", default="frame_ops", help="results file stem under perf/results/")
    args = parser.parse_args()
    started = time.perf_counter()
    model, _ = init_model(args.preset, seed=0, input_hw=(480, 854))
    counts = []
    for kernels in args.kernels:
        for nfe in args.nfe:
            counts.append(count_frame(model, nfe, DTYPES[args.dtype], kernels))
            row = counts[-1]
            print(f"NFE {nfe}, {kernels} kernels: {row['total']} ops {row['per_stage']}", flush=True)
    results = {
        "machine": machine(),
        "preset": args.preset,
        "dtype": args.dtype,
        "counts": counts,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(save(args.name, results, markdown(results)).read_text())


if __name__ == "__main__":
    main()
