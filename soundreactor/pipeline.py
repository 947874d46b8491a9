"""Video in (a file or a pipe), audio file out, through any streaming session, with per-frame latency statistics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from soundreactor.media import VideoReader, WavWriter
from soundreactor.runtime.session import Session


@dataclass(frozen=True)
class LatencyReport:
    frames: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    frame_period_ms: float

    @classmethod
    def from_times(cls, seconds: list[float], fps: int) -> LatencyReport:
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        if ms.size == 0:
            raise ValueError("no frames were processed")
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(len(ms), float(p50), float(p90), float(p99), float(ms.mean()), 1e3 / fps)

    @property
    def real_time_factor(self) -> float:
        """Audio produced per second of compute: above 1 keeps up with the video."""
        return self.frame_period_ms / self.mean_ms

    def summary(self) -> str:
        return (
            f"{self.frames} frames | per-frame latency p50 {self.p50_ms:.1f} ms, p90 {self.p90_ms:.1f} ms, "
            f"p99 {self.p99_ms:.1f} ms | real-time factor {self.real_time_factor:.2f}x "
            f"(budget {self.frame_period_ms:.1f} ms per frame)"
        )


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run; the message says what was kept on disk."""


class NonFiniteAudio(ValueError):
    """The session produced NaN or infinite samples; the message says which frame and what was kept."""


def video_to_wav(
    session: Session,
    video: str | Path | VideoReader,
    wav: str | Path,
    fps: int = 30,
    note: Callable[[str], None] = tqdm.write,
) -> LatencyReport:
    """Stream every frame of `video` through `session`, appending audio to `wav` as it is produced.

    `video` is a path or an open `VideoReader` (a pipe is read once: open it, size the session from its `info`,
    and pass it here). Frames are read as displayed and scaled to the session's frame size, so a video of another
    size, or one whose size changes partway, is covered in full (`note` is told when scaling happens, and when the
    WAV switches to RF64). Frames are read to the source's end, whatever its header says. Audio already written
    stays valid on disk if a later frame fails or the process is interrupted or killed (see WavWriter). A frame
    whose audio is not finite is not written: NonFiniteAudio says which one and what was kept. Raises Interrupted
    (a KeyboardInterrupt) saying what was kept.
    """
    if isinstance(video, VideoReader):  # the caller's to close (it may still keep the rest of a pipe)
        return _generate(session, video, wav, fps, note)
    with VideoReader(video) as reader:
        return _generate(session, reader, wav, fps, note)


def _generate(
    session: Session, reader: VideoReader, wav: str | Path, fps: int, note: Callable[[str], None]
) -> LatencyReport:
    info = reader.info
    if (info.height, info.width) != tuple(session.frame_hw):
        h, w = session.frame_hw
        note(
            f"{reader.name} is {info.height}x{info.width} as displayed: frames are scaled to the session's {h}x{w}"
        )
    times = []
    with WavWriter(wav, sample_rate=session.sample_rate, on_switch=note) as out:

        def kept() -> str:
            seconds = out.frames_on_disk() / session.sample_rate
            return f"kept {seconds:.2f} s of audio in {wav} ({out.container}, complete up to there)"

        try:
            frames = tqdm(
                reader.frames(fps=fps, size=session.frame_hw),
                total=round(info.duration_s * fps) or None,  # a header without a duration bounds nothing
                unit="frame",
                desc="generating",
            )
            for index, frame in enumerate(frames):
                start = time.perf_counter()
                audio = session.step(frame)
                times.append(time.perf_counter() - start)
                if not np.isfinite(audio).all():
                    raise NonFiniteAudio(
                        f"the model produced NaN or infinite audio at frame {index} ({index / fps:.2f} s into "
                        f"{reader.name}); stopped and {kept()}. Check that the checkpoint's weights are finite; "
                        "with --backend cuda-graph, try --dtype fp32"
                    )
                out.write(audio)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {kept()}") from None
    return LatencyReport.from_times(times, fps)
