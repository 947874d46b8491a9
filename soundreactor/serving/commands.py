"""`soundreactor triton-repo | serve | stream`: serving many streams with NVIDIA Triton Inference Server.

Only the standard library is imported here; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

BACKENDS = ("torch", "cuda-graph", "onnxruntime", "tensorrt")
FPS = 30  # the model's frame rate: videos are resampled to it, and `stream` paces at it


def _fail(message: str) -> SystemExit:
    """The CLI's error convention (cli.main): the message on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


def cmd_triton_repo(args: argparse.Namespace) -> None:
    from soundreactor.serving.params import EXPORT_BACKENDS, ServingParams
    from soundreactor.serving.repository import write_repository

    if not (args.checkpoint or args.engines):
        raise ValueError(
            "give --checkpoint FILE (torch, cuda-graph) or --engines DIR (onnxruntime, tensorrt)"
        )
    backend = args.backend or ("onnxruntime" if args.engines else "torch")
    checkpoint = str(Path(args.checkpoint).resolve()) if args.checkpoint else ""
    if checkpoint and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} (make one with `soundreactor init`)")
    fields = dict(backend=backend, checkpoint=checkpoint, nfe=args.nfe or 0, guidance=args.guidance or 0.0,
                  seed=args.seed, seed_policy=args.seed_policy, dtype=args.dtype, vae_dtype=args.vae_dtype,
                  providers=args.providers, threads=args.threads)  # fmt: skip
    if backend in EXPORT_BACKENDS:
        from soundreactor.export.manifest import load_manifest

        if not args.engines:
            raise ValueError(f"--backend {backend} needs --engines DIR (made by `soundreactor export`)")
        manifest = load_manifest(args.engines)  # the export fixes slots, frame size and NFE
        if args.nfe and args.nfe != manifest.nfe:
            raise ValueError(
                f"{args.engines} was exported for nfe={manifest.nfe}: re-export with --nfe {args.nfe}"
            )
        fields |= dict(engines=str(Path(args.engines).resolve()), slots=manifest.slots,
                       frame_hw=manifest.frame_hw, nfe=manifest.nfe)  # fmt: skip
    else:
        if args.engines:
            raise ValueError(
                f"--backend {backend} runs a checkpoint: drop --engines or pick onnxruntime/tensorrt"
            )
        fields |= dict(slots=args.slots, frame_hw=args.frame_size)
    params = ServingParams(**fields)
    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else None
    if backend in ("cuda-graph", "tensorrt") and not gpus:
        raise ValueError(f"--backend {backend} runs on GPUs: pass --gpus, e.g. --gpus 0 or --gpus 0,1")
    _check_repository_folder(Path(args.out), args.name)
    model_dir = write_repository(args.out, params, args.name, gpus, args.idle_timeout_s, args.queue_delay_us)
    where = f"one instance per GPU {gpus}" if gpus else "one CPU instance"
    print(f"wrote {model_dir}: {backend} backend, {params.slots} slots, {where}, frames {params.frame_hw}")
    print(
        f"{args.out} holds the {'export' if args.engines else 'checkpoint'} it serves: it can be moved as it is"
    )
    print(f"serve it with: soundreactor serve --repo {args.out}")


def _check_repository_folder(repo: Path, name: str) -> None:
    """A model repository holds model folders only: Triton refuses to start on anything else in it."""
    if repo.exists() and not repo.is_dir():
        raise ValueError(f"--out {repo} is a file: give a folder for the model repository")
    if not repo.is_dir():
        return
    others = sorted(p.name for p in repo.iterdir() if p.name != name and not (p / "config.pbtxt").is_file())
    if others:
        listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ValueError(
            f"--out {repo} holds {len(others)} entries that are not Triton models ({listed}), which would stop "
            "the server from starting: choose a new or empty folder"
        )


class _Stop(Exception):
    """SIGINT or SIGTERM arrived."""


def _stop(signum: int, frame: object) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # one stop at a time: the next signal must not cut it short
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop


def cmd_serve(args: argparse.Namespace) -> None:
    from soundreactor.serving.server import ServerError, TritonServer

    server = TritonServer(args.repo, args.host, args.http_port, args.grpc_port, args.metrics_port)
    for sig in (signal.SIGINT, signal.SIGTERM):  # also while starting: tritonserver never outlives us
        signal.signal(sig, _stop)
    try:
        server.start(timeout_s=args.start_timeout_s)
        print(
            f"serving {args.repo}: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url}"
        )
        print("stop with Ctrl-C (or SIGTERM)", flush=True)
        code = server.process.wait()
        raise _fail(f"tritonserver exited on its own with code {code}")
    except _Stop:
        pass
    except ServerError as err:
        raise _fail(str(err)) from None
    finally:
        code = server.stop()
    print(f"tritonserver stopped (exit code {code})")


def cmd_stream(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from soundreactor.media import SAMPLE_RATE, VideoReader, WavWriter, shown_name
    from soundreactor.outputs import WAV_SUFFIXES, check_outputs, check_suffix
    from soundreactor.pipeline import LatencyReport
    from soundreactor.serving.client import StreamClient, StreamError, StreamLost, StreamTimeout

    check_outputs([("--out", args.out)], [("--video", args.video)])
    check_suffix("--out", args.out, WAV_SUFFIXES, "a WAV file")
    period = 0.0 if args.no_pace else 1.0 / FPS
    times: list[float] = []
    out = None  # opened with the first audio: a stream that fails before it leaves no file
    # opened once, read in one pass (a pipe or standard input works as a file does)
    with VideoReader(args.video) as reader:
        info = reader.info
        try:
            with StreamClient(args.url, args.model, args.sequence_id, args.timeout_s) as stream:
                served = stream.frame_hw()
                if served != (info.height, info.width):  # scaled as `run` scales frames to its session
                    tqdm.write(
                        f"{reader.name} is {info.height}x{info.width} as displayed: frames are scaled to the "
                        f"served model's {served[0]}x{served[1]}"
                    )
                frames = reader.frames(fps=FPS, size=served)
                total = round(info.duration_s * FPS) or None  # a header's duration only sizes the bar
                with tqdm(total=total, unit="frame", desc="streaming") as progress:
                    start = time.perf_counter()
                    frame, index = next(frames, None), 0
                    while frame is not None:  # to the video's end, whatever its header says
                        following = next(frames, None)  # the last frame carries END, freeing the slot at once
                        time.sleep(max(0.0, start + index * period - time.perf_counter()))
                        sent = time.perf_counter()
                        audio = stream.step(frame, end=following is None)
                        times.append(time.perf_counter() - sent)
                        if out is None:
                            out = WavWriter(args.out, sample_rate=SAMPLE_RATE)
                        out.write(audio)
                        frame, index = following, index + 1
                        progress.update()
        except (StreamError, StreamLost, StreamTimeout) as err:
            shown = shown_name(args.out)
            written = f"{len(times)} frames written to {shown}" if times else f"nothing written to {shown}"
            raise _fail(f"{err} ({written})") from None
        finally:
            if out is not None:
                out.close()
    if not times:
        raise ValueError(f"{reader.name} has no frames to stream: nothing written to {shown_name(args.out)}")
    print(f"wrote {shown_name(args.out)}")
    print(LatencyReport.from_times(times, FPS).summary())


def correlation_id(text: str) -> int | str:
    """`--sequence-id`: a number from 1 to 2**63 - 1 (tritonclient sends int64), or any other text as a string ID."""
    if not text:
        raise argparse.ArgumentTypeError("a sequence ID is a number or a non-empty string")
    if not text.isdigit():
        return text
    number = int(text)
    if not 0 < number < 2**63:
        raise argparse.ArgumentTypeError(f"a numeric sequence ID is 1 to {2**63 - 1}, got {text}")
    return number


def add_commands(sub: argparse._SubParsersAction) -> None:
    from soundreactor.export.commands import frame_size  # numpy only, as the CLI already loads

    repo = sub.add_parser(
        "triton-repo", help="write a Triton model repository (sequence batcher) for serving"
    )
    repo.add_argument("--out", required=True, help="model repository folder")
    repo.add_argument(
        "--checkpoint", help="checkpoint (torch, cuda-graph); checked against an export if given"
    )
    repo.add_argument("--engines", metavar="DIR", help="export folder (onnxruntime, tensorrt)")
    repo.add_argument(
        "--backend", choices=BACKENDS, help="default: torch for a checkpoint, onnxruntime for DIR"
    )
    repo.add_argument("--name", default="soundreactor", help="model name clients ask for")
    repo.add_argument("--slots", type=int, default=8, help="streams per instance (exports fix their own)")
    repo.add_argument(
        "--frame-size", type=frame_size, default=(480, 854), help="HxW of the frames (exports fix theirs)"
    )
    repo.add_argument("--gpus", help="one instance per listed GPU, e.g. 0,1 (default: one CPU instance)")
    repo.add_argument("--nfe", type=int, choices=(1, 2, 4))
    repo.add_argument("--guidance", type=float)
    repo.add_argument("--seed", type=int, default=0)
    repo.add_argument("--seed-policy", choices=("sequence", "slot"), default="sequence",
                      help="noise seed: seed + correlation ID (default) or seed + slot")  # fmt: skip
    repo.add_argument(
        "--idle-timeout-s", type=float, default=5.0, help="a silent stream loses its slot after this"
    )
    repo.add_argument(
        "--queue-delay-us", type=int, default=0, help="wait this long to batch more slots per step"
    )
    repo.add_argument("--threads", type=int, default=1, help="intra-op threads per instance (CPU)")
    repo.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), default="bf16", help="cuda-graph precision"
    )
    repo.add_argument("--vae-dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    repo.add_argument("--providers", default="cpu", help="onnxruntime providers, e.g. cuda,cpu")
    repo.set_defaults(func=cmd_triton_repo)

    serve = sub.add_parser("serve", help="run tritonserver on a model repository until Ctrl-C / SIGTERM")
    serve.add_argument("--repo", required=True, help="made by `soundreactor triton-repo`")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--start-timeout-s", type=float, default=300.0, help="give up if not ready by then")
    serve.set_defaults(func=cmd_serve)

    stream = sub.add_parser("stream", help="stream a video to a server frame by frame, write the audio")
    stream.add_argument(
        "--url", required=True, help="HOST[:PORT] of the server's gRPC endpoint (port 8001 if not given)"
    )
    stream.add_argument("--video", required=True, help="video file, FIFO or pipe; - reads standard input")
    stream.add_argument("--out", required=True, help="output WAV (48 kHz stereo), written as audio arrives")
    stream.add_argument("--model", default="soundreactor")
    stream.add_argument("--sequence-id", type=correlation_id,
                        help="the stream's correlation ID: a number or a string (default: a random number)")  # fmt: skip
    stream.add_argument(
        "--no-pace", action="store_true", help="send each frame as soon as the last is answered"
    )
    stream.add_argument(
        "--timeout-s", type=float, default=10.0, help="per frame, including a wait for a slot"
    )
    stream.set_defaults(func=cmd_stream)
