"""Video file in, audio file out, through any streaming session, with per-frame latency statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from soundreactor.media import WavWriter, probe_video, read_frames
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


def video_to_wav(session: Session, video: str | Path, wav: str | Path, fps: int = 30) -> LatencyReport:
    """Stream every frame of `video` through `session`, appending audio to `wav` as it is produced.

    Audio already written stays valid on disk if a later frame fails.
    """
    info = probe_video(video)
    times = []
    with WavWriter(wav, sample_rate=session.sample_rate) as out:
        frames = tqdm(
            read_frames(video, fps=fps), total=round(info.duration_s * fps), unit="frame", desc="generating"
        )
        for frame in frames:
            start = time.perf_counter()
            audio = session.step(frame)
            times.append(time.perf_counter() - start)
            out.write(audio)
    return LatencyReport.from_times(times, fps)
