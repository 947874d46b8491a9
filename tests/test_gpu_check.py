"""perf/gpu_check.sh runs on a GPU machine in one short, prepared call: its plumbing is checked here with --dry-run
(every benchmark's CPU dry run, results archived for the device runner's OUT folder)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER_MAX_FILES = 8  # what the device runner brings back from OUT


def serving_available() -> bool:
    from importlib.util import find_spec

    from soundreactor.serving.server import ServerError, find_tritonserver

    try:
        find_tritonserver()
    except ServerError:
        return False
    return find_spec("tritonclient") is not None


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar")
def test_dry_run_writes_every_report_and_one_archive(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "GPU_CHECK_RESULTS": str(tmp_path / "results"), "OUT": str(out)}
    env |= {"PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        ["bash", "perf/gpu_check.sh", "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    summary = dict(re.findall(r"^(kernels|snake|serving|bench)\s+(\S+)$", run.stdout, re.MULTILINE))
    assert summary == {"kernels": "pass", "snake": "pass", "serving": "pass", "bench": "pass"}, run.stdout[
        -2000:
    ]
    returned = sorted(p.name for p in out.iterdir())
    assert "gpu_results.tgz" in returned and "gpu_check.log" in returned and len(returned) <= RUNNER_MAX_FILES
    with tarfile.open(out / "gpu_results.tgz") as archive:
        names = {Path(name).name for name in archive.getnames()}
    expected = {"bench_gpu_cpu-dry-run.json", "bench_kernels_dryrun.json", "bench_snake_dryrun.json"}
    if serving_available():  # else the serving step says it skipped
        expected.add("serving_dryrun.json")
    assert expected <= names and "streams_cpu-dry-run.png" in names
