"""The streaming interface every backend implements, and the frame checks they share.

`Streams` steps B stream slots at once (servers); `Session` is one stream (products, the CLI):

    session = Session(TorchStreams(SoundReactor.load(checkpoint, input_hw=(480, 854))))
    for frame in camera:                  # uint8 [H, W, 3], RGB
        play(session.step(frame))         # float32 [2, 1600], 33.3 ms of 48 kHz stereo
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

import numpy as np


class FrameError(ValueError):
    """A frame the session cannot take; the stream's state is left untouched."""


RESIZE_OR_REBUILD = (
    "resize frames to that size, or load the model for the video's size: "
    "SoundReactor.load(checkpoint, input_hw=(height, width))"
)


def check_frames(
    frames: object, slots: int, frame_hw: tuple[int, int], size_fix: str = RESIZE_OR_REBUILD
) -> np.ndarray:
    """Validate a batch of frames [B, H, W, 3] and return it as contiguous uint8.

    uint8 frames pass as they are; float frames must be finite and within [0, 1] and are rounded to uint8.
    `size_fix` tells the user what to do about a frame of another size (backends built for one size differ).
    """
    if hasattr(frames, "detach"):  # a torch tensor, without importing torch here
        if frames.device.type == "meta":
            raise FrameError(
                f"frames are a meta-device tensor {tuple(frames.shape)}: it has a shape but no pixels; "
                "pass the decoded frames (load the tensor on cpu or cuda)"
            )
        try:
            frames = frames.detach().cpu().numpy()
        except TypeError as err:  # dtypes numpy lacks: bfloat16, float8
            raise FrameError(
                f"frames of dtype {frames.dtype} have no numpy equivalent ({err}): pass frames.float() "
                "(values in 0..1) or frames.to(torch.uint8) (0..255)"
            ) from None
    if not isinstance(frames, np.ndarray):
        raise FrameError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    h, w = frame_hw
    expected = (slots, h, w, 3)
    if frames.ndim != 4 or frames.shape[0] != slots:
        raise FrameError(
            f"expected frames of shape {expected} (slots, height, width, RGB), got {frames.shape}"
        )
    if frames.shape[3] != 3:
        raise FrameError(
            f"expected 3 colour channels (RGB, channels last), got {frames.shape[3]}: "
            "drop alpha with frame[..., :3], or convert grayscale with np.repeat(frame[..., None], 3, -1)"
        )
    if frames.shape[1:3] != (h, w):
        raise FrameError(
            f"frame size {frames.shape[1]}x{frames.shape[2]} does not match the session's {h}x{w}: {size_fix}"
        )
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if not np.issubdtype(frames.dtype, np.floating):
        raise FrameError(f"frames must be uint8 (0..255) or float (0..1), got dtype {frames.dtype}")
    if not np.isfinite(frames).all():
        raise FrameError("frame contains NaN or infinite values; check the renderer or decoder feeding it")
    if frames.min() < 0.0 or frames.max() > 1.0:
        raise FrameError(
            f"float frames must lie in [0, 1], got [{frames.min():.3g}, {frames.max():.3g}]: "
            "divide by 255 or pass uint8"
        )
    return np.rint(frames * 255.0).astype(np.uint8)


def check_active(active: object, slots: int) -> np.ndarray:
    """The mask of slots that advance this frame (all when None)."""
    if active is None:
        return np.ones(slots, dtype=bool)
    mask = np.asarray(active)
    if mask.shape != (slots,) or mask.dtype != bool:
        raise ValueError(f"active must be a bool array of shape ({slots},), got {mask.dtype} {mask.shape}")
    return mask


class Streams(ABC):
    """B concurrent streams stepped together. A failed step leaves every slot as it was."""

    slots: int
    frame_hw: tuple[int, int]
    samples_per_frame: int
    sample_rate: int

    @abstractmethod
    def step(self, frames: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        """frames uint8 [B, H, W, 3] -> audio float32 [B, 2, samples_per_frame].

        Slots where `active` is False are skipped: their state does not change and their audio is silence.
        """

    @abstractmethod
    def reset(self, slot: int | None = None) -> None:
        """Restart one slot (or all) from an empty history and its seed, leaving the others untouched."""


class Session:
    """One stream over any backend: `step(frame [H, W, 3]) -> float32 [2, samples_per_frame]`.

    Thread-safe: `step` and `reset` hold a lock, so calls from several threads run one at a time, each on the
    state the previous one left (a stream's frames are ordered, so this serializes, it does not parallelize).
    Which thread's frame comes next is the order they take the lock; feed one stream from one thread to keep
    frame order. The `Streams` backends themselves are not locked: drive one from a single thread (servers
    batch many streams into one `Streams.step`).
    """

    def __init__(self, streams: Streams) -> None:
        if streams.slots != 1:
            raise ValueError(f"Session drives one stream; got a backend with {streams.slots} slots")
        self.streams = streams
        self._lock = threading.Lock()

    @property
    def frame_hw(self) -> tuple[int, int]:
        return self.streams.frame_hw

    @property
    def sample_rate(self) -> int:
        return self.streams.sample_rate

    def step(self, frame: np.ndarray) -> np.ndarray:
        if getattr(frame, "ndim", None) != 3:
            raise FrameError(
                f"expected one frame of shape (H, W, 3), got shape {getattr(frame, 'shape', None)}"
            )
        with self._lock:
            return self.streams.step(frame[None])[0]

    def reset(self) -> None:
        with self._lock:
            self.streams.reset()
