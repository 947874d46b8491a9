"""Thread counts: `--threads`, then OMP_NUM_THREADS, then one for a small model and the idle cores for a large one;
never more than the cores the process may use."""

import os

import pytest
import torch

from soundreactor import threads
from soundreactor.cli import main
from soundreactor.config import preset
from soundreactor.demo_video import make_demo_video
from soundreactor.threads import SMALL_MODEL, pick_threads

SMALL = preset("small").parameter_estimate()
PAPER = preset("paper").parameter_estimate()


@pytest.fixture
def four_cores(monkeypatch):
    """A process allowed on 4 cores with a load average of 1.2, and no OMP_NUM_THREADS."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_the_presets_fall_on_either_side_of_the_small_model_bound():
    assert SMALL < SMALL_MODEL < PAPER


def test_a_small_model_runs_on_one_thread(four_cores):
    assert pick_threads(SMALL) == 1


def test_a_large_model_takes_the_cores_other_processes_leave_idle(four_cores, monkeypatch):
    assert pick_threads(PAPER) == 3  # 4 cores, load 1.2
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert pick_threads(PAPER) == 1  # a saturated machine: still one


def test_omp_num_threads_is_respected_up_to_the_available_cores(four_cores, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert pick_threads(SMALL) == 2 and pick_threads(PAPER) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "16,2")  # nested: the outer level
    assert pick_threads(PAPER) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # unreadable, as OpenMP ignores it
    assert pick_threads(SMALL) == 1


def test_requested_threads_win_within_the_available_cores(four_cores, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert pick_threads(SMALL, requested=4) == 4
    for wrong in (0, 5):
        with pytest.raises(ValueError, match=f"--threads {wrong}: this process may run on 4 core"):
            pick_threads(PAPER, requested=wrong)


def test_available_cores_follow_the_affinity_mask():
    assert threads.available_cores() == len(os.sched_getaffinity(0))


def test_run_sets_torch_threads(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    checkpoint = tmp_path / "tiny.safetensors"
    assert main(["init", "--preset", "tiny", "--out", str(checkpoint)]) == 0
    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.1, size=(32, 48))
    try:
        torch.set_num_threads(2)
        run = ["run", "--video", str(video), "--checkpoint", str(checkpoint), "--nfe", "1"]
        assert main([*run, "--out", str(tmp_path / "a.wav")]) == 0
        assert torch.get_num_threads() == 1  # the tiny preset: one thread
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", ["run", "evaluate", "demo"])
def test_a_thread_count_beyond_the_cores_is_refused_before_any_work(command, tmp_path, capsys):
    too_many = threads.available_cores() + 1
    argv = {
        "run": ["run", "--video", "clip.mp4", "--out", "a.wav"],
        "evaluate": ["evaluate", "--random", "--out", str(tmp_path / "e")],
        "demo": ["demo", "--out-dir", str(tmp_path / "d")],
    }[command]
    for wrong in ("0", str(too_many), "two"):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--threads", wrong])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"--threads: '{wrong}': this process may run on {too_many - 1} core(s)" in err
    assert list(tmp_path.iterdir()) == []
