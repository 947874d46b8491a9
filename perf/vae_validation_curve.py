"""A VAE run's validation curve: its eval.jsonl as JSON, a markdown table and a PNG, against a reference VAE.

    python perf/vae_validation_curve.py RUN_DIR OUT_PREFIX [--reference previous_vae_validation.json]

Writes OUT_PREFIX.json (every checkpoint's figures, the reference's, the run's last logged losses), OUT_PREFIX.md
(the table) and OUT_PREFIX.png (one panel per figure, the reference VAE dashed, the issue's target dotted).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

# figure -> (title, target of issue 20 where it sets one, higher is better)
PANELS = {
    "quality": ("quality (selects best.safetensors)", None, True),
    "onset_f1": ("onset F1", 0.85, True),
    "onset_precision": ("onset precision", None, True),
    "onset_recall": ("onset recall", None, True),
    "envelope_corr": ("envelope corr", 0.8, True),
    "pan_corr": ("pan corr", 0.7, True),
    "logmel_distance_db": ("log-mel distance (dB)", 6.0, False),
    "gap_ratio": ("impact gap / truth's", 2 / 3, True),
    "silence_dbfs": ("level in truth's silence (dBFS)", -70.0, False),
}
LOSSES = ("stft", "envelope", "balance", "adv", "fm", "disc")
SMOOTH = 50  # steps per point of the loss curves


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def table(rows: list[dict], reference: dict | None) -> str:
    keys = list(PANELS)
    lines = ["| step | " + " | ".join(PANELS[k][0] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]

    def cells(figures: dict) -> str:
        return " | ".join("n/a" if figures.get(k) is None else f"{figures[k]:.3g}" for k in keys)

    if reference is not None:
        lines.append(f"| reference VAE | {cells(reference)} |")
    lines += [f"| {r['step']} | {cells(r)} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict], log: list[dict], reference: dict | None, reference_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*PANELS, "losses"]
    fig, axes = plt.subplots((len(panels) + 1) // 2, 2, figsize=(11, 2.3 * ((len(panels) + 1) // 2)))
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes.flat, panels, strict=False):
        if key == "losses":
            for name in LOSSES:
                if log and name in log[0]:
                    values = np.array([r[name] for r in log])
                    window = min(SMOOTH, len(values))
                    mean = np.convolve(values, np.ones(window) / window, mode="valid")
                    ax.plot([r["step"] for r in log][window - 1 :], mean, lw=0.8, label=name)
            ax.set_yscale("symlog", linthresh=0.01)
            ax.legend(fontsize=7, ncol=3)
            ax.set_title(f"training losses (mean of {SMOOTH} steps)", fontsize=9)
        else:
            title, target, _ = PANELS[key]
            ax.plot(steps, [r.get(key) if r.get(key) is not None else float("nan") for r in rows], "o-", ms=3)
            if reference is not None and reference.get(key) is not None:
                ax.axhline(reference[key], color="gray", ls="--", lw=1, label=reference_label)
            if target is not None:
                ax.axhline(target, color="green", ls=":", lw=1, label="target")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.remove()
    fig.supxlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_prefix", type=Path)
    parser.add_argument(
        "--reference",
        type=Path,
        help="JSON with a 'reconstruction' dict of the same figures (and a 'label' for the plot)",
    )
    args = parser.parse_args()
    rows = read_jsonl(args.run_dir / "eval.jsonl")
    entries = read_jsonl(args.run_dir / "log.jsonl")
    log = [r for r in entries if "skipped" not in r]  # a skipped step has no losses, only its suspects
    skipped = len(entries) - len(log)
    given = json.loads(args.reference.read_text()) if args.reference else {}
    reference = given.get("reconstruction")
    best = max(rows, key=lambda r: r["quality"])
    out = {
        "checkpoints": rows,
        "best": best,
        "reference": reference,
        "last_log": log[-1] if log else None,
        "skipped_steps": skipped,
    }
    args.out_prefix.parent.mkdir(parents=True, exist_ok=True)
    args.out_prefix.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    args.out_prefix.with_suffix(".md").write_text(table(rows, reference))
    plot(args.out_prefix.with_suffix(".png"), rows, log, reference, given.get("label", "previous VAE"))
    print(table(rows, reference))
    print(f"best by quality: step {best['step']} ({best['quality']:.3f}); skipped steps: {skipped}")


if __name__ == "__main__":
    main()
