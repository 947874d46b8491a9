"""How `soundreactor evaluate`'s onset detector scores ground truth with a faint noise bed added.

A codec's reconstruction differs from ground truth by, among other things, a low-level bed in the bands the target
leaves empty. This measures which bed levels the detector (`training.evaluate.detect_onsets`, band levels floored at
-100 dB) already counts as onsets: white noise at L dBFS per channel, steady or pulsed (its amplitude tripled, +9.5
dB, for the first 200 samples of every 1600-sample latent frame, the shape of a frame-rate pulse), added to held-out
scenes. Writes perf/results/detector_sensitivity.{json,md,png}.

    python perf/detector_sensitivity.py [--scenes 8] [--frames 60]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from soundreactor.training import evaluate

LEVELS_DBFS = (-100, -90, -80, -75, -70, -65, -60, -50, -40)
PULSE_SAMPLES, PULSE_GAIN = 200, 3.0


def bed(shape: tuple[int, int], level_dbfs: float, pulsed: bool, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(shape) * 10 ** (level_dbfs / 20)
    if pulsed:
        noise *= np.where(np.arange(shape[1]) % 1600 < PULSE_SAMPLES, PULSE_GAIN, 1.0)
    return noise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    clips = evaluate.held_out_clips(args.scenes, args.frames)
    rows = []
    for pulsed in (False, True):
        for level in LEVELS_DBFS:
            rng = np.random.default_rng(0)
            audios = [c.audio + bed(c.audio.shape, level, pulsed, rng) for c in clips]
            figures = evaluate.score(audios, clips)
            rows.append({"bed": "pulsed" if pulsed else "steady", "level_dbfs": level, **figures})
            print(
                f"{rows[-1]['bed']:>6} bed at {level:4d} dBFS: onset F1 {figures['onset_f1']:.3f} "
                f"(P {figures['onset_precision']:.3f}, R {figures['onset_recall']:.3f})"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"scenes": args.scenes, "frames": args.frames, "seed": evaluate.EVAL_SEED, "rows": rows}
    (args.out / "detector_sensitivity.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Onset detector: ground truth plus a faint noise bed",
        "",
        f"{args.scenes} held-out scenes x {args.frames} frames ({rows[0]['onsets_true']} true onsets). White "
        "noise at the given level per channel added to ground truth; 'pulsed' triples its amplitude (+9.5 dB) "
        f"for the first {PULSE_SAMPLES} samples of every 1600-sample latent frame. Made by "
        "`perf/detector_sensitivity.py`.",
        "",
        "| bed | level (dBFS) | onset F1 | precision | recall | detected |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bed']} | {r['level_dbfs']} | {r['onset_f1']:.3f} | {r['onset_precision']:.3f} | "
            f"{r['onset_recall']:.3f} | {r['onsets_detected']} |"
        )
    (args.out / "detector_sensitivity.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / "detector_sensitivity.png")
    print(f"wrote {args.out / 'detector_sensitivity.md'}, .json and .png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, style in (("steady", "o-"), ("pulsed", "s--")):
        picked = [r for r in rows if r["bed"] == kind]
        levels = [r["level_dbfs"] for r in picked]
        ax.plot(levels, [r["onset_f1"] for r in picked], style, label=f"{kind} bed: F1")
        ax.plot(
            levels, [r["onset_precision"] for r in picked], style, alpha=0.4, label=f"{kind} bed: precision"
        )
    ax.set_xlabel("bed level (dBFS per channel)")
    ax.set_ylabel("onset figure")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("ground truth + noise bed, scored by detect_onsets")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
