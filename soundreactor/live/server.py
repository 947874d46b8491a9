"""The aiohttp app: the page (GET / and its static files), GET /config, and the WebSocket GET /ws (protocol.py).

One connection = one lane of the engine (a slot of the in-process `SlotStepper`, or a Triton sequence through the
`TritonRelay`). The handler task reads the socket (hello, frames, stop), a writer task sends the lane's outbox, so
a client that stops reading never blocks the model or other streams. However the connection ends, its slot is
freed and its recording finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shlex
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import WSMsgType, web

from soundreactor.live import protocol
from soundreactor.live.frames import JpegDecoder
from soundreactor.live.lanes import Lane
from soundreactor.live.protocol import ProtocolError
from soundreactor.live.recorder import Recorder

STATIC = Path(__file__).parent / "static"
HELLO_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
log = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", object)
INFO = web.AppKey("info", dict)
RECORD = web.AppKey("record", object)
SOCKETS = web.AppKey("sockets", weakref.WeakSet)
RECORDING = web.AppKey("recording", ThreadPoolExecutor)
ENDING = web.AppKey("ending", set)


def create_app(engine, info: dict, record_dir: Path | None = None) -> web.Application:
    """`engine`: a SlotStepper or TritonRelay (started and stopped with the app). `info`: the recording's and
    /config's description of the model: {"backend", "checkpoint", "checkpoint_path"}."""
    app = web.Application()
    app[ENGINE], app[INFO], app[RECORD] = engine, info, record_dir
    app[SOCKETS] = weakref.WeakSet()
    app[ENDING] = set()
    app[RECORDING] = ThreadPoolExecutor(1, thread_name_prefix="live-record")
    app.router.add_get("/", index)
    app.router.add_get("/config", config)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/{name}", static_file)
    app.on_startup.append(_start)
    app.on_shutdown.append(_close_sockets)
    app.on_cleanup.append(_stop)
    return app


async def _start(app: web.Application) -> None:
    await app[ENGINE].start()


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS]):
        await ws.close(code=1001, message=b"server stopping")


async def _stop(app: web.Application) -> None:
    await asyncio.gather(*app[ENDING], return_exceptions=True)
    await app[ENGINE].stop()
    app[RECORDING].shutdown(wait=True)  # every recording's close and renames are done


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def static_file(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    path = STATIC / name
    if name.startswith(".") or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path)


def config_of(app: web.Application) -> dict:
    engine, info = app[ENGINE], app[INFO]
    return {
        "protocol": protocol.PROTOCOL,
        "frame_size": list(engine.frame_hw),
        "fps": protocol.FPS,
        "sample_rate": engine.sample_rate,
        "samples_per_frame": engine.samples_per_frame,
        "channels": 2,
        "slots": engine.slots,
        "backend": info["backend"],
        "checkpoint": info["checkpoint"],
    }


async def config(request: web.Request) -> web.Response:
    return web.json_response(config_of(request.app))


def check_origin(request: web.Request) -> None:
    """Browsers send Origin with every WebSocket: only the page's own may connect (any site could otherwise use
    a visitor's local server). Clients that are not browsers send none and pass."""
    origin = request.headers.get("Origin")
    own = f"{request.scheme}://{request.host}"
    if origin is not None and origin != own:
        raise web.HTTPForbidden(
            text=f"WebSocket from origin {origin} refused: open the page from {own} itself\n"
        )


async def websocket(request: web.Request) -> web.WebSocketResponse:
    check_origin(request)
    app = request.app
    engine = app[ENGINE]
    limit = protocol.max_frame_bytes(engine.frame_hw)
    # aiohttp closes the socket (1009) past max_msg_size; below it, our own limit answers `too_large` and the
    # stream goes on
    ws = web.WebSocketResponse(max_msg_size=2 * limit, heartbeat=10.0)
    await ws.prepare(request)
    app[SOCKETS].add(ws)
    try:
        await _hello(ws)
    except ProtocolError as err:
        await ws.send_str(protocol.error(err.code, str(err)))
        await ws.close()
        return ws
    except (TimeoutError, ConnectionError):
        await ws.close()
        return ws
    try:
        lane = await engine.acquire()
    except ProtocolError as err:
        await ws.send_str(protocol.error(err.code, str(err)))
        await ws.close()
        return ws
    if lane is None:
        await ws.send_str(
            protocol.error("server_full", f"server full ({engine.slots} streams): try again later")
        )
        await ws.close()
        return ws
    stream = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    tasks: list[asyncio.Task] = []
    try:  # from here on, however the connection ends, the slot is freed
        if app[RECORD] is not None:
            lane.recorder = _recorder(app, stream, lane)
        lane.send(protocol.message("ready", stream=stream, frame_size=list(engine.frame_hw), slot=lane.slot))
        tasks = [asyncio.create_task(_write(ws, lane)), asyncio.create_task(_watch(ws, lane, request))]
        await _read(ws, lane, JpegDecoder(engine.frame_hw), limit)
    finally:
        # aiohttp cancels the handler when the peer goes away: the ending runs as its own task, to completion
        ending = asyncio.create_task(_end(app, ws, lane, tasks, stream))
        app[ENDING].add(ending)
        ending.add_done_callback(app[ENDING].discard)
        await asyncio.shield(ending)
    return ws


async def _end(app: web.Application, ws, lane: Lane, tasks: list[asyncio.Task], stream: str) -> None:
    """Free the slot, stop the socket's tasks, finish the recording."""
    await app[ENGINE].release(lane)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if lane.recorder is not None:
        await asyncio.wrap_future(lane.recorder.finish())
    await ws.close()
    log.info("stream %s ended: %d frames, %d dropped", stream, lane.processed, lane.dropped)


async def _hello(ws: web.WebSocketResponse) -> None:
    msg = await ws.receive(timeout=HELLO_TIMEOUT_S)
    if msg.type == WSMsgType.BINARY:
        raise ProtocolError(
            "bad_protocol", f'send {{"type": "hello", "protocol": {protocol.PROTOCOL}}} first', fatal=True
        )
    if msg.type != WSMsgType.TEXT:
        raise ConnectionError("closed before hello")
    try:
        protocol.check_hello(protocol.parse_text(msg.data))
    except ProtocolError as err:
        raise ProtocolError("bad_protocol", str(err), fatal=True) from None


async def _read(ws: web.WebSocketResponse, lane: Lane, decoder: JpegDecoder, limit: int) -> None:
    """Frames into the lane until stop, close or a fatal error; bad messages get an error and change nothing."""
    async for msg in ws:
        try:
            if msg.type == WSMsgType.BINARY:
                seq, jpeg = protocol.split_frame(msg.data, limit)
                if seq <= lane.last_seq:
                    raise ProtocolError(
                        "bad_frame",
                        f"frame {seq} after frame {lane.last_seq}: sequence numbers must increase",
                    )
                lane.push(seq, decoder.decode(jpeg))
            elif msg.type == WSMsgType.TEXT:
                kind = protocol.parse_text(msg.data)["type"]
                if kind == "stop":
                    return
                raise ProtocolError("bad_message", f"unexpected {kind!r} message: expected frames or stop")
            else:
                return
        except ProtocolError as err:
            lane.send(protocol.error(err.code, str(err)))


async def _write(ws: web.WebSocketResponse, lane: Lane) -> None:
    while True:
        data = await lane.outbox.get()
        if isinstance(data, bytes):
            await ws.send_bytes(data)
        else:
            await ws.send_str(data)


async def _watch(ws: web.WebSocketResponse, lane: Lane, request: web.Request) -> None:
    """Close the socket when the engine ends the stream (a client that stopped reading, a lost upstream)."""
    await lane.cut.wait()
    code, text = lane.cut_reason
    log.warning("closing a stream: %s", text)
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            if code != "slow_client":  # a client that does not read would not get it
                await ws.send_str(protocol.error(code, text))
            await ws.close(code=1008, message=code.encode())
    except (TimeoutError, ConnectionError):
        if request.transport is not None:
            request.transport.abort()


def _recorder(app: web.Application, stream: str, lane: Lane) -> Recorder:
    info, engine = app[INFO], app[ENGINE]
    meta = {
        "stream": stream,
        "checkpoint": info["checkpoint_path"],
        "backend": info["backend"],
        "seed": lane.seed,
        "frame_size": list(engine.frame_hw),
        "fps": protocol.FPS,
        "sample_rate": engine.sample_rate,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if lane.sequence_id is not None:
        meta |= {"triton": info.get("triton"), "sequence_id": lane.sequence_id}
    else:  # torch repeats any in-process backend's audio within their parity (tests/test_onnxruntime_backend.py)
        meta["reproduce"] = shlex.join(["soundreactor", "run", "--video", f"{stream}.mkv", "--checkpoint",
                                        str(info["checkpoint_path"]), "--seed", str(lane.seed), "--out",
                                        f"{stream}.wav"])  # fmt: skip
    record_dir = Path(app[RECORD])
    with contextlib.suppress(FileExistsError):
        record_dir.mkdir(parents=True)
    return Recorder(record_dir, stream, meta, engine.sample_rate, app[RECORDING])
