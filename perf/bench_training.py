"""Training throughput of each stage (VAE, diffusion pretraining, ECT) through the real training loop.

    python perf/bench_training.py [--preset tiny] [--steps 40] [--warmup 10] [--batch-size 8]

Each stage runs `loop.train` on the synthetic set in a temporary run directory; steps/s comes from the per-step
times in its log, after `--warmup` steps (which also fill the in-memory latent cache of the 64-clip set), so
neither start-up nor the final checkpoint is counted. Random weights: the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from common import machine, save

from soundreactor.model.soundreactor import init_model
from soundreactor.training import loop, stages
from soundreactor.training.train_config import TrainConfig

CLIPS = 64


def bench_stage(stage: str, preset: str, steps: int, warmup: int, batch: int) -> dict[str, float]:
    cfg = TrainConfig(stage, steps=steps, batch_size=batch, dataset_size=CLIPS, checkpoint_every=steps)
    torch.manual_seed(0)
    model = init_model(preset, seed=0)[0]
    cpu = torch.device("cpu")
    task = stages.vae_task(model, cfg) if stage == "vae" else stages.ar_task(model, cfg, cpu)
    with tempfile.TemporaryDirectory() as tmp:
        loop.train(task, cfg, tmp, cpu)
        times = [json.loads(line)["time"] for line in (Path(tmp) / loop.LOG).read_text().splitlines()]
    rate = (steps - warmup) / (times[-1] - times[warmup - 1])
    frames = stages.clip_frames(cfg, model)
    return {"steps_per_s": rate, "clips_per_s": rate * batch, "clip_frames": frames, "batch_size": batch}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    results = {
        "machine": machine(),
        "preset": args.preset,
        "stages": {
            stage: bench_stage(stage, args.preset, args.steps, args.warmup, args.batch_size)
            for stage in ("vae", "pretrain", "ect")
        },
    }
    rows = [
        f"| {stage} | {r['steps_per_s']:.2f} | {r['clips_per_s']:.1f} | {r['clip_frames']} |"
        for stage, r in results["stages"].items()
    ]
    markdown = "\n".join(
        [
            f"# Training throughput, {args.preset} preset, CPU",
            "",
            f"{results['machine']['cpu']}, {results['machine']['cores']} cores, torch threads "
            f"{results['machine']['torch_threads']}; global batch {args.batch_size}, synthetic clips.",
            "",
            "| stage | steps/s | clips/s | frames per clip |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(markdown)
    print(f"wrote {save(f'training_{args.preset}_cpu', results, markdown)}")


if __name__ == "__main__":
    main()
