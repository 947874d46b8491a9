"""Shared bits of the perf suites: machine description, percentiles, and result files (JSON + markdown)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def load() -> dict[str, object]:
    """What else the machine was doing: the 1/5/15-minute load averages (runnable processes; on N cores, N means
    busy) and the cores this process may use (taskset). Record it before and after timing."""
    from soundreactor.threads import available_cores

    return {"load_average": [round(x, 2) for x in os.getloadavg()], "available_cores": available_cores()}


def threads_line(torch_threads: object, info: dict[str, object]) -> str:
    """One line for the results and the console: thread settings and load."""
    return (
        f"threads: torch {torch_threads} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
        f"{info['available_cores']} core(s) available of {os.cpu_count()}, load average {info['load_average']}"
    )


def machine() -> dict[str, object]:
    """What the numbers were measured on: CPU model and cores, and the GPU when torch sees one."""
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
    info: dict[str, object] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        **load(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def percentiles(ms: list[float] | np.ndarray) -> dict[str, float]:
    values = np.asarray(ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(values.mean()),
        "n": len(values),
    }


def save(name: str, results: dict[str, object], markdown: str) -> Path:
    """Write perf/results/<name>.json and <name>.md; returns the markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    path = RESULTS / f"{name}.md"
    path.write_text(markdown)
    return path
