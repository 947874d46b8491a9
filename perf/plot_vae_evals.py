"""Plot the held-out figures of VAE runs against the training step, one line per run.

    python perf/plot_vae_evals.py OUT.png RUN.eval.jsonl [RUN.eval.jsonl ...]

Each file is a run's eval.jsonl (`soundreactor train-vae` writes one per run directory): onset F1, precision and
recall and envelope correlation of the reconstructions of held-out synthetic scenes at every checkpoint. The
dotted lines are the issue's VAE targets (onset F1 0.85, envelope correlation 0.8).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANELS = (("onset_f1", 0.85), ("onset_precision", None), ("onset_recall", None), ("envelope_corr", 0.8))


def main(out: str, runs: list[str]) -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2), sharex=True)
    for run in runs:
        rows = [json.loads(line) for line in Path(run).read_text().splitlines() if line]
        steps = [r["step"] for r in rows]
        for ax, (key, _) in zip(axes, PANELS, strict=True):
            ax.plot(steps, [r[key] for r in rows], marker="o", ms=3, label=Path(run).name.split(".")[0])
    for ax, (key, target) in zip(axes, PANELS, strict=True):
        if target is not None:
            ax.axhline(target, color="k", linestyle=":", linewidth=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylim(-0.3, 1.0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
