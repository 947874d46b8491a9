"""The built-in default model: the `small` preset trained here on the built-in synthetic scenes.

`perf/train_default.sh` trains it (VAE, diffusion pretraining, ECT) and publishes it with
`python -m soundreactor.default_model RUN/ect/model.safetensors`, which writes the package's copy (float32 weights
stored as float16: 3 MB) and its evaluation report, the figures `tests/test_default_model.py` reproduces.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
CHECKPOINT = ASSETS / "default_small.safetensors"
REPORT = ASSETS / "default_small_evaluation.json"
# The report's evaluation: few enough held-out frames for CI to repeat it on 2 cores in seconds
REPORT_SCENES, REPORT_FRAMES, REPORT_NFES = 4, 120, (4, 1)


def load_default(input_hw: tuple[int, int] | None = None):
    """The default SoundReactor (eval mode, float32) for frames of `input_hw` (default: its 56x112 vision size).

    Raises FileNotFoundError naming the recipe when the package was installed without its checkpoint.
    """
    from soundreactor.model.soundreactor import SoundReactor

    if not CHECKPOINT.is_file():
        raise FileNotFoundError(
            f"the default checkpoint {CHECKPOINT} is missing from this installation: reinstall soundreactor, or "
            "train one with `bash perf/train_default.sh` (use --random for random weights)"
        )
    return SoundReactor.load(CHECKPOINT, input_hw=input_hw)


def evaluate_default(checkpoint: str | Path = CHECKPOINT, nfes: tuple[int, ...] = REPORT_NFES) -> dict:
    """The report's figures of a checkpoint: `evaluate.score` of its streamed audio on REPORT_SCENES held-out
    scenes x REPORT_FRAMES frames at each of `nfes`, guidance as stored, sampler seed 0 + scene index.

    Returns {"nfe4": score, "nfe1": score, "ground_truth": score, "config": {...}} (one "nfeN" per NFE).
    """
    from soundreactor.model.soundreactor import SoundReactor
    from soundreactor.training import evaluate

    clips = evaluate.held_out_clips(REPORT_SCENES, REPORT_FRAMES)
    model = SoundReactor.load(checkpoint)
    report: dict = {
        "config": {"scenes": REPORT_SCENES, "frames": REPORT_FRAMES, "seed": evaluate.EVAL_SEED},
        "ground_truth": evaluate.score([c.audio for c in clips], clips),
    }
    for nfe in nfes:
        model.configure_sampling(nfe=nfe)
        audios = [evaluate.stream_audio(model, c.frames, seed=i) for i, c in enumerate(clips)]
        report[f"nfe{nfe}"] = evaluate.score(audios, clips)
    return report


def publish(
    source: str | Path, checkpoint: Path = CHECKPOINT, report: Path = REPORT, guidance: float | None = None
) -> dict:
    """Write `source`'s weights to `checkpoint` (float32 stored as float16; `guidance`, where given, as its stored
    guidance weight) and the evaluation of that file, as loaded, to `report`. Both are made beside their targets
    and renamed into place once the evaluation is done, so an interrupted or failed publish leaves the previous
    pair, never a model beside another's report. Returns the report."""
    from soundreactor.checkpoint import load_checkpoint, save_checkpoint
    from soundreactor.files import write_text

    config, tensors = load_checkpoint(source)
    if guidance is not None:
        config = config.replace(sampler={"guidance": guidance})
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    staged = [path.with_name(f".{path.name}.new") for path in (checkpoint, report)]
    try:
        save_checkpoint(staged[0], config, tensors, {"source": Path(source).name}, float32_as="float16")
        figures = evaluate_default(staged[0])
        write_text(staged[1], json.dumps(figures, indent=2) + "\n")
        os.replace(staged[0], checkpoint)
        os.replace(staged[1], report)
    finally:
        for path in staged:
            path.unlink(missing_ok=True)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m soundreactor.default_model", description=__doc__)
    parser.add_argument("source", help="the trained checkpoint to publish (RUN/ect/model.safetensors)")
    parser.add_argument(
        "--guidance",
        type=float,
        help="guidance weight to store (default: the source's); choose it on validation scenes "
        "(perf/select_default.py), never on the held-out ones the report uses",
    )
    args = parser.parse_args(argv)
    figures = publish(args.source, guidance=args.guidance)
    for name in ("ground_truth", *(f"nfe{n}" for n in REPORT_NFES)):
        f = figures[name]
        print(
            f"{name}: onset F1 {f['onset_f1']:.3f} (P {f['onset_precision']:.3f}, R {f['onset_recall']:.3f}), "
            f"pan corr {f['pan_corr'] or 0:.3f}, loudness error {f['loudness_error_db']:.2f} dB"
        )
    print(f"wrote {CHECKPOINT} and {REPORT}")


if __name__ == "__main__":
    main()
