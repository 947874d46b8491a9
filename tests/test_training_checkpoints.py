"""Training checkpoints are whole or absent, resume verifies them, and no non-finite step or weight is written."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from test_training import SMALL, one_thread  # noqa: F401 (the autouse fixture applies here too)

from soundreactor.checkpoint import CheckpointError, load_checkpoint
from soundreactor.model.soundreactor import init_model
from soundreactor.training import loop, stages
from soundreactor.training.train_config import TrainConfig


def config(steps: int, **options) -> TrainConfig:
    return TrainConfig("pretrain", steps=steps, **{**SMALL, **options})


def task(steps: int, figures=None, **options) -> loop.Task:
    """The tiny preset's pretraining; `figures` (an iterator of floats) stands for an evaluation of each
    checkpoint, selected on, so eval.jsonl and best.safetensors are written too."""
    cfg = config(steps, **options)
    torch.manual_seed(cfg.seed)
    made = stages.ar_task(init_model("tiny", seed=0)[0], cfg, torch.device("cpu"))
    if figures is not None:
        made.evaluate, made.select = (lambda module: {"f1": next(figures)}), "f1"
    return made


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs (not even `except Exception` handlers)."""


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[1]


def assert_same_weights(a: Path, b: Path) -> None:
    want, got = weights(a), weights(b)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0, msg=key)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """An uninterrupted 4-step run, checkpoints at 2 and 4, scored 0.5 then 0.4 (so best is step 2's)."""
    out = tmp_path_factory.mktemp("whole")
    loop.train(task(4, iter([0.5, 0.4])), config(4), out)
    return out


def test_run_directory_holds_one_sealed_checkpoint_and_its_published_files(whole: Path) -> None:
    assert [p.name for p in loop.checkpoints(whole)] == ["checkpoint-00000004"]
    sealed = whole / "checkpoint-00000004"
    assert loop.verify_checkpoint(sealed) == 4
    listed = json.loads((sealed / loop.MANIFEST).read_text())["files"]
    assert sorted(listed) == sorted([loop.STATE, loop.MODEL, loop.EVAL, loop.BEST])
    for name in (loop.MODEL, loop.EVAL, loop.BEST):
        assert (whole / name).read_bytes() == (sealed / name).read_bytes()
    assert [json.loads(ln)["step"] for ln in (whole / loop.EVAL).read_text().splitlines()] == [2, 4]
    assert not list(whole.glob(".*"))  # no partial directory or temporary file left


@pytest.mark.parametrize("kill_in", ["evaluate", "publish"])
def test_a_kill_while_checkpointing_resumes_to_the_uninterrupted_run(
    tmp_path: Path, whole: Path, monkeypatch, kill_in: str
) -> None:
    """Killed in the last checkpoint, after its model was written (evaluate) or after it was sealed (publish):
    the rerun reports the model of step 4 and both evaluations, as the uninterrupted run did."""
    figures = iter([0.5, 0.4])
    killed = task(4, figures)
    if kill_in == "evaluate":
        score = killed.evaluate
        killed.evaluate = lambda module: score(module) if len(loop.checkpoints(tmp_path)) == 0 else _kill()
        with pytest.raises(Killed):
            loop.train(killed, config(4), tmp_path)
        assert [p.name for p in loop.checkpoints(tmp_path)] == ["checkpoint-00000002"]
        figures = iter([0.4])  # the rerun evaluates step 4 again
    else:
        publish = loop._publish
        calls = []

        def killing_publish(checkpoint: Path, out: Path) -> None:
            calls.append(checkpoint)
            if len(calls) == 2:
                _kill()
            publish(checkpoint, out)

        monkeypatch.setattr(loop, "_publish", killing_publish)
        with pytest.raises(Killed):
            loop.train(killed, config(4), tmp_path)
        monkeypatch.setattr(loop, "_publish", publish)
        # sealed but not published: the run directory's model is still step 2's
        step2 = tmp_path / "checkpoint-00000002" / loop.MODEL
        assert (tmp_path / loop.MODEL).read_bytes() == step2.read_bytes()
        assert loop.verify_checkpoint(tmp_path / "checkpoint-00000004") == 4
        figures = iter([])  # nothing is trained or evaluated again
    path = loop.train(task(4, figures), config(4), tmp_path)
    assert path == tmp_path / loop.MODEL
    assert_same_weights(whole / loop.MODEL, path)
    assert_same_weights(whole / loop.BEST, tmp_path / loop.BEST)
    assert (tmp_path / loop.EVAL).read_text() == (whole / loop.EVAL).read_text()
    assert [p.name for p in loop.checkpoints(tmp_path)] == ["checkpoint-00000004"]
    assert not list(tmp_path.glob(".*"))


def _kill():
    raise Killed


def test_a_run_killed_in_its_first_checkpoint_starts_again_cleanly(tmp_path: Path) -> None:
    killed = task(2, iter([]))
    killed.evaluate = lambda module: _kill()
    with pytest.raises(Killed):
        loop.train(killed, config(2), tmp_path)
    assert loop.checkpoints(tmp_path) == [] and list(tmp_path.glob(".checkpoint-00000002.partial"))
    loop.train(task(2, iter([0.5])), config(2), tmp_path)
    assert [json.loads(ln)["step"] for ln in (tmp_path / loop.LOG).read_text().splitlines()] == [1, 2]
    assert [p.name for p in loop.checkpoints(tmp_path)] == ["checkpoint-00000002"]
    assert not list(tmp_path.glob(".*"))


def test_resume_refuses_a_checkpoint_that_differs_from_its_manifest(tmp_path: Path) -> None:
    loop.train(task(2), config(2), tmp_path)
    state = tmp_path / "checkpoint-00000002" / loop.STATE
    state.write_bytes(state.read_bytes()[:-100])  # a torn or damaged file
    with pytest.raises(CheckpointError, match=r"state.pt differs from what was written .*delete"):
        loop.train(task(4), config(4), tmp_path)
    (tmp_path / "checkpoint-00000002" / loop.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"has no readable manifest\.json"):
        loop.train(task(4), config(4), tmp_path)


def test_a_run_written_before_checkpoint_directories_is_named(tmp_path: Path) -> None:
    torch.save({"step": 2}, tmp_path / loop.STATE)
    with pytest.raises(CheckpointError, match="older soundreactor"):
        loop.train(task(2), config(2), tmp_path)


def test_run_files_get_the_umask_mode(tmp_path: Path) -> None:
    previous = os.umask(0o002)
    try:
        loop.train(task(2), config(2), tmp_path / "run")
    finally:
        os.umask(previous)
    run = tmp_path / "run"
    for path in [run / loop.MODEL, run / loop.PLOT, *(run / "checkpoint-00000002").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path
    assert stat.S_IMODE((run / "checkpoint-00000002").stat().st_mode) == 0o775


def poisoned(made: loop.Task, steps: set[int]) -> loop.Task:
    """`made` with clip 0 of the named steps' batches turned to NaN (a decoder's or a file's NaN samples)."""
    batch = made.batch

    def with_nan(step: int, part: slice) -> dict[str, torch.Tensor]:
        drawn = batch(step, part)
        if step in steps:
            drawn["latents"] = drawn["latents"].clone()
            drawn["latents"][0, 1] = float("nan")
        return drawn

    made.batch = with_nan
    return made


def test_a_non_finite_step_is_skipped_logged_and_names_its_clip(tmp_path: Path, capsys) -> None:
    made = poisoned(task(4), {1})
    first_clip = made.clips(1, slice(0, 2))[0]
    path = loop.train(made, config(4), tmp_path)
    rows = [json.loads(ln) for ln in (tmp_path / loop.LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["skipped"] == "non-finite loss"
    assert rows[1]["suspects"] == f"non-finite input values in {first_clip}"
    assert first_clip.startswith("synthetic clip ")
    err = capsys.readouterr().err
    assert (
        f"step 2: non-finite loss, step skipped (non-finite input values in {first_clip}; 1 skipped in all)"
        in err
    )
    assert all(torch.isfinite(t).all() for t in weights(path).values() if t.is_floating_point())
    assert (tmp_path / loop.PLOT).read_bytes()[:4] == b"\x89PNG"  # plotted without the skipped step
    loop.train(poisoned(task(6), {4}), config(6), tmp_path)  # resumed: the count goes on
    assert "step 5: non-finite loss, step skipped (non-finite input values in " in (
        err := capsys.readouterr().err
    )
    assert "; 2 skipped in all)" in err


def test_a_skipped_step_changes_nothing(tmp_path: Path) -> None:
    """Skipping step 2 of 2 leaves the weights, EMA and optimizer where step 1 left them."""
    loop.train(task(1, checkpoint_every=1), config(1, checkpoint_every=1), tmp_path / "one")
    loop.train(poisoned(task(2, checkpoint_every=1), {1}), config(2, checkpoint_every=1), tmp_path / "two")
    assert_same_weights(tmp_path / "one" / loop.MODEL, tmp_path / "two" / loop.MODEL)
    one = torch.load(tmp_path / "one" / "checkpoint-00000001" / loop.STATE, weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoint-00000002" / loop.STATE, weights_only=True)
    for key in ("module", "ema"):
        for name, tensor in one[key].items():
            torch.testing.assert_close(two[key][name], tensor, atol=0, rtol=0, msg=name)
    assert one["optimizer"]["state"][0]["step"] == two["optimizer"]["state"][0]["step"] == 1


def test_too_many_non_finite_steps_in_a_row_stop_training(tmp_path: Path) -> None:
    made = poisoned(task(6, max_skipped_steps=2), {2, 3})
    with pytest.raises(
        loop.TrainingStopped, match=r"step 4: 2 steps in a row had a non-finite loss .*synthetic clip"
    ):
        loop.train(made, config(6, max_skipped_steps=2), tmp_path)
    assert [p.name for p in loop.checkpoints(tmp_path)] == ["checkpoint-00000002"]  # the good one is kept
    # the limit may be raised on resume (the run goes on from step 2, skipping steps 3 and 4 again)
    loop.train(poisoned(task(6, max_skipped_steps=3), {2, 3}), config(6, max_skipped_steps=3), tmp_path)
    assert [p.name for p in loop.checkpoints(tmp_path)] == ["checkpoint-00000006"]
    # bad steps between good ones do not count towards the limit
    loop.train(poisoned(task(6, max_skipped_steps=2), {1, 3}), config(6, max_skipped_steps=2), tmp_path / "b")
    log = [json.loads(ln) for ln in (tmp_path / "b" / loop.LOG).read_text().splitlines()]
    assert [r["step"] for r in log if "skipped" in r] == [2, 4] and log[-1]["step"] == 6


def test_non_finite_weights_are_never_written(tmp_path: Path) -> None:
    made = task(2)
    with torch.no_grad():
        next(made.module.parameters()).fill_(float("inf"))
    with pytest.raises(loop.TrainingStopped, match="became non-finite by step 2"):
        loop.train(made, config(2, lr=0.0), tmp_path)
    assert loop.checkpoints(tmp_path) == [] and not (tmp_path / loop.MODEL).exists()


def test_readme_trains_a_vae_from_random_weights_with_the_calibrated_init() -> None:
    """The README says torch's default VAE init collapses: its examples from --preset must not use it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    examples = [ln for ln in readme.splitlines() if ln.startswith("soundreactor train-vae")]
    assert examples
    for line in examples:
        assert "--init " in line or "--vae-init calibrated" in line, line
