"""Command line: `soundreactor init | run | demo | export | check | build | compare | calibrate | train-vae | train |
evaluate | triton-repo | serve | stream | live`."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from soundreactor.calibration.commands import add_commands as add_calibration_commands
from soundreactor.config import PRESETS
from soundreactor.default_model import CHECKPOINT as DEFAULT_CHECKPOINT
from soundreactor.engine.commands import add_commands as add_engine_commands
from soundreactor.engine.tensorrt_env import TensorRTMissing
from soundreactor.export.commands import add_commands as add_export_commands
from soundreactor.live.commands import add_commands as add_live_commands
from soundreactor.outputs import MP4_SUFFIXES, WAV_SUFFIXES, OutputPathError, check_outputs, check_suffix
from soundreactor.serving.commands import add_commands as add_serving_commands
from soundreactor.threads import add_threads_argument, set_torch_threads
from soundreactor.training.commands import add_commands as add_training_commands
from soundreactor.training.evaluate import add_evaluate_command

if TYPE_CHECKING:
    from soundreactor.media import VideoInfo

BACKENDS = ("torch", "cuda-graph", "onnxruntime", "tensorrt")
DEFAULT_NAME = "default"  # `--checkpoint default`: the shipped model (a file of that name: ./default)


def _session(args: argparse.Namespace, video: VideoInfo):
    """One stream on the requested backend: eager or CUDA-graph torch over a checkpoint (sized to `video`), or an
    export directory."""
    from soundreactor.runtime.session import Session

    if args.backend in ("onnxruntime", "tensorrt"):
        if not args.engines:
            raise ValueError(f"--backend {args.backend} needs --engines DIR (made by `soundreactor export`)")
        if args.backend == "onnxruntime":
            from soundreactor.runtime.onnxruntime_backend import ort_session_from_dir

            providers = args.providers.split(",")
            return ort_session_from_dir(
                args.engines, args.seed, providers, args.checkpoint, args.nfe, args.guidance, args.threads
            )
        from soundreactor.runtime.tensorrt_backend import trt_session_from_dir

        return trt_session_from_dir(args.engines, args.seed, args.checkpoint, args.nfe, args.guidance)

    import torch

    from soundreactor.model.soundreactor import SoundReactor

    if not args.checkpoint:
        args.checkpoint = str(DEFAULT_CHECKPOINT)
        print(f"no --checkpoint: running the default model ({DEFAULT_CHECKPOINT.name}, small preset)")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {args.device}: this torch {torch.__version__} sees no CUDA device; run on a GPU machine with "
            "a CUDA build of torch, or use --device cpu"
        )
    model = SoundReactor.load(args.checkpoint, input_hw=(video.height, video.width))
    model.configure_sampling(nfe=args.nfe, guidance=args.guidance)
    set_torch_threads(model.config.parameter_estimate(), args.threads)
    if args.backend == "torch":
        from soundreactor.runtime.torch_backend import TorchStreams

        return Session(TorchStreams(model, seed=args.seed, device=args.device))
    from soundreactor.runtime.cuda_graph_backend import GraphStreams

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    streams = GraphStreams(
        model, seed=args.seed, device=args.device, dtype=dtypes[args.dtype], vae_dtype=dtypes[args.vae_dtype]
    )
    return Session(streams)


def cmd_init(args: argparse.Namespace) -> None:
    from soundreactor.model.soundreactor import init_model

    check_outputs([("--out", args.out)], [("--dinov2", args.dinov2), ("--vae", args.vae)])
    if Path(args.out).exists() and not args.force:
        raise OutputPathError(f"--out {args.out} exists; give --force to replace it, or choose another --out")
    model, notes = init_model(
        args.preset,
        seed=args.seed,
        dinov2=args.dinov2,
        vae=args.vae,
        vae_prefix=args.vae_prefix,
        vae_weights=args.vae_weights,
    )
    model.save(args.out)
    for line in notes:
        print(line)
    print(f"wrote {args.out} ({args.preset} preset)")


def cmd_run(args: argparse.Namespace) -> None:
    from soundreactor.media import VideoReader, mux, shown_name
    from soundreactor.pipeline import Interrupted, NonFiniteAudio, video_to_wav

    inputs = [("--video", args.video), ("--checkpoint", args.checkpoint), ("--engines", args.engines)]
    check_outputs([("--out", args.out), ("--mux", args.mux)], inputs)
    check_suffix("--out", args.out, WAV_SUFFIXES, "a WAV file")
    if args.mux:
        check_suffix("--mux", args.mux, MP4_SUFFIXES, "an MP4 file")
    out = shown_name(args.out)
    unmuxed = f"; --mux {args.mux} was not written" if args.mux else ""
    # A pipe's video is kept beside the MP4 as it is read, for muxing; a file is simply read again.
    copy = Path(f"{args.mux}.video.partial") if args.mux else None
    try:
        # opened (and its first frame decoded) before a model loads, so a bad video costs nothing
        with VideoReader(args.video, keep=copy) as reader:
            session = _session(args, reader.info)
            try:
                report = video_to_wav(session, reader, args.out)
            except Interrupted as err:
                raise Interrupted(f"{err}{unmuxed}") from None
            except NonFiniteAudio as err:
                raise NonFiniteAudio(f"{err}{unmuxed}") from None
            video = reader.finish()
        print(f"wrote {out}")
        if args.mux:
            try:
                for line in mux(video, args.out, args.mux):
                    print(f"  {line}")
            except KeyboardInterrupt:
                raise Interrupted(
                    f"interrupted while muxing: {args.mux} was not written; {out} is complete"
                ) from None
            except (OSError, ValueError) as err:  # a disk filling up, a WAV holding NaN
                raise ValueError(f"{err}; {args.mux} was not written, {out} is complete") from None
            print(f"wrote {shown_name(args.mux)}")
    finally:
        if copy is not None:
            copy.unlink(missing_ok=True)
    print(report.summary())


DEMO_HW = (224, 448)  # 4x the small preset's 56x112 vision size: its frames downsample exactly


def cmd_demo(args: argparse.Namespace) -> None:
    import soundfile

    from soundreactor.default_model import load_default
    from soundreactor.demo_video import write_video
    from soundreactor.media import mux
    from soundreactor.model.soundreactor import init_model
    from soundreactor.pipeline import video_to_wav
    from soundreactor.runtime.session import Session
    from soundreactor.runtime.torch_backend import TorchStreams
    from soundreactor.training.evaluate import FPS, score, silence_summary
    from soundreactor.training.synthetic import make_clip

    if not args.seconds > 0:
        raise ValueError(f"--seconds must be positive, got {args.seconds:g}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # a scene of the family the default model was trained on (not one it saw), rendered at 4x its vision size
    scene = make_clip(args.seed, max(1, round(args.seconds * FPS)), hw=DEMO_HW)
    video = write_video(out / "demo_input.mp4", scene.frames, DEMO_HW, FPS)
    impacts = len({e.sample for e in scene.events})  # simultaneous impacts are one onset
    print(f"wrote {video} (bouncing, colliding shapes, {args.seconds:g} s at 30 fps, {impacts} impacts)")
    if args.random:
        model, _ = init_model("tiny", seed=args.seed, input_hw=DEMO_HW)
        weights = "tiny preset, random weights"
    else:
        model = load_default(DEMO_HW)
        weights = "the default model (small preset, trained on synthetic scenes)"
    model.configure_sampling(nfe=args.nfe)
    set_torch_threads(model.config.parameter_estimate(), args.threads)
    session = Session(TorchStreams(model, seed=args.seed))
    report = video_to_wav(session, video, out / "demo.wav")
    mux(video, out / "demo.wav", out / "demo.mp4")
    print(f"wrote {out / 'demo.wav'} and {out / 'demo.mp4'} ({weights}, seed {args.seed})")
    audio = soundfile.read(out / "demo.wav", dtype="float32", always_2d=True)[0].T
    figures = score([audio], [scene])
    print(
        f"impacts heard where seen: onset F1 {figures['onset_f1']:.2f} (precision "
        f"{figures['onset_precision']:.2f}, recall {figures['onset_recall']:.2f}) against the scene's "
        f"{figures['onsets_true']} impacts, +-1 frame"
    )
    print(silence_summary(figures, score([scene.audio], [scene])))
    print(report.summary())
    print(f"demo finished in {time.perf_counter() - start:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soundreactor", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser(
        "init", help="build a checkpoint: official DINOv2/VAE weights where given, seeded rest"
    )
    init.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    init.add_argument("--dinov2", help="official dinov2_vits14_reg4_pretrain.pth")
    init.add_argument("--vae", help="official sr_causal_ds_1600_dim_64.ckpt (or .safetensors)")
    init.add_argument(
        "--vae-prefix", help="key prefix of the VAE copy to read when --vae holds several (e.g. autoencoder.)"
    )
    init.add_argument(
        "--vae-weights",
        choices=("ema", "online"),
        default="ema",
        help="with both in --vae: the EMA copy (default, as stable-audio-tools exports it) or the online weights",
    )
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--out", required=True)
    init.add_argument("--force", action="store_true", help="replace --out if it exists")
    init.set_defaults(func=cmd_init)

    run = sub.add_parser("run", help="generate audio for a video, frame by frame")
    run.add_argument("--video", required=True, help="video file, FIFO or pipe; - reads standard input")
    run.add_argument(
        "--checkpoint",
        help="checkpoint, or `default` for the shipped model (torch backends: the default when omitted); "
        "checked against an export if given",
    )
    run.add_argument("--backend", choices=BACKENDS, default="torch")
    run.add_argument("--engines", metavar="DIR", help="export directory (onnxruntime, tensorrt backends)")
    run.add_argument("--providers", default="cpu", help="onnxruntime providers, e.g. cuda,cpu")
    run.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="bf16", help="cuda-graph precision")
    run.add_argument(
        "--vae-dtype",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="cuda-graph VAE decoder precision (bf16 costs audio accuracy: README, Many streams on one GPU)",
    )
    run.add_argument("--out", required=True, help="output WAV (48 kHz stereo), named .wav")
    run.add_argument("--mux", help="also write a copy of the video with the audio muxed in, named .mp4")
    run.add_argument("--nfe", type=int, choices=(1, 2, 4))
    run.add_argument("--guidance", type=float)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="cpu")
    add_threads_argument(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="the main job on a built-in default: no downloads, no GPU")
    demo.add_argument("--out-dir", default="out/demo")
    demo.add_argument("--seconds", type=float, default=4.0)
    demo.add_argument("--nfe", type=int, choices=(1, 2, 4), default=4)
    demo.add_argument("--seed", type=int, default=0, help="the scene and the sampler's noise")
    demo.add_argument(
        "--random", action="store_true", help="tiny preset with random weights instead of the default model"
    )
    add_threads_argument(demo)
    demo.set_defaults(func=cmd_demo)

    add_export_commands(sub)
    add_engine_commands(sub)
    add_calibration_commands(sub)
    add_training_commands(sub)
    add_evaluate_command(sub)
    add_serving_commands(sub)
    add_live_commands(sub)
    return parser


def version() -> str:
    try:
        return metadata.version("soundreactor")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status 0, 1 for a negative verdict (`calibrate --report`: NOT acceptable), 2 for an
    error (one `error:` line), 130 when interrupted by Ctrl-C or SIGTERM (what was kept on disk is printed)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "checkpoint", None) == DEFAULT_NAME:
        args.checkpoint = str(DEFAULT_CHECKPOINT)
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    if in_main_thread:
        previous = signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop is a Ctrl-C
    try:
        status = args.func(args)
    except KeyboardInterrupt as err:
        print(str(err) or "interrupted", file=sys.stderr)
        return 130
    except (
        ModuleNotFoundError
    ) as err:  # an optional dependency of this command (the parser itself needs none)
        print(
            f"error: `soundreactor {args.command}` needs the {err.name} package, which is not installed "
            f"({err}); install it with pip",
            file=sys.stderr,
        )
        return 2
    except (OSError, ValueError, TensorRTMissing) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return status or 0
