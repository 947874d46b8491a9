"""`soundreactor calibrate`: quantize an fp32 export directory and, with --report, measure what it costs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Exit status 1 when the report's verdict is NOT acceptable (the graphs are written either way)."""
    from soundreactor.calibration.calibrate import calibrate, check_components
    from soundreactor.calibration.chain import load_frames
    from soundreactor.calibration.quantize import scheme
    from soundreactor.export.manifest import load_manifest

    manifest = load_manifest(args.engines)
    components = check_components([c.strip() for c in args.components.split(",") if c.strip()])
    scheme(args.scheme)  # fail on a bad name before the frames are decoded
    source = load_frames(args.video, args.frames, manifest.frame_hw, manifest.config["fps"], args.seed)
    start = time.perf_counter()
    calibrate(args.engines, args.out, source, components, args.scheme, args.seed)
    print(
        f"wrote {args.out}: {', '.join(components)} as {args.scheme} Q/DQ, calibrated on {args.frames} frames of "
        f"{args.video or 'the demo scene'} in {time.perf_counter() - start:.0f} s"
    )
    if args.report:
        from soundreactor.calibration.report import evaluate

        report = evaluate(args.engines, args.out, source, args.seed, args.ort_kernels)
        for path in report.save(args.out):
            print(f"wrote {path}")
        for metric in report.end_to_end:
            print(f"  end to end: {metric.describe()}")
        for name, ms in report.components.items():
            for metric in ms:
                print(f"  {name}: {metric.describe()}")
        for metric in report.ort_kernels or ():
            print(f"  not judged, ORT integer kernels on this CPU: {metric.describe()}")
        print(f"verdict: {args.scheme} {'acceptable' if report.acceptable else 'NOT acceptable'}")
        if not report.acceptable:
            return 1
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    # Names only: the modules that implement them import onnx, which `run --backend onnxruntime` must not need.
    from soundreactor.calibration.options import DEFAULT_COMPONENTS, SCHEME_NAMES

    calibrate = subparsers.add_parser(
        "calibrate", help="write INT8 or FP8 (Q/DQ) graphs of an fp32 export, with an accuracy report"
    )
    calibrate.add_argument(
        "--engines", required=True, type=Path, help="fp32 export directory (`soundreactor export`)"
    )
    calibrate.add_argument("--out", required=True, type=Path, help="directory for the quantized export")
    calibrate.add_argument(
        "--video", type=Path, help="calibration video at the export's frame size (default: demo scene)"
    )
    calibrate.add_argument(
        "--frames", type=int, default=60, help="frames to calibrate and evaluate on (default 60)"
    )
    calibrate.add_argument(
        "--components",
        default=",".join(DEFAULT_COMPONENTS),
        help=f"graphs to quantize, comma-separated (default {','.join(DEFAULT_COMPONENTS)}; vae_decoder too if asked)",
    )
    calibrate.add_argument(
        "--scheme",
        choices=SCHEME_NAMES,
        default="int8",
        help="int8: symmetric, max-calibrated; fp8: E4M3, std-calibrated (default int8)",
    )
    calibrate.add_argument("--seed", type=int, default=0, help="noise seed (and demo scene seed)")
    calibrate.add_argument(
        "--report", action="store_true", help="also write calibration_report.{json,md,png}"
    )
    calibrate.add_argument(
        "--ort-kernels",
        action="store_true",
        help="with --report, also measure end to end on ONNX Runtime's fused integer kernels (depends on the "
        "CPU's instruction set; shown, not judged)",
    )
    calibrate.set_defaults(func=cmd_calibrate)
