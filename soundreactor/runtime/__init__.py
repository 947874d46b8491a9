"""Streaming sessions: one interface (`Streams`, `Session`) over every backend."""

from soundreactor.runtime.session import FrameError, Session, Streams

__all__ = ["FrameError", "Session", "Streams"]
