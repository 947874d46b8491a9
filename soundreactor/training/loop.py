"""The training loop every stage shares: DDP, AdamW, EMA, bf16 autocast, atomic resumable checkpoints, logs.

Launch one process for CPU or one GPU, or many through `torchrun` (it sets RANK/WORLD_SIZE; we join with gloo on
CPU and NCCL on GPU, and wrap the trained module in DistributedDataParallel). Every random draw of step s comes
from a generator seeded by (seed, s) over the whole global batch, of which each rank takes its slice, so a run
resumed from a checkpoint, or split over N ranks, computes what one uninterrupted process computes.

Files in the run directory (written by rank 0):
- `checkpoint-<step>/`: the newest checkpoint, whole: `state.pt` (resumable state: weights, EMA, optimizers (the critic's too), step,
  RNG states, both configs), `model.safetensors`, `eval.jsonl` and `best.safetensors` where the stage has them,
  and `manifest.json` (every file's size and sha256). It is written as a hidden `.checkpoint-<step>.partial/`,
  the manifest last, and renamed into place; resume takes the newest sealed one and verifies it, so a kill at
  any point resumes from a consistent set;
- `model.safetensors`: the EMA weights as a SoundReactor checkpoint (training config in its metadata),
  `eval.jsonl`: the stage's quality figures at every checkpoint, where it has some (the VAE's onsets),
  `best.safetensors`: the exported model whose figure `Task.select` was highest so far, where the stage has one:
  all three are the newest checkpoint's files (hard links), published again on resume;
- `log.jsonl`: one JSON line of losses per step (skipped steps say why); `losses.png`: their curves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from soundreactor.checkpoint import CheckpointError
from soundreactor.files import atomic_write, fsync_directory, write_text
from soundreactor.training.train_config import TrainConfig

STATE = "state.pt"
MODEL = "model.safetensors"
LOG = "log.jsonl"
EVAL = "eval.jsonl"
BEST = "best.safetensors"
PLOT = "losses.png"
CHECKPOINT = "checkpoint-"  # + the step, 8 digits
MANIFEST = "manifest.json"
PARTIAL = ".partial"
RESUME_MAY_CHANGE = ("steps", "max_skipped_steps")  # options a resumed run may change


class TrainingStopped(ValueError):
    """Training cannot go on (too many non-finite steps, or non-finite weights); the last checkpoint is kept."""


@dataclass
class Critic:
    """An adversary trained alongside a Task's module by its own AdamW (cfg.disc_lr, cfg.disc_betas).

    module: a submodule of Task.module (saved and resumed with it), left out of the main optimizer;
    loss(): its loss on what Task.module's last forward saw, taken after the main step; None to sit the step out.
    """

    module: nn.Module
    loss: Callable[[], Tensor | None]


@dataclass
class Task:
    """What a stage gives the loop.

    module: the trained nn.Module; module(**batch) -> (loss scalar, {name: scalar tensor} to log).
    batch(step, part): this rank's `part` (a slice of the global batch) of step `step`'s inputs.
    export(module, path): write the SoundReactor checkpoint made from `module`'s (EMA) weights.
    evaluate(module): optional figures of the (EMA) weights at every checkpoint, appended to `eval.jsonl`.
    select: optional name of one of those figures (higher is better): the checkpoint with the highest so far is
        also kept as `best.safetensors` (early stopping; evaluate must then score data held out from training).
    clips(step, part): optional names of the clips in that part of step's batch, to say which data a skipped
        (non-finite) step came from.
    """

    module: nn.Module
    batch: Callable[[int, slice], dict[str, Tensor]]
    export: Callable[[nn.Module, Path, dict[str, str]], None]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    select: str | None = None
    clips: Callable[[int, slice], list[str]] | None = None
    critic: Critic | None = None


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of every random draw of one step (all ranks draw the same global batch from it)."""
    gen = torch.Generator(device)
    gen.manual_seed(seed * 1_000_003 + step)
    return gen


def distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes in the environment (NCCL for GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds each rank to its own GPU
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world


def default_device(name: str | None = None) -> torch.device:
    """The named device, else a GPU if there is one; a bare "cuda" means this rank's GPU (LOCAL_RANK)."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def plot_log(log_path: Path, png_path: Path) -> None:
    """One panel per logged quantity against the step (log scale where all values are positive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in map(json.loads, filter(None, log_path.read_text().splitlines())) if "skipped" not in r]
    if not rows:
        return
    keys = [k for k in rows[0] if k not in ("step", "time")]
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes[:, 0], keys, strict=True):
        values = [r[key] for r in rows]
        ax.plot(steps, values, lw=0.8)
        if all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    atomic_write(png_path, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / f"{CHECKPOINT}{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _link(source: Path, target: Path) -> None:
    """Publish `source` as `target` atomically: a hard link (no copy of a large file) or, where the file system
    has none, a copy. Checkpoint files are never modified after their directory is sealed, so sharing is safe."""
    if target.exists() and os.path.samefile(source, target):
        return  # already published (renaming a link over another link of the same file would do nothing)

    def fill(temp: Path) -> None:
        temp.unlink()
        try:
            os.link(source, temp)
        except OSError:
            shutil.copyfile(source, temp)

    atomic_write(target, fill)


def checkpoints(out: Path) -> list[Path]:
    """The sealed checkpoint directories under `out`, oldest first (partial ones are hidden `.partial` names)."""
    found = [p for p in out.glob(f"{CHECKPOINT}*") if p.is_dir() and p.name[len(CHECKPOINT) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT) :]))


def verify_checkpoint(directory: Path) -> int:
    """The step of a sealed checkpoint directory whose files all match its manifest; raises CheckpointError
    naming the first file that does not (a disk fault or a hand edit: the rename makes a torn set impossible)."""
    fix = f"delete {directory} to resume from the run's start, or train into a new --out-dir"
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        listed, step = manifest["files"], int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{directory} has no readable {MANIFEST} ({err}): {fix}") from None
    if directory != checkpoint_dir(directory.parent, step) or STATE not in listed or MODEL not in listed:
        raise CheckpointError(
            f"{directory / MANIFEST} does not describe this checkpoint (step {step}): {fix}"
        )
    for name, want in listed.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {fix}")
        if path.stat().st_size != want["bytes"] or _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path} differs from what was written (size or sha256): {fix}")
    return step


def _seal(partial: Path, final: Path, step: int) -> None:
    """Write the manifest (every file's size and sha256) last, then rename the directory into place."""
    listed = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(partial.iterdir())}
    write_text(partial / MANIFEST, json.dumps({"step": step, "files": listed}, indent=1) + "\n")
    fsync_directory(partial)
    os.rename(partial, final)  # made by mkdir, it has the umask's mode, which the rename keeps
    fsync_directory(final.parent)


def _publish(checkpoint: Path, out: Path) -> None:
    """Make the run directory's model, best model and evaluation those of `checkpoint` (repeated on resume, so a
    kill after sealing a checkpoint never leaves an older or missing model beside it)."""
    for name in (MODEL, BEST, EVAL):
        if (checkpoint / name).exists():
            _link(checkpoint / name, out / name)
        else:
            (out / name).unlink(missing_ok=True)


def _tidy(out: Path, keep: Path | None) -> None:
    """Remove checkpoint directories other than `keep`, and partial ones a killed run left."""
    for old in [*checkpoints(out), *out.glob(f".{CHECKPOINT}*{PARTIAL}")]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so the log reads as one uninterrupted run."""
    if log_path.exists():
        lines = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        write_text(log_path, "".join(ln + "\n" for ln in lines))


def _count_skipped(log_path: Path) -> int:
    """Steps the run's log says were skipped."""
    if not log_path.exists():
        return 0
    return sum("skipped" in json.loads(ln) for ln in log_path.read_text().splitlines() if ln)


def _non_finite_rows(batch: dict[str, Tensor], rows: int) -> list[int]:
    """Indices of batch rows (clips) whose inputs hold NaN or infinity."""
    bad = set()
    for value in batch.values():
        if value.is_floating_point() and value.dim() > 0 and value.shape[0] == rows:
            bad |= set((~torch.isfinite(value.reshape(rows, -1)).all(1)).nonzero()[:, 0].tolist())
    return sorted(bad)


def _suspects(task: Task, step: int, part: slice, batch: dict[str, Tensor]) -> str:
    """This rank's clips of a skipped step: those with non-finite inputs if any, else all of them."""
    rows = part.stop - part.start
    names = task.clips(step, part) if task.clips is not None else [f"batch row {i}" for i in range(rows)]
    bad = _non_finite_rows(batch, rows)
    if bad:
        return "non-finite input values in " + ", ".join(names[i] for i in bad)
    return "clips " + ", ".join(names)


def _check_finite(step: int, *modules: nn.Module) -> None:
    """Refuse to write weights that are not finite (no checkpoint is better than a NaN one)."""
    for module in modules:
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise TrainingStopped(
                    f"weight {name} became non-finite by step {step}; nothing was written for this step and the "
                    f"last checkpoint is kept: start from its model (--init) with a lower --lr or --grad-clip "
                    f"in a new --out-dir"
                )


def _resume(out: Path, cfg: TrainConfig, device: torch.device) -> tuple[dict | None, Path | None]:
    """The training state of the newest sealed checkpoint under `out` (verified), and that checkpoint."""
    found = checkpoints(out)
    if not found:
        if (out / STATE).exists():
            raise CheckpointError(
                f"{out / STATE} was written by an older soundreactor (one state file, no checkpoint "
                f"directory); resume it with that version, or train into a new --out-dir"
            )
        return None, None
    latest = found[-1]
    verify_checkpoint(latest)
    state = torch.load(latest / STATE, map_location=device, weights_only=True)
    saved = TrainConfig.from_json(state["train_config"])
    changed = [
        f.name
        for f in dataclasses.fields(cfg)
        if f.name not in RESUME_MAY_CHANGE and getattr(saved, f.name) != getattr(cfg, f.name)
    ]
    if changed:
        raise ValueError(
            f"{latest} was written with other training options ({', '.join(changed)} differ); resume "
            f"with the same options (only --steps and --max-skipped-steps may change), or use a new --out-dir"
        )
    return state, latest


def train(task: Task, cfg: TrainConfig, out_dir: str | Path, device: torch.device | None = None) -> Path:
    """Run (or resume) the stage to cfg.steps; returns the path of the exported model.

    A step whose loss or gradient is not finite is skipped (neither the weights, the optimizer nor the EMA
    move), logged with the clips behind it, and training stops with TrainingStopped after cfg.max_skipped_steps
    of them in a row.
    """
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from tqdm import tqdm

    device = device or default_device()
    rank, world = distributed(device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must divide evenly over {world} ranks")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = task.module.to(device)
    ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
    critic = task.critic
    critic_params = [p for p in critic.module.parameters() if p.requires_grad] if critic else []
    excluded = {id(p) for p in critic_params}
    params = [p for p in module.parameters() if p.requires_grad and id(p) not in excluded]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    critic_optimizer = (
        torch.optim.AdamW(critic_params, lr=cfg.disc_lr, betas=cfg.disc_betas) if critic else None
    )

    start, evals = 0, []
    state, latest = _resume(out, cfg, device)
    if state is not None:
        module.load_state_dict(state["module"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if critic_optimizer is not None:
            critic_optimizer.load_state_dict(state["critic_optimizer"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        start = int(state["step"])
        if (latest / EVAL).exists():
            evals = [json.loads(ln) for ln in (latest / EVAL).read_text().splitlines() if ln]
        if rank == 0:
            _publish(latest, out)
    if rank == 0:
        _truncate_log(out / LOG, start)  # also a run killed before its first checkpoint: it starts again
        _tidy(out, latest)
    if world > 1:
        dist.barrier()
    if start >= cfg.steps:
        return out / MODEL
    # an adversary sits out its warm-up: its parameters then get no gradient, which DDP must be told
    trained = (
        DistributedDataParallel(module, find_unused_parameters=critic is not None) if world > 1 else module
    )
    per_rank = cfg.batch_size // world
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    began = time.perf_counter()
    skipped = 0  # steps in a row
    skipped_total = _count_skipped(out / LOG)  # in the whole run, resumes included

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=rank != 0, desc=cfg.stage)
    for step in bar:
        module.train()
        batch = {k: v.to(device) for k, v in task.batch(step, part).items()}
        with autocast:
            loss, metrics = trained(**batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        logged = torch.stack(
            [
                loss.detach().float(),
                grad_norm.detach().float(),
                *(m.detach().float() for m in metrics.values()),
            ]
        )
        if world > 1:  # every rank then takes the same decision below (gradients are already all-reduced)
            dist.all_reduce(logged)
            logged /= world
        if torch.isfinite(logged[:2]).all():
            optimizer.step()
            disc = _critic_step(critic, critic_params, critic_optimizer, cfg, autocast) if critic else None
            ema.update_parameters(module)
            skipped = 0
            record = {"step": step + 1, "loss": logged[0].item()}
            record |= {k: v.item() for k, v in zip(metrics, logged[2:], strict=True)}
            if disc is not None:
                record["disc"] = disc.item()
            record |= {"grad_norm": logged[1].item(), "time": round(time.perf_counter() - began, 3)}
            bar.set_postfix(loss=f"{record['loss']:.4g}")
        else:
            skipped += 1
            skipped_total += 1
            what = "loss" if not torch.isfinite(logged[0]) else "gradient"
            suspects = _suspects(task, step, part, batch)
            record = {"step": step + 1, "skipped": f"non-finite {what}", "suspects": suspects}
            print(
                f"step {step + 1}: non-finite {what}, step skipped ({suspects}; {skipped_total} skipped in all)",
                file=sys.stderr,
            )
            if skipped >= cfg.max_skipped_steps:
                raise TrainingStopped(
                    f"training stopped at step {step + 1}: {skipped} steps in a row had a non-finite {what} "
                    f"(last: {suspects}). None was applied, and the run's last checkpoint is kept. Check the "
                    f"clips named; resume with a higher --max-skipped-steps, or start from the last model "
                    f"(--init) with a lower --lr or --grad-clip in a new --out-dir"
                )
        if rank == 0:
            with open(out / LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            if rank == 0:
                latest = _checkpoint(
                    task,
                    cfg,
                    out,
                    step + 1,
                    module,
                    ema,
                    optimizer,
                    critic_optimizer,
                    device,
                    evals,
                    latest,
                    bar,
                )
            if world > 1:
                dist.barrier()
    bar.close()
    return out / MODEL


def _checkpoint(
    task: Task,
    cfg: TrainConfig,
    out: Path,
    step: int,
    module: nn.Module,
    ema: nn.Module,
    optimizer,
    critic_optimizer,
    device: torch.device,
    evals: list[dict],
    previous: Path | None,
    bar,
) -> Path:
    """Write step's checkpoint directory (state, exported model, evaluation and best model so far), seal it, make
    its files the run directory's, and remove the previous one. Returns the new directory."""
    _check_finite(step, module, ema)
    final = checkpoint_dir(out, step)
    partial = out / f".{final.name}{PARTIAL}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    _save(partial / STATE, step, cfg, module, ema, optimizer, critic_optimizer, device)
    task.export(ema.module, partial / MODEL, {"training": cfg.to_json(), "step": str(step)})
    if task.evaluate is not None:
        figures = {"step": step, **task.evaluate(ema.module)}
        if task.select is not None:
            best = max((r[task.select] for r in evals), default=-math.inf)
            source = partial / MODEL if figures[task.select] > best else previous and previous / BEST
            if source is not None and source.exists():
                _link(source, partial / BEST)
        evals.append(figures)
        write_text(partial / EVAL, "".join(json.dumps(r) + "\n" for r in evals))
        bar.write(
            " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        )
    _seal(partial, final, step)
    _publish(final, out)
    _tidy(out, final)
    plot_log(out / LOG, out / PLOT)
    return final


def _critic_step(critic: Critic, params: list, optimizer, cfg: TrainConfig, autocast) -> Tensor:
    """One step of the adversary on its loss (averaged over ranks); returns the loss, 0 where it sat out.

    A non-finite loss or gradient is not applied (every rank sees the same all-reduced gradient norm)."""
    with autocast:
        loss = critic.loss()
    if loss is None:
        return torch.zeros((), device=params[0].device)
    optimizer.zero_grad(set_to_none=True)  # also drops what the main loss left on its parameters
    loss.backward()
    if dist.is_initialized():
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    if torch.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _save(
    path: Path,
    step: int,
    cfg: TrainConfig,
    module: nn.Module,
    ema: nn.Module,
    optimizer,
    critic_optimizer,
    device,
) -> None:
    state = {
        "step": step,
        "train_config": cfg.to_json(),
        "module": module.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
    }
    if critic_optimizer is not None:
        state["critic_optimizer"] = critic_optimizer.state_dict()
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    atomic_write(path, lambda p: torch.save(state, p))
