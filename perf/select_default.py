"""Choices of the default model made on validation scenes, never on the held-out ones it is reported on.

    OMP_NUM_THREADS=1 python perf/select_default.py OUT_PREFIX CHECKPOINT [CHECKPOINT ...] --guidance 2 3 4.5

Streams every checkpoint at every guidance (NFE 4, the checkpoint's step times) over the VAE's validation scenes
(`evaluate.VALIDATION_SEED`, 16 x 150 frames by default: about 320 onsets; rounds 1-4 chose on 8 x 60, 73 onsets,
where one or two onsets decided between close candidates) and scores them with `evaluate.score`. Writes
OUT_PREFIX.json and OUT_PREFIX.md, one row per (checkpoint, guidance), with `quality` (stages.vae_quality of the model's audio:
onset F1, envelope and gap ratio; 0 where one is 0) as the selecting figure: the row with the highest is "best" in
the JSON and its guidance the last line printed (perf/train_default.sh reads it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from soundreactor.model.soundreactor import SoundReactor
from soundreactor.training import evaluate
from soundreactor.training.stages import vae_quality

COLUMNS = (
    "quality",
    "onset_f1",
    "onset_precision",
    "onset_recall",
    "pan_corr",
    "loudness_error_db",
    "logmel_distance_db",
    "envelope_corr",
    "gap_ratio",
    "silence_dbfs",
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_prefix", type=Path)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    parser.add_argument("--nfe", type=int, default=4)
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--frames", type=int, default=150)
    args = parser.parse_args()
    torch.set_num_threads(1)
    clips = evaluate.held_out_clips(args.scenes, args.frames, evaluate.VALIDATION_SEED)
    rows = []
    for path in args.checkpoints:
        model = SoundReactor.load(path)
        for guidance in args.guidance:
            model.configure_sampling(nfe=args.nfe, guidance=guidance)
            audios = [evaluate.stream_audio(model, c.frames, seed=i) for i, c in enumerate(clips)]
            figures = evaluate.score(audios, clips)
            rows.append(
                {"checkpoint": str(path), "guidance": guidance, "quality": vae_quality(figures), **figures}
            )
            print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda r: r["quality"])
    config = {"seed": evaluate.VALIDATION_SEED, "scenes": args.scenes, "frames": args.frames, "nfe": args.nfe}
    args.out_prefix.parent.mkdir(parents=True, exist_ok=True)
    args.out_prefix.with_suffix(".json").write_text(
        json.dumps({"config": config, "rows": rows, "best": best}, indent=1) + "\n"
    )
    lines = [
        f"Validation scenes (seed {config['seed']}, {args.scenes} x {args.frames} frames), NFE {args.nfe}.",
        "",
        "| checkpoint | guidance | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for r in rows:
        cells = " | ".join("n/a" if r[k] is None else f"{r[k]:.3g}" for k in COLUMNS)
        name = Path(r["checkpoint"])
        lines.append(f"| {name.parent.name}/{name.name} | {r['guidance']:g} | {cells} |")
    lines += ["", f"Best by quality: {best['checkpoint']} at guidance {best['guidance']:g}."]
    args.out_prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"{best['guidance']:g}")


if __name__ == "__main__":
    main()
