"""A client for one stream: frames in, audio out, over a gRPC bidirectional stream (tritonclient).

    with StreamClient("127.0.0.1:8001", sequence_id=7) as stream:
        for frame in frames:                 # uint8 [H, W, 3]
            audio = stream.step(frame)       # float32 [2, 1600]
        stream.step(last_frame, end=True)    # END frees the server's slot at once (else: its idle timeout)

Each `StreamClient` is one Triton sequence (its correlation ID) on its own gRPC stream. A server with every slot
taken keeps new streams waiting; `timeout_s` turns that wait into a `StreamTimeout` instead of a hang.
"""

from __future__ import annotations

import queue
import random

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


class StreamError(RuntimeError):
    """The server rejected a frame (the message is the server's); the stream's state is as before that frame."""


class StreamTimeout(TimeoutError):
    """No answer in time: every slot busy (the stream waits for one), an overloaded server, or no server."""


class StreamClient:
    """One stream of frames to model `model` at `url` (HOST:PORT of Triton's gRPC endpoint).

    sequence_id: the stream's correlation ID, unique among the server's live streams (random when None); with
        the default seed policy it also seeds the stream's noise.
    timeout_s: how long `step` waits for a frame's audio, including the wait for a free slot.
    """

    def __init__(
        self, url: str, model: str = "soundreactor", sequence_id: int | None = None, timeout_s: float = 10.0
    ) -> None:
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self.sequence_id = sequence_id if sequence_id is not None else random.randrange(1, 2**63)
        self.frames_sent = 0
        self._answers: queue.Queue = queue.Queue()
        self._client = grpcclient.InferenceServerClient(url)
        self._client.start_stream(callback=lambda result, error: self._answers.put((result, error)))
        self._open = True

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
        (the slot is free for the next one). Raises StreamError (rejected frame: the stream can go on) or
        StreamTimeout (the stream is closed)."""
        if not self._open:
            raise StreamError(f"stream {self.sequence_id} is closed")
        frame = np.ascontiguousarray(frame)[None]
        tensor = grpcclient.InferInput("FRAME", list(frame.shape), _datatype(frame.dtype))
        tensor.set_data_from_numpy(frame)
        start = self.frames_sent == 0
        self._client.async_stream_infer(
            self.model, [tensor], sequence_id=self.sequence_id, sequence_start=start, sequence_end=end
        )
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
            raise StreamError(
                f"frame {self.frames_sent} of stream {self.sequence_id} rejected: {_message(error)}"
            )
        self.frames_sent += 1
        if end:
            self.close()
        return result.as_numpy("AUDIO")[0]

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
