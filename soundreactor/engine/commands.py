"""`soundreactor build` and `soundreactor compare`.

Engines live next to the graphs they were built from: `--engines DIR` is an export directory.
"""

from __future__ import annotations

import argparse
import sys
import time


def cmd_build(args: argparse.Namespace) -> None:
    from soundreactor.engine.builder import EngineBuildError, build_engines
    from soundreactor.engine.cache import BuildOptions
    from soundreactor.engine.tensorrt_env import (
        TensorRTMissing,
        current_gpu,
        require_cudart,
        require_tensorrt,
    )
    from soundreactor.export.manifest import load_manifest

    load_manifest(args.engines)  # a wrong directory is reported before a missing TensorRT
    try:
        trt, cudart = require_tensorrt(), require_cudart()
    except TensorRTMissing as err:
        print(f"error: `soundreactor build` needs TensorRT: {err}", file=sys.stderr)
        sys.exit(2)
    options = BuildOptions(args.version_compatible, args.refittable, args.workspace_mib)
    start = time.perf_counter()
    try:
        results = build_engines(args.engines, trt.__version__, current_gpu(cudart), options, force=args.force)
    except EngineBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    built = sum(r.built for r in results)
    print(
        f"{built} engine(s) built, {len(results) - built} cached, in {time.perf_counter() - start:.0f} s: {args.engines}"
    )


def cmd_compare(args: argparse.Namespace) -> None:
    from soundreactor.engine.compare import compare_directory
    from soundreactor.engine.tensorrt_env import TensorRTMissing

    try:
        rows = compare_directory(args.engines, args.atol, args.rtol, args.seed)
    except TensorRTMissing as err:
        print(f"error: `soundreactor compare` needs TensorRT: {err}", file=sys.stderr)
        sys.exit(2)
    if not all(row.passed for row in rows):
        sys.exit(1)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    build = subparsers.add_parser(
        "build", help="build TensorRT engines for an export directory (cached per GPU and TensorRT version)"
    )
    build.add_argument(
        "--engines", required=True, metavar="DIR", help="export directory; engines are stored in it"
    )
    build.add_argument(
        "--version-compatible",
        action="store_true",
        help="engines that also run on later TensorRT of the same major",
    )
    build.add_argument("--refittable", action="store_true", help="engines whose weights can be refit")
    build.add_argument("--workspace-mib", type=int, help="builder workspace limit (default: TensorRT's)")
    build.add_argument("--force", action="store_true", help="rebuild even where a matching engine is cached")
    build.set_defaults(func=cmd_build)

    compare = subparsers.add_parser(
        "compare",
        help="run the same inputs through ONNX Runtime and the TensorRT engines, report the differences",
    )
    compare.add_argument(
        "--engines", required=True, metavar="DIR", help="export directory with built engines"
    )
    compare.add_argument(
        "--atol", type=float, help="absolute tolerance (default by precision: fp32 1e-2, fp16 5e-2)"
    )
    compare.add_argument("--rtol", type=float, help="relative tolerance (same defaults)")
    compare.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    compare.set_defaults(func=cmd_compare)
