"""`--triton URL`: each connection relayed to a running `soundreactor serve` as one Triton sequence.

The server's sequence batcher does what slots.py does in process (one batch slot per stream, the waiting slots
stepped together); here each lane steps its frames in order through its own `StreamClient`, whose calls block, on
a thread pool with a thread per lane. Admission stops at `slots` connections, which should match the served
model's slots (a stream beyond them would wait in Triton's queue instead of being told the server is full).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from soundreactor.live import protocol
from soundreactor.live.lanes import Lane
from soundreactor.live.protocol import ProtocolError
from soundreactor.media import SAMPLE_RATE
from soundreactor.serving.client import StreamClient, StreamError, StreamTimeout
from soundreactor.serving.repository import SAMPLES_PER_FRAME


class TritonRelay:
    def __init__(
        self,
        url: str,
        slots: int,
        model: str = "soundreactor",
        max_lag_s: float = 0.1,
        queue_frames: int = 4,
        outbox_limit: int = 90,
        timeout_s: float = 10.0,
        client_factory: Callable[..., StreamClient] = StreamClient,
    ) -> None:
        self.url, self.model, self.slots, self.timeout_s = url, model, slots, timeout_s
        self.max_lag_s, self.queue_frames, self.outbox_limit = max_lag_s, queue_frames, outbox_limit
        self.client_factory = client_factory
        self.sample_rate, self.samples_per_frame = SAMPLE_RATE, SAMPLES_PER_FRAME
        self.frame_hw: tuple[int, int] = (0, 0)
        self.lanes: dict[int, Lane] = {}
        self._tasks: dict[int, asyncio.Task] = {}
        self._pool = ThreadPoolExecutor(slots + 1, thread_name_prefix="live-relay")

    async def _call(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def start(self) -> None:
        """Read the served model's frame size (fails with StreamError/StreamTimeout when nothing serves it)."""
        probe = await self._call(self.client_factory, self.url, self.model, timeout_s=self.timeout_s)
        try:
            self.frame_hw = await self._call(probe.frame_hw)
        except StreamError as err:
            raise ValueError(
                f"--triton {self.url}: {err}; start a server with `soundreactor serve`"
            ) from None
        finally:
            await self._call(probe.close)

    async def stop(self) -> None:
        for lane in list(self.lanes.values()):
            await self.release(lane)
        self._pool.shutdown(wait=True)

    async def acquire(self) -> Lane | None:
        free = [k for k in range(self.slots) if k not in self.lanes]
        if not free:
            return None
        lane = Lane(free[0], None, self.queue_frames, self.outbox_limit)
        self.lanes[lane.slot] = lane
        sequence_id = random.randrange(1, 2**63)
        try:
            client = await self._call(
                self.client_factory, self.url, self.model, sequence_id=sequence_id, timeout_s=self.timeout_s
            )
        except Exception as err:  # grpc's and tritonclient's own errors
            del self.lanes[lane.slot]
            raise ProtocolError(
                "upstream_unavailable", f"cannot reach {self.url}: {err}", fatal=True
            ) from None
        lane.sequence_id = sequence_id
        wake = asyncio.Event()
        lane.on_frame = wake.set
        self._tasks[lane.slot] = asyncio.create_task(self._serve(lane, client, wake))
        return lane

    async def release(self, lane: Lane) -> None:
        lane.close()
        lane.on_frame()
        task = self._tasks.pop(lane.slot, None)
        if task is not None:
            await task  # ends the Triton sequence, freeing the server's slot at once
        self.lanes.pop(lane.slot, None)

    async def _serve(self, lane: Lane, client: StreamClient, wake: asyncio.Event) -> None:
        last = None
        try:
            while not lane.closed:
                await wake.wait()
                wake.clear()
                while not lane.closed and (pending := lane.take(self.max_lag_s)) is not None:
                    start = time.perf_counter()
                    try:
                        audio = await self._call(client.step, pending.frame)
                    except StreamError as err:  # the frame was refused; the sequence goes on as before it
                        lane.send(protocol.error("step_failed", str(err)))
                        continue
                    except StreamTimeout as err:
                        lane.stop("upstream_timeout", str(err))
                        return
                    last = pending.frame
                    lane.deliver(pending, (time.perf_counter() - start) * 1e3, audio)
        finally:
            if last is not None and client.frames_sent:
                with contextlib.suppress(StreamError, StreamTimeout):
                    # END needs a frame: the last one again, whose audio nobody hears
                    await self._call(client.step, last, end=True)
            await self._call(client.close)
