"""Video in (PyAV), audio out (soundfile), and muxing the two into an MP4.

Frames are read as FFmpeg shows them: rotated by the stream's display matrix, from the first video stream that is
not an attached picture (cover art). PyAV is imported inside the functions so that importing the package stays
cheap and works without FFmpeg.
"""

from __future__ import annotations

import heapq
import math
import os
import tempfile
from collections.abc import Callable, Iterator
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
    width: int  # as displayed, after the display-matrix rotation
    height: int
    fps: float  # average frame rate of the stream (0.0 when the container does not say)
    frame_count: int  # from the container when it says, else duration * fps
    duration_s: float
    rotation: int = 0  # clockwise degrees (0, 90, 180, 270) applied to the stored frames to display them


def _is_attached_picture(stream) -> bool:
    import av

    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def video_streams(container) -> list:
    """The container's video streams, without attached pictures (cover art, thumbnails), which are single images."""
    return [s for s in container.streams.video if not _is_attached_picture(s)]


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
    streams = video_streams(container)
    if not streams:
        kinds = sorted({s.type for s in container.streams if not _is_attached_picture(s)}) or ["nothing"]
        pictures = len(container.streams.video)
        container.close()
        cover = f" and {pictures} attached picture(s) (cover art, not video)" if pictures else ""
        raise ValueError(
            f"{path} has no video stream (it holds {', '.join(kinds)}{cover}); pass a video file"
        )
    return container, streams[0]


def clockwise_turns(frame) -> int:
    """Quarter turns clockwise that display `frame`, from its display matrix, as FFmpeg's autorotate does.

    FFmpeg (fftools, `get_rotation`) negates the matrix's counterclockwise angle and inserts transpose=clock for
    90, hflip+vflip for 180, transpose=cclock for 270; other angles are left unrotated.
    """
    degrees = -frame.rotation % 360
    turns = round(degrees / 90)
    return turns % 4 if abs(degrees - 90 * turns) < 1 else 0


def _to_rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    """A decoded frame as displayed, RGB uint8 [H, W, 3]; scaled to `size` (height, width) when given."""
    turns = clockwise_turns(frame)
    kwargs = {}
    if size is not None:
        height, width = size if turns % 2 == 0 else size[::-1]  # scale before turning: stored orientation
        if (frame.height, frame.width) != (height, width):
            kwargs = {"width": width, "height": height, "interpolation": "AREA"}
    rgb = frame.to_ndarray(format="rgb24", **kwargs)
    return np.ascontiguousarray(np.rot90(rgb, -turns)) if turns else rgb


def _stream_duration(container, stream) -> Fraction | None:
    import av

    if stream.duration is not None:
        return stream.duration * stream.time_base
    if container.duration is not None:
        return Fraction(container.duration, av.time_base)
    return None


def probe_video(path: str | Path) -> VideoInfo:
    """Size as displayed (the first frame's display matrix applied), frame rate, frame count and duration.

    Raises FileNotFoundError for a missing file, ValueError for a file that is not a video (audio with cover art
    included) or has no decodable frame.
    """
    import av

    container, stream = _open_video(path)
    with container:
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        duration = _stream_duration(container, stream)
        duration_s = float(duration) if duration is not None else 0.0
        frame_count = stream.frames or round(duration_s * fps)
        if not duration_s and fps:
            duration_s = frame_count / fps
        try:
            first = next(container.decode(stream), None)
        except av.error.FFmpegError as e:
            raise ValueError(f"failed decoding the first frame of {path}: {e}") from e
        if first is None:
            raise ValueError(f"{path} has a video stream but no decodable frames")
        turns = clockwise_turns(first)
        width, height = (first.height, first.width) if turns % 2 else (first.width, first.height)
        return VideoInfo(width, height, fps, frame_count, duration_s, 90 * turns)


def read_frames(path: str | Path, fps: int = 30, size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Yield RGB uint8 [H, W, 3] frames as displayed, resampled to `fps` by presentation time, streaming.

    Output frame k is the latest input frame whose pts <= k / fps (times relative to the first frame, equal
    within TIMESTAMP_TOLERANCE), so any input rate, variable ones included, gives about duration * fps frames:
    frames are dropped or repeated. Each frame is rotated by its display matrix (see `clockwise_turns`). With
    `size` (height, width), every frame is scaled to it (aspect not kept), so a stream whose resolution changes
    partway still yields one size; without it, frames keep their own size.
    The file is opened here, so a bad path raises at the call, not at the first frame.
    """
    if not isinstance(fps, int) or fps <= 0:
        raise ValueError(f"fps must be a positive int, got {fps!r}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (height, width) with both >= 1, got {size!r}")
    container, stream = _open_video(path)
    return _resampled_frames(container, stream, fps, Path(path), size)


def _resampled_frames(container, stream, fps: int, path: Path, size) -> Iterator[np.ndarray]:
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
                prev_rgb = _to_rgb(prev_frame, size)
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


# libsndfile commands (sndfile.h) that soundfile has no method for.
_SFC_UPDATE_HEADER_AUTO = 0x1061
_SFC_RF64_AUTO_DOWNGRADE = 0x1210
# Sizes in a RIFF/WAVE header are 32-bit: libsndfile switches a file to RF64 once it is longer than this.
WAV_SIZE_LIMIT = 0xFFFFFFFF


class WavWriter:
    """Appends [2, n] float32 chunks to a 32-bit float WAV as they are produced, valid on disk after every write.

    Every write updates the header's sizes (libsndfile's automatic header update), so a process killed at any
    point, SIGKILL included, leaves a file that strict readers accept, holding everything written before.
    The file is libsndfile's RF64 with automatic downgrade: a plain RIFF/WAVE file (WAVE_FORMAT_EXTENSIBLE, float)
    while it is under 4 GiB (WAV_SIZE_LIMIT, about 3.1 h of 48 kHz stereo float), switched in place to RF64
    (EBU Tech 3306, 64-bit sizes) when it grows past it, where a WAV would be read back short. `container` says
    which; `on_switch` is called once with a message when the switch happens.
    """

    def __init__(
        self,
        path: str | Path,
        sample_rate: int = SAMPLE_RATE,
        on_switch: Callable[[str], None] | None = None,
    ):
        self.path = Path(path)
        self.frames_written = 0
        self.container = "WAV"
        self._on_switch = on_switch
        self._file = sf.SoundFile(
            str(self.path), "w", samplerate=sample_rate, channels=CHANNELS, subtype=WAV_SUBTYPE, format="RF64"
        )
        for command in (_SFC_RF64_AUTO_DOWNGRADE, _SFC_UPDATE_HEADER_AUTO):
            if not sf._snd.sf_command(self._file._file, command, sf._ffi.NULL, 1):
                self._file.close()
                raise RuntimeError(f"libsndfile {sf.__libsndfile_version__} refused command {command:#x}")

    def write(self, chunk: np.ndarray) -> None:
        chunk = _as_stereo(chunk)
        self._file.write(chunk.T)
        self._file.flush()
        self.frames_written += chunk.shape[1]
        if self.container == "WAV" and os.path.getsize(self.path) > WAV_SIZE_LIMIT:
            with open(self.path, "rb") as f:
                if f.read(4) == b"RF64":
                    self.container = "RF64"
                    if self._on_switch is not None:
                        self._on_switch(
                            f"{self.path} passed 4 GiB, the WAV size limit: it continues as RF64 (64-bit sizes), "
                            "which libsndfile/soundfile, FFmpeg and most audio editors read"
                        )

    def close(self) -> None:
        self._file.close()

    def frames_on_disk(self) -> int:
        """Close the file and return the frames its header holds. After an interrupt this is the exact figure:
        a signal handler runs between bytecodes, so it can land after a chunk reached the file and before
        `frames_written` counted it (a SIGTERM test caught the message one frame short of the file)."""
        self.close()
        return sf.info(str(self.path)).frames

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


def _audio_packets(
    audio_wav: Path, out_stream, start: int, num_samples: int, block: int = SAMPLE_RATE
) -> Iterator:
    """Encode the WAV as AAC from sample `start` of the output's timeline, trimmed or zero-padded to num_samples."""
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
            frame.pts = start + written
            frame.time_base = Fraction(1, SAMPLE_RATE)
            yield from out_stream.encode(frame)
            written += n
    yield from out_stream.encode(None)


def shown_span(path: str | Path) -> tuple[Fraction, Fraction]:
    """(first, end) in seconds of the frames `read_frames` shows: the smallest presentation time of the first
    video stream's packets and the largest pts + duration, from the packets themselves (no decoding)."""
    container, stream = _open_video(path)
    rate = stream.average_rate or stream.guessed_rate
    fallback = 1 / Fraction(rate) if rate else Fraction(0)
    first = end = None
    with container:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.pts is None or packet.is_discard:
                continue
            t = packet.pts * stream.time_base
            duration = packet.duration * stream.time_base if packet.duration else fallback
            first = t if first is None else min(first, t)
            end = t + duration if end is None else max(end, t + duration)
    if first is None:
        raise ValueError(f"{path} has a video stream but no timed packets; cannot place audio against it")
    return first, end


def _copier(out_stream):
    def copy(packet) -> list:
        if packet.size == 0:  # the demuxer's end-of-stream marker; a packet whose DTS is unset is still data
            return []
        packet.stream = out_stream
        return [packet]

    return copy


def _reencoder(out_stream):
    def reencode(packet) -> Iterator:
        for frame in packet.decode():  # the end-of-stream packet flushes the decoder
            frame = frame.reformat(width=out_stream.width, height=out_stream.height, format="yuv420p")
            yield from out_stream.encode(frame)
        if packet.size == 0:
            yield from out_stream.encode(None)

    return reencode


def _packet_time(packet) -> float:
    ts = packet.dts if packet.dts is not None else packet.pts
    return float(ts * packet.time_base) if ts is not None and packet.time_base else 0.0


def mux(video_in: str | Path, audio_wav: str | Path, out_path: str | Path) -> list[str]:
    """Write an MP4 with every video stream of video_in and audio_wav as AAC 48 kHz stereo.

    Video streams are copied packet for packet with their timestamps, so they keep all their frames and stay in
    sync; one whose codec MP4 cannot hold (VP8, Theora, ...) is re-encoded to H.264 (MPEG-4 part 2 without
    libx264). Attached pictures are left out. The audio starts at the first shown frame of the first video
    stream (the one `read_frames` reads) and is trimmed or zero-padded to that stream's last frame's end (see
    `shown_span`). The file is written under a temporary name in out_path's folder and renamed when complete,
    so out_path never holds a partial file. Returns one line per video stream saying copied or re-encoded.
    """
    import av

    audio_wav, out_path = Path(audio_wav), Path(out_path)
    if not audio_wav.is_file():
        raise FileNotFoundError(f"audio file not found: {audio_wav}")
    info = sf.info(str(audio_wav))
    if info.samplerate != SAMPLE_RATE or info.channels != CHANNELS:
        raise ValueError(
            f"{audio_wav} is {info.samplerate} Hz with {info.channels} channels; "
            f"expected {SAMPLE_RATE} Hz stereo (resample it first)"
        )
    first, end = shown_span(video_in)
    fd, partial = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".partial")
    os.close(fd)
    try:
        container, _ = _open_video(video_in)
        with container, av.open(partial, "w", format="mp4") as out:
            lines = []
            handlers = {}
            streams = video_streams(container)
            for stream in streams:
                if stream.codec_context.name in out.supported_codecs:
                    handlers[stream.index] = _copier(out.add_stream_from_template(stream))
                    lines.append(f"video stream {stream.index} ({stream.codec_context.name}): copied")
                    continue
                rate = stream.average_rate or stream.guessed_rate or 30
                out_video = out.add_stream(pick_video_encoder(), rate=rate)
                # yuv420p needs even sides.
                out_video.width, out_video.height = stream.width // 2 * 2, stream.height // 2 * 2
                out_video.pix_fmt = "yuv420p"
                handlers[stream.index] = _reencoder(out_video)
                lines.append(
                    f"video stream {stream.index} ({stream.codec_context.name}): re-encoded as "
                    f"{out_video.codec_context.name} (MP4 cannot hold {stream.codec_context.name})"
                )
            out_audio = out.add_stream("aac", rate=SAMPLE_RATE, layout="stereo")
            start = round(first * SAMPLE_RATE)
            audio_packets = _audio_packets(audio_wav, out_audio, start, math.ceil(end * SAMPLE_RATE) - start)
            video_packets = (
                out_packet
                for packet in container.demux(*streams)
                for out_packet in handlers[packet.stream.index](packet)
            )
            # Merge by time so the muxer interleaves without buffering a whole stream in memory.
            for packet in heapq.merge(video_packets, audio_packets, key=_packet_time):
                out.mux(packet)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)  # mkstemp made it private; the output gets a new file's usual mode
        os.replace(partial, out_path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return lines
