"""Where a model's false onsets fall: the default model's precision, taken apart on validation scenes.

    OMP_NUM_THREADS=1 python perf/onset_errors.py OUT_PREFIX CHECKPOINT [CHECKPOINT ...] [--guidance G ...]

Streams each checkpoint (at its own guidance, or the one given in the same position) over validation scenes
(`evaluate.VALIDATION_SEED`, 16 x 150 frames by default, NFE 4), detects onsets as `evaluate` does, pairs them with
the true impacts as `evaluate.onset_pairs` does (one to one within +-1 frame), and sorts every unpaired detection
by the true onset nearest to it (offsets in video frames, detection minus truth):
- start: in the first 10 ms, two of the detector's hops (it pads the signal's start with digital silence);
- doubled: within 1.5 frames of a true onset another detection is paired with (a second attack for one impact);
- mistimed: within 4 frames of a true onset nothing is paired with (the impact placed 1-4 frames off: it
  counts as one false and one missed onset);
- near: 1.5-4 frames from a paired true onset (an extra attack in an impact's ring);
- isolated: no true onset within 4 frames (an impact the scene does not have).
The same for the model's VAE on the true audio (the ceiling). Writes OUT_PREFIX.json, OUT_PREFIX.md and
OUT_PREFIX.png (each system's histogram of detection offsets from the nearest true onset).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from soundreactor import files
from soundreactor.model.soundreactor import SoundReactor
from soundreactor.training import evaluate

FRAME_S = 1 / evaluate.FPS
CLASSES = ("start", "doubled", "mistimed", "near", "isolated")
START_S = 0.01  # the detector's first two hops
DOUBLED_FRAMES, NEAR_FRAMES = 1.5, 4.0


def classify(reference: np.ndarray, detected: np.ndarray) -> tuple[Counter, list[float], int]:
    """(counts of the unpaired detections' CLASSES, every detection's offset in frames from its nearest true onset,
    number of true onsets left without a detection within NEAR_FRAMES)."""
    pairs = evaluate.onset_pairs(reference, detected)
    paired_r, paired_e = {r for r, _ in pairs}, {e for _, e in pairs}
    counts: Counter = Counter()
    offsets = []
    for e, t in enumerate(detected):
        nearest = int(np.abs(reference - t).argmin()) if len(reference) else None
        offset = (t - reference[nearest]) / FRAME_S if nearest is not None else np.inf
        offsets.append(float(offset))
        if e in paired_e:
            continue
        if t < START_S:
            counts["start"] += 1
        elif abs(offset) <= DOUBLED_FRAMES and nearest in paired_r:
            counts["doubled"] += 1
        elif abs(offset) <= NEAR_FRAMES:
            counts["near" if nearest in paired_r else "mistimed"] += 1
        else:
            counts["isolated"] += 1
    unheard = sum(
        1
        for r, t in enumerate(reference)
        if r not in paired_r and not np.any(np.abs(detected - t) <= NEAR_FRAMES * FRAME_S)
    )
    return counts, offsets, unheard


def breakdown(audios, clips) -> dict:
    counts: Counter = Counter()
    offsets: list[float] = []
    n_true = n_detected = n_paired = unheard = 0
    for audio, clip in zip(audios, clips, strict=True):
        reference = np.unique([e.sample for e in clip.events]) / evaluate.SAMPLE_RATE
        detected = evaluate.detect_onsets(audio)
        c, o, u = classify(reference, detected)
        counts += c
        offsets += o
        unheard += u
        n_true, n_detected = n_true + len(reference), n_detected + len(detected)
        n_paired += evaluate.match_onsets(reference, detected)
    return {
        "onsets_true": n_true,
        "onsets_detected": n_detected,
        "paired": n_paired,
        "precision": n_paired / n_detected if n_detected else 0.0,
        "recall": n_paired / n_true if n_true else 0.0,
        "unpaired": {k: counts[k] for k in CLASSES},
        "missed_without_detection_within_4_frames": unheard,
        "offsets_frames": offsets,
    }


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"Validation scenes (seed {cfg['seed']}, {cfg['scenes']} x {cfg['frames']} frames), NFE {cfg['nfe']}: every "
        "detection not paired with a true onset, by the true onset nearest to it (perf/onset_errors.py).",
        "",
        "| system | guidance | true | detected | P | R | "
        + " | ".join(CLASSES)
        + " | missed, nothing within 4 frames |",
        "|---|---|---|---|---|---|" + "---|" * len(CLASSES) + "---|",
    ]
    for name, r in report["systems"].items():
        cells = " | ".join(str(r["unpaired"][k]) for k in CLASSES)
        lines.append(
            f"| {name} | {r['guidance'] if r['guidance'] is not None else '-'} | {r['onsets_true']} | "
            f"{r['onsets_detected']} | {r['precision']:.3f} | {r['recall']:.3f} | {cells} | "
            f"{r['missed_without_detection_within_4_frames']} |"
        )
    return "\n".join(lines) + "\n"


def plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.arange(-4.5, 4.6, 0.25)
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, r in report["systems"].items():
        offsets = np.clip(r["offsets_frames"], -4.5, 4.5)
        ax.hist(
            offsets,
            bins=bins,
            histtype="step",
            linewidth=1.5,
            label=f"{name} ({r['onsets_detected']} detections)",
        )
    ax.axvspan(-1, 1, color="0.9", zorder=0, label="+-1 frame (paired if one to one)")
    ax.set_xlabel("detection minus nearest true onset (video frames, 33.3 ms)")
    ax.set_ylabel("detections")
    ax.set_title("Where onsets are detected, relative to the true impacts (validation scenes)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_prefix", type=Path)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--guidance", type=float, nargs="*", default=[], help="one per checkpoint, in order")
    parser.add_argument(
        "--names", nargs="*", default=[], help="one per checkpoint, in order (default: paths)"
    )
    parser.add_argument("--nfe", type=int, default=4)
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--frames", type=int, default=150)
    args = parser.parse_args()
    for option in ("guidance", "names"):
        if getattr(args, option) and len(getattr(args, option)) != len(args.checkpoints):
            parser.error(f"give one --{option} per checkpoint ({len(args.checkpoints)}), or none")
    torch.set_num_threads(1)
    clips = evaluate.held_out_clips(args.scenes, args.frames, evaluate.VALIDATION_SEED)
    systems = {}
    for k, path in enumerate(args.checkpoints):
        model = SoundReactor.load(path)
        model.configure_sampling(nfe=args.nfe, guidance=args.guidance[k] if args.guidance else None)
        audios = [evaluate.stream_audio(model, c.frames, seed=i) for i, c in enumerate(clips)]
        name = args.names[k] if args.names else str(path)
        systems[name] = {"guidance": model.config.sampler.guidance, **breakdown(audios, clips)}
        vae = [evaluate.reconstruct(model.vae, c.audio) for c in clips]
        systems[f"{name}'s VAE"] = {"guidance": None, **breakdown(vae, clips)}
        print(f"{name}: {systems[name]['unpaired']}", flush=True)
    report = {
        "config": {
            "seed": evaluate.VALIDATION_SEED,
            "scenes": args.scenes,
            "frames": args.frames,
            "nfe": args.nfe,
        },
        "systems": systems,
    }
    prefix = args.out_prefix
    prefix.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(prefix.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    files.write_text(prefix.with_suffix(".md"), markdown(report))
    plot(prefix.with_suffix(".png"), report)
    print(markdown(report))


if __name__ == "__main__":
    main()
