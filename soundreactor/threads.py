"""How many CPU threads a model runs on: `--threads`, else OMP_NUM_THREADS, else a count fitted to the model and the
machine. torch's own default (one thread per core) is wrong for streaming: a frame is hundreds of small ops, and
each parallel op waits at a barrier for every thread. On 2 cores next to other work, a frame of the default model
took 1.3 s on torch's default threads instead of 15 ms on one."""

from __future__ import annotations

import argparse
import math
import os

# Below this many parameters a frame's ops are too small to split (the small preset, 1.4 M: 47 ms a frame on 2
# threads against 22 ms on one); the paper preset (520 M) gains from every idle core (654 -> 497 ms on 2).
SMALL_MODEL = 50_000_000


def available_cores() -> int:
    """The cores this process may run on (taskset, a container's cpuset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS, Windows)
        return os.cpu_count() or 1


def _environment_threads() -> int | None:
    """OMP_NUM_THREADS as OpenMP reads it (the first level of a nested list), or None when unset or unreadable."""
    text = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def pick_threads(parameters: int, requested: int | None = None) -> int:
    """The thread count for a model of `parameters` weights.

    `requested` (`--threads`) wins, and may not exceed the available cores. Then OMP_NUM_THREADS, capped at the
    available cores. Otherwise a small model gets one thread, and a large one the available cores that the
    1-minute load average says other processes leave idle (at least one)."""
    cores = available_cores()
    if requested is not None:
        if not 1 <= requested <= cores:
            raise ValueError(
                f"--threads {requested}: this process may run on {cores} core(s); give 1 to {cores}"
            )
        return requested
    environment = _environment_threads()
    if environment is not None:
        return min(environment, cores)
    if parameters < SMALL_MODEL:
        return 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, math.floor(cores - busy + 0.5)))  # the idle cores, rounded


def set_torch_threads(parameters: int, requested: int | None = None) -> None:
    """Set torch's intra-op pool for a model of `parameters` weights (`pick_threads`)."""
    import torch  # here, so that ONNX Runtime-only runs never load torch

    torch.set_num_threads(pick_threads(parameters, requested))


def _thread_count(text: str) -> int:
    """`--threads` checked when parsed, before a command does any work."""
    cores = available_cores()
    if not text.isdigit() or not 1 <= int(text) <= cores:
        raise argparse.ArgumentTypeError(
            f"{text!r}: this process may run on {cores} core(s); give 1 to {cores}"
        )
    return int(text)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_thread_count,
        help="CPU threads for the model (default: OMP_NUM_THREADS if set, else 1 for a small model and the idle "
        "cores for a large one; README, Threads)",
    )
