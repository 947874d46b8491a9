"""The training loop every stage shares: DDP, AdamW, EMA, bf16 autocast, atomic resumable checkpoints, logs.

Launch one process for CPU or one GPU, or many through `torchrun` (it sets RANK/WORLD_SIZE; we join with gloo on
CPU and NCCL on GPU, and wrap the trained module in DistributedDataParallel). Every random draw of step s comes
from a generator seeded by (seed, s) over the whole global batch, of which each rank takes its slice, so a run
resumed from a checkpoint, or split over N ranks, computes what one uninterrupted process computes.

Files in the run directory (written by rank 0):
- `state.pt`: resumable state (weights, EMA, optimizers, step, RNG states, both configs), temp file + rename;
- `model.safetensors`: the EMA weights as a SoundReactor checkpoint (training config in its metadata);
- `log.jsonl`: one JSON line of losses per step; `losses.png`: their curves;
- `eval.jsonl`: the stage's quality figures at every checkpoint, where it has some (the VAE's onsets);
- `best.safetensors`: the exported model whose figure `Task.select` was highest so far, where the stage has one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from soundreactor.training.train_config import TrainConfig

STATE = "state.pt"
MODEL = "model.safetensors"
LOG = "log.jsonl"
EVAL = "eval.jsonl"
BEST = "best.safetensors"
PLOT = "losses.png"


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
    """

    module: nn.Module
    batch: Callable[[int, slice], dict[str, Tensor]]
    export: Callable[[nn.Module, Path, dict[str, str]], None]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    select: str | None = None
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


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `path.tmp` then rename: a crash mid-write leaves the previous file intact."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def plot_log(log_path: Path, png_path: Path) -> None:
    """One panel per logged quantity against the step (log scale where all values are positive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line]
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


def _best(eval_path: Path, key: str) -> float:
    """The highest `key` logged so far in eval.jsonl (-inf before the first)."""
    if not eval_path.exists():
        return -math.inf
    return max((json.loads(ln)[key] for ln in eval_path.read_text().splitlines() if ln), default=-math.inf)


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so the log reads as one uninterrupted run."""
    if log_path.exists():
        lines = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        log_path.write_text("".join(ln + "\n" for ln in lines))


def train(task: Task, cfg: TrainConfig, out_dir: str | Path, device: torch.device | None = None) -> Path:
    """Run (or resume) the stage to cfg.steps; returns the path of the exported model."""
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

    start = 0
    if (out / STATE).exists():
        state = torch.load(out / STATE, map_location=device, weights_only=True)
        saved = TrainConfig.from_json(state["train_config"])
        if dataclasses.replace(saved, steps=cfg.steps) != cfg:
            changed = [
                f.name
                for f in dataclasses.fields(cfg)
                if f.name != "steps" and getattr(saved, f.name) != getattr(cfg, f.name)
            ]
            raise ValueError(
                f"{out / STATE} was written with other training options ({', '.join(changed)} differ); resume "
                f"with the same options (only --steps may change), or use a new --out-dir"
            )
        module.load_state_dict(state["module"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if critic_optimizer is not None:
            critic_optimizer.load_state_dict(state["critic_optimizer"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        start = int(state["step"])
        if rank == 0:
            _truncate_log(out / LOG, start)
            _truncate_log(out / EVAL, start)
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

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=rank != 0, desc=cfg.stage)
    for step in bar:
        module.train()
        batch = {k: v.to(device) for k, v in task.batch(step, part).items()}
        with autocast:
            loss, metrics = trained(**batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        optimizer.step()
        if critic is not None:
            metrics = {
                **metrics,
                "disc": _critic_step(critic, critic_params, critic_optimizer, cfg, autocast),
            }
        ema.update_parameters(module)

        logged = torch.stack([loss.detach().float(), *(m.detach().float() for m in metrics.values())])
        if world > 1:
            dist.all_reduce(logged)
            logged /= world
        if rank == 0:
            record = {"step": step + 1, "loss": logged[0].item()}
            record |= {k: v.item() for k, v in zip(metrics, logged[1:], strict=True)}
            record |= {"grad_norm": grad_norm.item(), "time": round(time.perf_counter() - began, 3)}
            with open(out / LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.4g}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            if rank == 0:
                _save(out, step + 1, cfg, module, ema, optimizer, critic_optimizer, device)
                task.export(ema.module, out / MODEL, {"training": cfg.to_json(), "step": str(step + 1)})
                plot_log(out / LOG, out / PLOT)
                if task.evaluate is not None:
                    figures = {"step": step + 1, **task.evaluate(ema.module)}
                    if task.select is not None and figures[task.select] > _best(out / EVAL, task.select):
                        atomic_write(out / BEST, lambda p: shutil.copyfile(out / MODEL, p))
                    with open(out / EVAL, "a") as f:
                        f.write(json.dumps(figures) + "\n")
                    bar.write(
                        " ".join(
                            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
                        )
                    )
            if world > 1:
                dist.barrier()
    bar.close()
    return out / MODEL


def _critic_step(critic: Critic, params: list, optimizer, cfg: TrainConfig, autocast) -> Tensor:
    """One step of the adversary on its loss (averaged over ranks); returns the loss, 0 where it sat out."""
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
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    optimizer.step()
    return loss.detach()


def _save(
    out: Path,
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
    atomic_write(out / STATE, lambda p: torch.save(state, p))
