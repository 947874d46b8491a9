"""`soundreactor live`: the web page and its server. Only the standard library is imported until the command runs."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys
from contextlib import ExitStack
from pathlib import Path

from soundreactor.threads import add_threads_argument

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ssl_context(certfile: str | None, keyfile: str | None):
    if not certfile:
        if keyfile:
            raise ValueError("--keyfile needs --certfile")
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as err:
        raise ValueError(f"cannot use --certfile {certfile} / --keyfile {keyfile}: {err}") from None
    return context


async def serve(app, host: str, port: int, ssl, on_ready) -> None:
    """Run `app` until Ctrl-C or SIGTERM, calling `on_ready(url)` once the socket listens.

    The loop's own signal handlers wake it at once (a Python-level handler would wait for the next socket event
    when the signal lands on one of the model's threads), also where the shell started us with SIGINT ignored.
    """
    from aiohttp import web

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, handle_signals=False)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl)
        await site.start()
        bound = runner.addresses[0][1]
        name = f"[{host}]" if ":" in host else host
        on_ready(f"{'https' if ssl else 'http'}://{name}:{bound}/")
        await stop.wait()
    finally:
        await runner.cleanup()  # closes the sockets, frees the slots, finishes the recordings
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def cmd_live(args: argparse.Namespace) -> None:
    try:
        import aiohttp  # noqa: F401 (the live extra)
    except ImportError:
        raise ValueError(
            "soundreactor live needs aiohttp: pip install 'soundreactor[live]' (or -e '.[live]' in a checkout)"
        ) from None
    from soundreactor.live.engines import build_streams, checkpoint_path, default_backend
    from soundreactor.live.server import create_app
    from soundreactor.live.slots import SlotStepper

    if args.slots < 1:
        raise ValueError(f"--slots must be at least 1, got {args.slots}")
    context = ssl_context(args.certfile, args.keyfile)
    if context is None and not is_loopback(args.host):
        print(
            f"warning: serving on {args.host} over plain HTTP: browsers give the camera and screen capture only to "
            "https:// pages or localhost; pass --certfile/--keyfile, or reach it through an SSH tunnel to localhost",
            file=sys.stderr,
        )
    if args.record:
        record = Path(args.record)
        if record.exists() and not record.is_dir():
            raise ValueError(f"--record {record} is a file: give a folder for the recordings")
    with ExitStack() as resources:
        if args.triton:
            from soundreactor.live.relay import TritonRelay

            engine = TritonRelay(
                args.triton, args.slots, args.model, args.max_lag_ms / 1e3, args.queue_frames
            )
            info = {"backend": f"triton {args.triton}", "checkpoint": args.model, "checkpoint_path": None,
                    "triton": args.triton}  # fmt: skip
        else:
            checkpoint = checkpoint_path(args.checkpoint)
            backend = args.backend or default_backend()
            streams = build_streams(
                checkpoint, backend, args.slots, args.seed, args.frame_size, args.threads, resources
            )
            engine = SlotStepper(
                streams, args.seed, args.batch_wait_ms / 1e3, args.max_lag_ms / 1e3, args.queue_frames
            )
            name = "default" if args.checkpoint in (None, "default") else checkpoint.name
            info = {"backend": backend, "checkpoint": name, "checkpoint_path": str(checkpoint)}
        app = create_app(engine, info, Path(args.record) if args.record else None)

        def ready(url: str) -> None:
            h, w = engine.frame_hw
            print(f"live: {info['backend']}, {engine.slots} slots, frames {h}x{w}")
            print(f"open {url} (stop with Ctrl-C)", flush=True)

        asyncio.run(serve(app, args.host, args.port, context, ready))
        kept = f"; recordings in {args.record}" if args.record else ""
        raise KeyboardInterrupt(f"stopped{kept}")  # the exit status of a Ctrl-C (130), without a traceback


def add_commands(sub: argparse._SubParsersAction) -> None:
    from soundreactor.export.commands import frame_size

    live = sub.add_parser("live", help="a web page: camera, screen or video in, audio out as it plays")
    live.add_argument(
        "--checkpoint", help="checkpoint file, or `default` (the built-in default model; the default)"
    )
    live.add_argument(
        "--backend",
        choices=("torch", "onnxruntime", "cuda-graph"),
        help="default: cuda-graph with a GPU, else onnxruntime (a temporary export of the checkpoint)",
    )
    live.add_argument(
        "--slots",
        type=int,
        default=4,
        help="concurrent streams (default 4; an onnxruntime step costs all of them)",
    )
    live.add_argument(
        "--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface; add TLS)"
    )
    live.add_argument("--port", type=int, default=8080)
    live.add_argument("--certfile", help="TLS certificate (PEM): browsers need https off localhost")
    live.add_argument("--keyfile", help="its private key (PEM), if not inside --certfile")
    live.add_argument("--record", metavar="DIR", help="keep each stream as DIR/<stream>.mkv and .json")
    live.add_argument(
        "--triton", metavar="URL", help="relay streams to `soundreactor serve` at HOST:GRPC_PORT"
    )
    live.add_argument("--model", default="soundreactor", help="the served model's name (with --triton)")
    live.add_argument("--seed", type=int, default=0, help="stream k of the slots draws noise seeded seed + k")
    live.add_argument(
        "--frame-size",
        type=frame_size,
        metavar="HxW",
        help="frames the page sends (default: the model's vision size)",
    )
    add_threads_argument(live)
    live.add_argument("--batch-wait-ms", type=float, default=5.0,
                      help="longest wait for the other streams' frames before a step (default 5; 33 batches "
                           "out-of-phase streams into one step a frame period: 3x the streams on CPU, <=33 ms more "
                           "latency)")  # fmt: skip
    live.add_argument("--max-lag-ms", type=float, default=100.0,
                      help="frames that waited longer are skipped and the page told it is behind")  # fmt: skip
    live.add_argument("--queue-frames", type=int, default=4, help="frames a stream may have waiting")
    live.set_defaults(func=cmd_live)
