"""A client for one stream: frames in, audio out, over a gRPC bidirectional stream (tritonclient).

    with StreamClient("127.0.0.1:8001", sequence_id=7) as stream:
        for frame in frames:                 # uint8 [H, W, 3]
            audio = stream.step(frame)       # float32 [2, 1600]
        stream.step(last_frame, end=True)    # END frees the server's slot at once (else: its idle timeout)

Each `StreamClient` is one Triton sequence (its correlation ID, an int or a str) on its own gRPC stream. A server
with every slot taken keeps new streams waiting; `timeout_s` turns that wait into a `StreamTimeout` instead of a
hang. A server that forgot the stream (it restarted, or the stream paused past the idle timeout) raises
`StreamLost`; `restart()` starts the stream again from a fresh state:

    try:
        audio = stream.step(frame)
    except StreamLost:
        stream.restart()                     # the next frame is the first of a new stream (START)
        audio = stream.step(frame)
"""

from __future__ import annotations

import queue
import random

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

GRPC_PORT = 8001  # tritonserver's default gRPC port, which `soundreactor serve` keeps
# Triton's answer to a frame of a sequence it does not hold (idle timeout, or a restarted server)
UNKNOWN_SEQUENCE = "must specify the START flag"


class StreamError(RuntimeError):
    """The server rejected a frame (the message is the server's); the stream's state is as before that frame."""


class StreamTimeout(TimeoutError):
    """No answer in time: every slot busy (the stream waits for one), an overloaded server, or no server."""


class StreamLost(RuntimeError):
    """The server no longer holds the stream: it restarted or stopped, or the stream sent nothing for longer than
    the server's idle timeout. The stream's state is gone; `restart()` starts it again from a fresh state."""


class StreamClient:
    """One stream of frames to model `model` at `url` (HOST[:PORT] of Triton's gRPC endpoint, port 8001 if not
    given).

    sequence_id: the stream's correlation ID, an int (1 to 2**63 - 1: tritonclient sends int64) or a str, unique
        among the server's live streams (random when None); with the default seed policy it also seeds the
        stream's noise.
    timeout_s: how long `step` waits for a frame's audio, including the wait for a free slot.
    """

    def __init__(
        self,
        url: str,
        model: str = "soundreactor",
        sequence_id: int | str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.url, self.model, self.timeout_s = grpc_address(url), model, timeout_s
        self.sequence_id = sequence_id if sequence_id is not None else random.randrange(1, 2**63)
        self.frames_sent = 0
        self._connect()

    def _connect(self) -> None:
        # each gRPC stream answers into its own queue: a stopped stream's late callbacks never reach a new one
        answers: queue.Queue = queue.Queue()
        self._answers = answers
        self._client = grpcclient.InferenceServerClient(self.url)
        self._client.start_stream(callback=lambda result, error: answers.put((result, error)))
        self._open = True
        self._lost = ""

    def frame_hw(self) -> tuple[int, int]:
        """The frame size (height, width) the served model takes, from its metadata."""
        try:
            metadata = self._client.get_model_metadata(
                self.model, as_json=True, client_timeout=self.timeout_s
            )
        except InferenceServerException as err:
            raise StreamError(f"cannot read model {self.model!r} at {self.url}: {_message(err)}") from err
        shape = next(i["shape"] for i in metadata["inputs"] if i["name"] == "FRAME")
        return int(shape[1]), int(shape[2])

    def step(self, frame: np.ndarray, end: bool = False) -> np.ndarray:
        """Send one frame uint8 [H, W, 3] and return its audio float32 [2, samples]. `end=True` ends the stream
        (the slot is free for the next one). Raises StreamError (rejected frame: the stream can go on),
        StreamLost (the server forgot the stream: `restart()`) or StreamTimeout (the stream is closed)."""
        if self._lost:
            raise StreamLost(self._lost)
        if not self._open:
            raise StreamError(f"stream {self.sequence_id} is closed: restart() starts it again")
        frame = np.ascontiguousarray(frame)[None]
        tensor = grpcclient.InferInput("FRAME", list(frame.shape), _datatype(frame.dtype))
        tensor.set_data_from_numpy(frame)
        start = self.frames_sent == 0
        try:
            stale = self._answers.get_nowait()[1]  # one frame in flight at a time: anything here came unasked
        except queue.Empty:
            stale = None
        if stale is not None:
            raise self._lose(stale)
        try:
            self._client.async_stream_infer(
                self.model, [tensor], sequence_id=self.sequence_id, sequence_start=start, sequence_end=end
            )
        except InferenceServerException as err:  # the gRPC stream broke before this frame
            raise self._lose(err) from None
        try:
            result, error = self._answers.get(timeout=self.timeout_s)
        except queue.Empty:
            self.close(cancel=True)
            raise StreamTimeout(
                f"no audio for frame {self.frames_sent} of stream {self.sequence_id} within {self.timeout_s:g} s: "
                "every slot of the server may be taken (new streams wait for a free one) or it is overloaded; "
                "retry later, serve with more slots or instances, or raise the timeout"
            ) from None
        if error is not None:
            if error.status() is not None or (not start and UNKNOWN_SEQUENCE in _message(error)):
                raise self._lose(error)  # a gRPC status: the connection, not this frame
            raise StreamError(
                f"frame {self.frames_sent} of stream {self.sequence_id} rejected: {_message(error)}"
            )
        self.frames_sent += 1
        if end:
            self.close()
        return result.as_numpy("AUDIO")[0]

    def _lose(self, error: Exception) -> StreamLost:
        """Mark the stream lost, and say what happened and what to do."""
        if UNKNOWN_SEQUENCE in _message(error):
            what = (
                f"the server at {self.url} no longer holds it: it sent nothing for longer than the server's idle "
                "timeout (`soundreactor triton-repo --idle-timeout-s`), or the server restarted"
            )
        else:
            what = f"the connection to the server at {self.url} broke (the server stopped or restarted)"
        self._lost = (
            f"stream {self.sequence_id} was lost after {self.frames_sent} frames: {what} ({_message(error)}); "
            "its state is gone: call restart() to start it again from a fresh state, or close it"
        )
        return StreamLost(self._lost)

    def restart(self) -> None:
        """Start the stream again from a fresh state, on a new gRPC stream with the same correlation ID: the next
        frame is its first (START). For a lost, timed-out, ended or closed stream."""
        self.close()  # nothing is in flight between steps: a plain close
        self.frames_sent = 0
        self._connect()

    def close(self, cancel: bool = False) -> None:
        """Close the gRPC stream (cancelling what is in flight if `cancel`). Without an `end=True` frame the server
        keeps the slot until its idle timeout."""
        if self._open:
            self._open = False
            # A cancelled stream can leave the server holding the model: it then cannot unload, and a SIGTERM
            # waits out the exit timeout (1 in 3-6 shutdowns, tritonserver 2.51). So only a timeout cancels.
            self._client.stop_stream(cancel_requests=cancel)
            self._client.close()

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _datatype(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype) or str(dtype)


def _message(error: Exception) -> str:
    return error.message() if isinstance(error, InferenceServerException) else str(error)


def grpc_address(url: str) -> str:
    """HOST:PORT for tritonclient, with Triton's gRPC port when none is given: gRPC itself would take a bare HOST to
    mean port 443 (TLS), where no Triton listens."""
    if url.startswith("["):  # [IPv6] or [IPv6]:PORT
        return url if "]:" in url else f"{url}:{GRPC_PORT}"
    if url.count(":") > 1:  # a bare IPv6 address
        return f"[{url}]:{GRPC_PORT}"
    return url if ":" in url else f"{url}:{GRPC_PORT}"
