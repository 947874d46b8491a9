"""Can what the model sees tell an impact's frame from the frame before it? Probes on the synthetic scenes.

    OMP_NUM_THREADS=2 python perf/vision_probe.py OUT_PREFIX --checkpoint CKPT [CKPT ...] [--pixels]

Labels: frame t is positive when an impact starts in it (the physics step found the contact after frame t - 1:
the first frame that shows it). Inputs, for frames t >= 2 of 64-frame clips at the checkpoint's vision size:
- a checkpoint's DINOv2 grids: (G_t, G_t - G_(t-1), G_(t-1), G_(t-1) - G_(t-2)) flattened, read by a one-hidden-layer
  MLP probe (256 GELU, dropout 0.2): what the token aggregator and the transformer could get from two frames;
- `--pixels`: the three frames t-2, t-1, t themselves, read by a small CNN: what a trained vision encoder could get.
Trained on `--train` clips (data seed 4242), scored on `--test` others (seed 4343) by ROC AUC (rank statistic) of
impact frames against every other frame, and against the frames just before an impact (the early attack the model
makes, perf/onset_errors.py). Writes OUT_PREFIX.json and OUT_PREFIX.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from soundreactor import files
from soundreactor.model.soundreactor import SoundReactor
from soundreactor.training.data import clip_grids
from soundreactor.training.synthetic import SyntheticAV

FRAMES = 64
IMPACT, BEFORE = 1, 2


def labels(clip) -> torch.Tensor:
    """[FRAMES - 2] per frame t >= 2: IMPACT, BEFORE (the frame before an impact's) or 0."""
    y = np.zeros(FRAMES, np.int64)
    for e in clip.events:
        if e.frame < FRAMES:
            y[e.frame] = IMPACT
    for e in clip.events:
        if 0 <= e.frame - 1 < FRAMES and y[e.frame - 1] == 0:
            y[e.frame - 1] = BEFORE
    return torch.as_tensor(y[2:])


def grid_inputs(model: SoundReactor, clips) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for clip in clips:
        g = clip_grids(model, clip.frames)
        x = torch.cat((g, torch.cat((torch.zeros_like(g[:1]), g[1:] - g[:-1]))), -1).flatten(1)
        xs.append(torch.cat((x[2:], x[1:-1]), 1))
        ys.append(labels(clip))
    return torch.cat(xs), torch.cat(ys)


def pixel_inputs(clips) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for clip in clips:
        f = torch.as_tensor(clip.frames).permute(0, 3, 1, 2)
        xs.append(torch.cat((f[2:], f[1:-1], f[:-2]), 1))  # uint8 [T - 2, 9, H, W]
        ys.append(labels(clip))
    return torch.cat(xs), torch.cat(ys)


def auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank sum (ties broken by order: the scores are continuous)."""
    ranks = np.argsort(np.argsort(scores)) + 1
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit(net: nn.Module, x, y, x_test, y_test, epochs: int, prepare) -> dict:
    """Weighted BCE (positives weighted by their rarity), AdamW; scores after the last epoch."""
    target = (y == IMPACT).float()
    pos_weight = (len(target) - target.sum()) / target.sum()
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.05)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x)).split(256):
            loss = nn.functional.binary_cross_entropy_with_logits(
                net(prepare(x[idx]))[:, 0], target[idx], pos_weight=pos_weight
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        scores = torch.cat([net(prepare(chunk))[:, 0] for chunk in x_test.split(1024)]).numpy()
    y_test = y_test.numpy()
    pair = (y_test == IMPACT) | (y_test == BEFORE)
    return {
        "auc_impact_vs_all": auc(y_test == IMPACT, scores),
        "auc_impact_vs_frame_before": auc(y_test[pair] == IMPACT, scores[pair]),
        "epochs": epochs,
        "train_frames": len(x),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_prefix", type=Path)
    parser.add_argument("--checkpoint", nargs="*", type=Path, default=[])
    parser.add_argument("--pixels", action="store_true")
    parser.add_argument(
        "--hw", default="56x112", help="scene frame size HxW (the small preset's vision size)"
    )
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--pixel-epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    hw = tuple(int(v) for v in args.hw.split("x"))
    train = [c for c in SyntheticAV(4242, args.train, FRAMES, hw)]
    test = [c for c in SyntheticAV(4343, args.test, FRAMES, hw)]
    rows = {}
    for path in args.checkpoint:
        start = time.time()
        model = SoundReactor.load(path, input_hw=hw).eval()
        (x, y), (xt, yt) = grid_inputs(model, train), grid_inputs(model, test)
        mu, sd = x.mean(0), x.std(0) + 1e-6
        x, xt = (x - mu) / sd, (xt - mu) / sd
        net = nn.Sequential(
            nn.Dropout(0.2), nn.Linear(x.shape[1], 256), nn.GELU(), nn.Dropout(0.2), nn.Linear(256, 1)
        )
        rows[f"DINOv2 grids of {path}"] = fit(net, x, y, xt, yt, args.epochs, lambda v: v)
        print(f"{path}: {rows[f'DINOv2 grids of {path}']} ({time.time() - start:.0f} s)", flush=True)
    if args.pixels:
        start = time.time()
        (x, y), (xt, yt) = pixel_inputs(train), pixel_inputs(test)

        def conv(i: int, o: int, stride: int = 1) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, stride=stride), nn.GELU())

        net = nn.Sequential(
            conv(9, 32), conv(32, 32, 2), conv(32, 64, 2), conv(64, 64, 2),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 1),
        )  # fmt: skip
        rows["pixels (CNN)"] = fit(net, x, y, xt, yt, args.pixel_epochs, lambda v: v.float() / 127.5 - 1)
        print(f"pixels: {rows['pixels (CNN)']} ({time.time() - start:.0f} s)", flush=True)
    report = {
        "config": {
            **vars(args),
            "out_prefix": str(args.out_prefix),
            "checkpoint": [str(p) for p in args.checkpoint],
        },
        "probes": rows,
    }
    lines = [
        f"Synthetic scenes at {args.hw}, {args.train} training and {args.test} test clips of {FRAMES} frames "
        "(perf/vision_probe.py): ROC AUC of a probe's score for 'an impact starts in this frame'.",
        "",
        "| input | probe epochs | impact vs every other frame | impact vs the frame before it |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['epochs']} | {r['auc_impact_vs_all']:.3f} | {r['auc_impact_vs_frame_before']:.3f} |"
        )
    args.out_prefix.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(args.out_prefix.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    files.write_text(args.out_prefix.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
