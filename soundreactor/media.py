"""Video in (PyAV), audio out (soundfile), and muxing the two into an MP4.

PyAV is imported inside the functions so that importing the package stays cheap and works without FFmpeg.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 48000
CHANNELS = 2
# WAV is stored as 32-bit float: the decoder's samples round-trip exactly and overshoot past +-1 is kept, not
# clipped; PCM_16 would quantize to 1/32768 and clip, hiding what the model actually produced.
WAV_SUBTYPE = "FLOAT"
# Times this close count as equal when resampling: MKV/WebM store whole milliseconds, so a 60 fps frame due at
# 66.67 ms is stamped 67 ms and would otherwise lose its slot at the 30 fps tick 66.67 ms.
TIMESTAMP_TOLERANCE = Fraction(1, 1000)


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float  # average frame rate of the stream (0.0 when the container does not say)
    frame_count: int  # from the container when it says, else duration * fps
    duration_s: float


def _open_video(path: str | Path):
    """Open a container and its first video stream, turning FFmpeg failures into errors that name the file."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read {path} as a video (expected MP4, MKV, WebM, ...): {e}") from e
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["nothing"]
        container.close()
        raise ValueError(f"{path} has no video stream (it holds {', '.join(kinds)}); pass a video file")
    return container, container.streams.video[0]


def _stream_duration(container, stream) -> Fraction | None:
    import av

    if stream.duration is not None:
        return stream.duration * stream.time_base
    if container.duration is not None:
        return Fraction(container.duration, av.time_base)
    return None


def probe_video(path: str | Path) -> VideoInfo:
    container, stream = _open_video(path)
    with container:
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        duration = _stream_duration(container, stream)
        duration_s = float(duration) if duration is not None else 0.0
        frame_count = stream.frames or round(duration_s * fps)
        if not duration_s and fps:
            duration_s = frame_count / fps
        return VideoInfo(stream.width, stream.height, fps, frame_count, duration_s)


def read_frames(path: str | Path, fps: int = 30) -> Iterator[np.ndarray]:
    """Yield RGB uint8 [H, W, 3] frames resampled to `fps` by presentation time, streaming.

    Output frame k is the latest input frame whose pts <= k / fps (times relative to the first frame, equal
    within TIMESTAMP_TOLERANCE), so any input rate, variable ones included, gives about duration * fps frames:
    frames are dropped or repeated.
    The file is opened here, so a bad path raises at the call, not at the first frame.
    """
    if not isinstance(fps, int) or fps <= 0:
        raise ValueError(f"fps must be a positive int, got {fps!r}")
    container, stream = _open_video(path)
    return _resampled_frames(container, stream, fps, Path(path))


def _resampled_frames(container, stream, fps: int, path: Path) -> Iterator[np.ndarray]:
    import av

    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    fallback_frame_duration = 1 / Fraction(rate) if rate else Fraction(1, fps)
    k = 0  # next output frame index
    origin = prev_time = prev_frame = prev_rgb = None
    frame_duration = fallback_frame_duration

    def emit_prev_until(t: Fraction) -> Iterator[np.ndarray]:
        # Output times k/fps before t show prev_frame, converted only if shown (dropped frames cost nothing).
        nonlocal k, prev_rgb
        while Fraction(k, fps) + TIMESTAMP_TOLERANCE < t:
            if prev_rgb is None:
                prev_rgb = prev_frame.to_ndarray(format="rgb24")
                yield prev_rgb
            else:
                yield prev_rgb.copy()  # repeats are independent arrays, safe for the caller to modify
            k += 1

    with container:
        try:
            for frame in container.decode(stream):
                if frame.pts is not None:
                    t = frame.pts * stream.time_base
                else:  # no timestamp: assume it follows the previous frame at the nominal rate
                    t = (prev_time + frame_duration) if prev_time is not None else Fraction(0)
                if origin is None:
                    origin = t
                t -= origin
                if prev_frame is not None:
                    yield from emit_prev_until(t)
                prev_time, prev_frame, prev_rgb = t, frame, None
                duration = getattr(frame, "duration", None)  # Frame.duration exists from PyAV 14.4 on
                frame_duration = duration * stream.time_base if duration else fallback_frame_duration
        except av.error.FFmpegError as e:
            raise ValueError(f"failed decoding {path} after {k} output frames: {e}") from e
        if prev_frame is None:
            raise ValueError(f"{path} has a video stream but no decodable frames")
        # The last frame is shown until its own end time.
        yield from emit_prev_until(prev_time + frame_duration)


def _as_stereo(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 2 or audio.shape[0] != CHANNELS:
        raise ValueError(f"expected audio of shape [2, N] (channels first), got {list(audio.shape)}")
    return audio


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write [2, N] float audio as a 32-bit float WAV (see WAV_SUBTYPE for why float)."""
    sf.write(str(path), _as_stereo(audio).T, sample_rate, subtype=WAV_SUBTYPE, format="WAV")


class WavWriter:
    """Appends [2, n] chunks to a WAV as they are produced, flushing each one.

    Samples are on disk after every write, and libsndfile and FFmpeg read a flushed, still-open file in full;
    the header's sizes become final at close, which __exit__ does even when the block raises, so audio
    produced before a failure is kept.
    """

    def __init__(self, path: str | Path, sample_rate: int = SAMPLE_RATE):
        self.path = Path(path)
        self.frames_written = 0
        self._file = sf.SoundFile(
            str(self.path), "w", samplerate=sample_rate, channels=CHANNELS, subtype=WAV_SUBTYPE, format="WAV"
        )

    def write(self, chunk: np.ndarray) -> None:
        chunk = _as_stereo(chunk)
        self._file.write(chunk.T)
        self._file.flush()
        self.frames_written += chunk.shape[1]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def pick_video_encoder() -> str:
    """H.264 when FFmpeg has an encoder for it (libx264), else MPEG-4 part 2, which every FFmpeg build has."""
    import av

    try:
        av.codec.Codec("h264", "w")
    except av.codec.codec.UnknownCodecError:
        return "mpeg4"
    return "h264"


def _audio_packets(audio_wav: Path, out_stream, num_samples: int, block: int = SAMPLE_RATE) -> Iterator:
    """Encode the WAV as AAC, trimmed or zero-padded to exactly num_samples, one block at a time."""
    import av

    with sf.SoundFile(str(audio_wav)) as wav:
        written = 0
        while written < num_samples:
            n = min(block, num_samples - written)
            chunk = wav.read(n, dtype="float32", always_2d=True)
            if len(chunk) < n:
                chunk = np.concatenate([chunk, np.zeros((n - len(chunk), CHANNELS), np.float32)])
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk.T), format="fltp", layout="stereo")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = written
            frame.time_base = Fraction(1, SAMPLE_RATE)
            yield from out_stream.encode(frame)
            written += n
    yield from out_stream.encode(None)


def _copied_video_packets(in_stream, container, out_stream) -> Iterator:
    for packet in container.demux(in_stream):
        if packet.dts is None:  # demux ends with an empty flush packet
            continue
        packet.stream = out_stream
        yield packet


def _reencoded_video_packets(in_stream, container, out_stream) -> Iterator:
    for frame in container.decode(in_stream):
        frame = frame.reformat(width=out_stream.width, height=out_stream.height, format="yuv420p")
        yield from out_stream.encode(frame)
    yield from out_stream.encode(None)


def _packet_time(packet) -> float:
    ts = packet.dts if packet.dts is not None else packet.pts
    return float(ts * packet.time_base) if ts is not None and packet.time_base else 0.0


def mux(video_in: str | Path, audio_wav: str | Path, out_path: str | Path) -> None:
    """Write an MP4 with video_in's video and audio_wav as AAC 48 kHz stereo.

    The video stream is copied, or re-encoded to H.264 (MPEG-4 part 2 without libx264) when MP4 can't hold its
    codec; the audio is trimmed or zero-padded to the video stream's duration.
    """
    import av

    audio_wav = Path(audio_wav)
    if not audio_wav.is_file():
        raise FileNotFoundError(f"audio file not found: {audio_wav}")
    info = sf.info(str(audio_wav))
    if info.samplerate != SAMPLE_RATE or info.channels != CHANNELS:
        raise ValueError(
            f"{audio_wav} is {info.samplerate} Hz with {info.channels} channels; "
            f"expected {SAMPLE_RATE} Hz stereo (resample it first)"
        )
    container, in_stream = _open_video(video_in)
    with container, av.open(str(out_path), "w", format="mp4") as out:
        duration = _stream_duration(container, in_stream)
        if duration is None:
            raise ValueError(f"{video_in} does not state its duration; cannot fit the audio to it")
        if in_stream.codec_context.name in out.supported_codecs:
            out_video = out.add_stream_from_template(in_stream)
            video_packets = _copied_video_packets(in_stream, container, out_video)
        else:  # e.g. VP8 or Theora, which MP4 has no tag for
            rate = in_stream.average_rate or in_stream.guessed_rate or 30
            out_video = out.add_stream(pick_video_encoder(), rate=rate)
            # yuv420p needs even sides.
            out_video.width, out_video.height = in_stream.width // 2 * 2, in_stream.height // 2 * 2
            out_video.pix_fmt = "yuv420p"
            video_packets = _reencoded_video_packets(in_stream, container, out_video)
        out_audio = out.add_stream("aac", rate=SAMPLE_RATE, layout="stereo")
        audio_packets = _audio_packets(audio_wav, out_audio, math.ceil(duration * SAMPLE_RATE))
        # Merge by time so the muxer interleaves without buffering a whole stream in memory.
        for packet in heapq.merge(video_packets, audio_packets, key=_packet_time):
            out.mux(packet)
