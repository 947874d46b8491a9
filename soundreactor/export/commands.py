"""`soundreactor export` and `soundreactor check`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def frame_size(text: str) -> tuple[int, int]:
    """'480x854' -> (480, 854)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"frame size must look like 480x854 (height x width), got {text!r}"
        ) from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"frame size must be positive, got {text!r}")
    return height, width


def cmd_export(args: argparse.Namespace) -> None:
    from soundreactor.export.exporter import check_replaceable, export_model
    from soundreactor.export.manifest import file_sha256
    from soundreactor.model.soundreactor import SoundReactor
    from soundreactor.outputs import check_outputs

    out = Path(args.out)
    check_outputs([("--out", out)], [("--checkpoint", args.checkpoint)], directories=True)
    check_replaceable(out)
    model = SoundReactor.load(args.checkpoint, input_hw=args.frame_size)
    model.configure_sampling(nfe=args.nfe, guidance=args.guidance)
    start = time.perf_counter()
    manifest = export_model(
        model,
        out,
        args.slots,
        args.precision,
        checkpoint_sha256=file_sha256(args.checkpoint),
        on_replace=lambda d: print(f"replaced the export that was in {d}"),
    )
    for name in manifest.files:
        print(f"wrote {out / name} ({(out / name).stat().st_size / 2**20:.1f} MiB)")
    h, w = manifest.frame_hw
    print(
        f"exported {len(manifest.graphs)} graphs in {time.perf_counter() - start:.0f} s: {manifest.preset} preset, "
        f"{manifest.precision}, {manifest.slots} slot(s), frames {h}x{w}, nfe {manifest.nfe}, opset {manifest.opset}"
    )


def cmd_check(args: argparse.Namespace) -> None:
    from soundreactor.export.check import check_export_dir

    report = check_export_dir(args.dir)
    print(report.format())
    if not report.ok:
        sys.exit(1)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser("export", help="export the per-frame ONNX graphs and their manifest")
    export.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint made by `soundreactor init`, or `default` for the shipped model",
    )
    export.add_argument(
        "--out", required=True, help="output directory (an existing export there is replaced when done)"
    )
    export.add_argument(
        "--nfe", type=int, choices=(1, 2, 4), help="sampler steps (default: the checkpoint's)"
    )
    export.add_argument("--guidance", type=float, help="default guidance weight stored in the manifest")
    export.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    export.add_argument(
        "--frame-size",
        type=frame_size,
        metavar="HxW",
        help="input frame size, e.g. 480x854 (default: no resize)",
    )
    export.add_argument("--slots", type=int, default=1, help="streams stepped together (the graphs' batch)")
    export.set_defaults(func=cmd_export)

    check = subparsers.add_parser("check", help="validate an export directory for TensorRT")
    check.add_argument("dir")
    check.set_defaults(func=cmd_check)
