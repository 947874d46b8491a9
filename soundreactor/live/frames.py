"""JPEG frames from the page -> RGB uint8 [H, W, 3] at the session's size (PyAV's MJPEG decoder)."""

from __future__ import annotations

import av
import numpy as np

from soundreactor.live.protocol import ProtocolError


class JpegDecoder:
    """One per connection: an FFmpeg decoder context is not shared between threads or streams."""

    def __init__(self, frame_hw: tuple[int, int]) -> None:
        self.frame_hw = frame_hw
        self.codec = av.CodecContext.create("mjpeg", "r")
        self.scaled = 0  # frames that arrived at another size

    def decode(self, data: bytes) -> np.ndarray:
        """The frame at the session's size; a frame of another size is scaled to it the way `soundreactor run`
        scales video frames (area interpolation, aspect not kept). Raises ProtocolError bad_frame."""
        h, w = self.frame_hw
        try:
            frames = self.codec.decode(av.Packet(data))
            if len(frames) != 1:
                raise ProtocolError(
                    "bad_frame", f"frame message held {len(frames)} pictures: send one JPEG each"
                )
            frame = frames[0]
            if (frame.height, frame.width) == (h, w):
                return frame.to_ndarray(format="rgb24")
            self.scaled += 1
            return frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA")
        except (av.error.FFmpegError, ValueError) as err:  # ValueError: a pixel format PyAV cannot convert
            raise ProtocolError("bad_frame", f"frame is not a decodable JPEG ({err})") from None
