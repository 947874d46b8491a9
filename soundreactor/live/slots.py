"""In-process stepping: each connection holds one slot of one `Streams`; the slots whose frames wait are stepped
together, as Triton's sequence batcher does.

A step starts as soon as a frame arrives, after waiting at most `batch_wait_s` for the other connected slots' next
frames (never for a fixed tick). Steps run one at a time on one worker thread (a `Streams` is driven from a single
thread), so the event loop keeps reading sockets while the model computes; frames arriving meanwhile join the next
step. A released slot is reset on that same thread after the step in flight, then handed out again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from soundreactor.live import protocol
from soundreactor.live.lanes import Lane, Pending
from soundreactor.runtime.session import Streams

log = logging.getLogger(__name__)


class SlotStepper:
    def __init__(
        self,
        streams: Streams,
        seed: int,
        batch_wait_s: float = 0.005,
        max_lag_s: float = 0.1,
        queue_frames: int = 4,
        outbox_limit: int = 90,
    ) -> None:
        self.streams, self.seed = streams, seed
        self.batch_wait_s, self.max_lag_s = batch_wait_s, max_lag_s
        self.queue_frames, self.outbox_limit = queue_frames, outbox_limit
        self.slots, self.frame_hw = streams.slots, tuple(streams.frame_hw)
        self.sample_rate, self.samples_per_frame = streams.sample_rate, streams.samples_per_frame
        self.lanes: dict[int, Lane] = {}
        # one batch buffer, refilled each step (the next batch is built only after the step in flight returns)
        self._frames = np.zeros((self.slots, *self.frame_hw, 3), np.uint8)
        self.free = list(range(self.slots))
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="live-step")
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="live-stepper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._worker.shutdown(wait=True)

    async def acquire(self) -> Lane | None:
        """A free slot's lane, or None when every slot is taken."""
        if not self.free:
            return None
        slot = self.free.pop(0)
        # the backends seed slot k's noise with seed + k, so that is this stream's seed (`run --seed` repeats it)
        lane = Lane(slot, self.seed + slot, self.queue_frames, self.outbox_limit)
        lane.on_frame = self._arrived.set
        self.lanes[slot] = lane
        return lane

    async def release(self, lane: Lane) -> None:
        """Free the lane's slot: reset it after the step in flight, then hand it out again."""
        lane.close()
        self.lanes.pop(lane.slot, None)
        await asyncio.get_running_loop().run_in_executor(self._worker, self.streams.reset, lane.slot)
        self.free.append(lane.slot)
        self.free.sort()

    async def _gather(self) -> list[Lane]:
        """Lanes with a frame waiting, once every connected lane has one or the batch wait is over."""
        await self._arrived.wait()
        self._arrived.clear()
        deadline = time.monotonic() + self.batch_wait_s
        while True:
            ready = [lane for lane in self.lanes.values() if lane.frames]
            left = deadline - time.monotonic()
            if len(ready) == len(self.lanes) or left <= 0:
                return ready
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
            self._arrived.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        frames = self._frames
        while True:
            ready = await self._gather()
            batch: list[tuple[Lane, Pending]] = []
            for lane in ready:
                pending = lane.take(self.max_lag_s)
                if pending is not None:
                    batch.append((lane, pending))
            if not batch:
                continue
            active = np.zeros(self.slots, bool)  # slots without a frame keep a stale one, skipped as inactive
            for lane, pending in batch:
                frames[lane.slot] = pending.frame
                active[lane.slot] = True
            start = time.perf_counter()
            try:
                audio = await loop.run_in_executor(self._worker, self.streams.step, frames, active)
            except Exception as err:  # any backend's own error types
                log.exception("step failed")  # the backend left every slot as it was
                for lane, pending in batch:
                    lane.send(protocol.error("step_failed", f"frame {pending.seq} was not processed: {err}"))
                continue
            step_ms = (time.perf_counter() - start) * 1e3
            for lane, pending in batch:
                if not lane.closed:
                    lane.deliver(pending, step_ms, audio[lane.slot])
            if any(lane.frames for lane in self.lanes.values()):
                self._arrived.set()
