"""`--record DIR`: each stream kept as DIR/<stream>.mkv (the frames the model saw, FFV1, lossless; the audio it
made, 32-bit float PCM, bit-exact) and DIR/<stream>.json (checkpoint, backend, seed, frame size, frames).

Frames are stamped at exactly 30 fps (pts k in a 1/30 s time base; Matroska stores whole milliseconds, which
`soundreactor.media.read_frames` takes as equal within its 1 ms tolerance), so `soundreactor run` on the file
steps the same frames in the same order. The files are written under temporary names and renamed when the stream
ends, however it ends; encoding runs on one shared worker thread, off the event loop and the model's thread.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import Executor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from soundreactor.live.protocol import FPS

log = logging.getLogger(__name__)
# Frames queued for the encoder before a stream's recording stops (5 s at 30 fps): FFV1 costs ~0.3 ms CPU a 56x112
# frame but ~8 ms at 480x854, so many large streams can outrun the one recording thread; its queue stays bounded.
MAX_BACKLOG = 150


class Recorder:
    def __init__(self, directory: Path, stream: str, meta: dict, sample_rate: int, worker: Executor) -> None:
        self.video_path = directory / f"{stream}.mkv"
        self.meta_path = directory / f"{stream}.json"
        self.meta, self.sample_rate, self.worker = meta, sample_rate, worker
        self.frames = 0  # written (on the worker thread)
        self.submitted = 0  # queued (on the event loop)
        self.failed: str | None = None  # why the recording stopped early (kept in the JSON)
        self.broken = False
        self._partial = directory / f".{stream}.mkv.part"
        self._container = self._video = self._audio = None

    def write(self, frame: np.ndarray, audio: np.ndarray) -> None:
        """Queue one stepped frame (uint8 [H, W, 3]) and its audio (float32 [2, samples]). Past MAX_BACKLOG
        frames waiting, the recording stops there (the file keeps every frame up to that point, without gaps)."""
        if self.failed:
            return
        if self.submitted - self.frames >= MAX_BACKLOG:
            self.failed = (
                f"recording stopped at frame {self.submitted}: the encoder fell {MAX_BACKLOG} frames behind "
                "(record fewer streams or smaller frames)"
            )
            log.error("%s: %s", self.video_path, self.failed)
            return
        self.submitted += 1
        self.worker.submit(self._write, frame, audio)

    def finish(self):
        """Queue the close and the renames; returns the worker's future (the files exist once it is done)."""
        return self.worker.submit(self._finish)

    def _open(self, height: int, width: int) -> None:
        self._container = av.open(str(self._partial), "w", format="matroska")
        self._video = self._container.add_stream("ffv1", rate=FPS)
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "bgr0"  # 8-bit RGB that FFV1 takes: rgb24 frames go in and come out unchanged
        self._video.time_base = Fraction(1, FPS)
        self._audio = self._container.add_stream("pcm_f32le", rate=self.sample_rate, layout="stereo")

    def _write(self, frame: np.ndarray, audio: np.ndarray) -> None:
        if self.broken:  # an encoder or disk error stopped this recording
            return
        try:
            if self._container is None:
                self._open(*frame.shape[:2])
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts, picture.time_base = self.frames, Fraction(1, FPS)
            for packet in self._video.encode(picture):
                self._container.mux(packet)
            sound = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(audio.T).reshape(1, -1), format="flt", layout="stereo"
            )
            sound.sample_rate = self.sample_rate
            sound.pts, sound.time_base = self.frames * audio.shape[1], Fraction(1, self.sample_rate)
            for packet in self._audio.encode(sound):
                self._container.mux(packet)
            self.frames += 1
        except (OSError, av.error.FFmpegError) as err:
            self.failed = f"recording stopped after {self.frames} frames: {err}"
            log.error("%s: %s", self.video_path, self.failed)
            self.broken = True

    def _finish(self) -> None:
        if self._container is None:
            return  # no frame was stepped: nothing to keep
        try:
            for stream in (self._video, self._audio):
                for packet in stream.encode(None):
                    self._container.mux(packet)
            self._container.close()
            os.replace(self._partial, self.video_path)
            meta = {**self.meta, "frames": self.frames, "video": self.video_path.name}
            if self.failed:
                meta["error"] = self.failed
            partial_meta = self.meta_path.with_name(f".{self.meta_path.name}.part")
            partial_meta.write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(partial_meta, self.meta_path)
        except (OSError, av.error.FFmpegError) as err:
            log.error("could not finish the recording %s: %s", self.video_path, err)
