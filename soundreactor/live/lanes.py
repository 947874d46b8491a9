"""A connection's lane: its bounded queue of frames waiting for the model and its bounded outbox of messages.

Both bounds keep latency from building up: a client sending faster than the model steps loses its oldest frames
(`dropped`, queue_full), frames that waited longer than the lag limit are skipped (`dropped`, behind, and a
`behind` message), and a client that does not read its audio is cut off rather than buffered for.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from soundreactor.live import protocol

BEHIND_EVERY_S = 0.5  # at most this often a `behind` message per lane: the page shows a state, not a log


@dataclass
class Pending:
    seq: int
    frame: np.ndarray
    arrived: float  # time.monotonic()


class Lane:
    """One stream: `slot` of the in-process `Streams` (or its Triton sequence), and what goes to its socket."""

    def __init__(self, slot: int, seed: int | None, queue_frames: int, outbox_limit: int) -> None:
        self.slot, self.seed = slot, seed
        self.sequence_id: int | None = None  # its Triton sequence when relayed
        self.queue_frames, self.outbox_limit = queue_frames, outbox_limit
        self.frames: deque[Pending] = deque()
        self.outbox: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.cut = (
            asyncio.Event()
        )  # set when the stream cannot go on: the server sends `cut_reason` and closes
        self.cut_reason = ("", "")  # (error code, message)
        self.on_frame: Callable[[], None] = lambda: None  # the engine's wake-up
        self.recorder = None  # a Recorder when --record is on
        self.processed = self.dropped = 0
        self.last_seq = -1
        self.closed = False
        self._last_behind = -float("inf")

    def push(self, seq: int, frame: np.ndarray) -> None:
        """Queue a decoded frame; over the bound, the oldest waiting frame is dropped."""
        self.last_seq = seq
        self.frames.append(Pending(seq, frame, time.monotonic()))
        if len(self.frames) > self.queue_frames:
            self.drop(self.frames.popleft().seq, "queue_full")
        self.on_frame()

    def take(self, max_lag_s: float) -> Pending | None:
        """The oldest frame to step, skipping frames older than `max_lag_s` while newer ones wait behind them."""
        now = time.monotonic()
        lag = 0.0
        while len(self.frames) > 1 and now - self.frames[0].arrived > max_lag_s:
            lag = max(lag, now - self.frames[0].arrived)
            self.drop(self.frames.popleft().seq, "behind")
        if lag and now - self._last_behind >= BEHIND_EVERY_S:
            self._last_behind = now
            self.send(protocol.message("behind", ms=round(lag * 1e3, 1)))
        return self.frames.popleft() if self.frames else None

    def drop(self, seq: int, reason: str) -> None:
        self.dropped += 1
        self.send(protocol.message("dropped", seq=seq, reason=reason))

    def deliver(self, pending: Pending, step_ms: float, audio: np.ndarray) -> None:
        """A stepped frame's audio goes out (and into the recording)."""
        self.processed += 1
        self.send(protocol.pack_audio(pending.seq, step_ms, audio))
        if self.recorder is not None:
            self.recorder.write(pending.frame, audio)

    def send(self, data: str | bytes) -> None:
        if self.closed:
            return
        if self.outbox.qsize() >= self.outbox_limit:
            self.stop("slow_client", f"the client read no audio for {self.outbox_limit} messages")
            return
        self.outbox.put_nowait(data)

    def stop(self, code: str, text: str) -> None:
        """End the stream from the server's side (the connection handler closes the socket)."""
        if not self.cut.is_set():
            self.cut_reason = (code, text)
            self.cut.set()

    def close(self) -> None:
        self.closed = True
        self.frames.clear()
