"""Video in (PyAV), audio out (soundfile), and muxing the two into an MP4.

Frames are read as FFmpeg shows them: turned and flipped by the stream's display matrix, from the first video
stream that is not an attached picture (cover art). A source is read once, front to back (`VideoReader`), so
pipes, FIFOs and standard input work as files do. PyAV is imported inside the functions so that importing the package stays
cheap and works without FFmpeg.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf

from soundreactor.outputs import MP4_SUFFIXES, WAV_SUFFIXES, check_suffix

SAMPLE_RATE = 48000
CHANNELS = 2
# WAV is stored as 32-bit float: the decoder's samples round-trip exactly and overshoot past +-1 is kept, not
# clipped; PCM_16 would quantize to 1/32768 and clip, hiding what the model actually produced.
WAV_SUBTYPE = "FLOAT"
# Times this close count as equal when resampling: MKV/WebM store whole milliseconds, so a 60 fps frame due at
# 66.67 ms is stamped 67 ms and would otherwise lose its slot at the 30 fps tick 66.67 ms.
TIMESTAMP_TOLERANCE = Fraction(1, 1000)


STDIN = "-"  # the `--video` name for standard input


@dataclass(frozen=True)
class VideoInfo:
    width: int  # as displayed, after the display matrix's rotation and mirroring
    height: int
    fps: float  # average frame rate of the stream (0.0 when the container does not say)
    frame_count: int  # from the container when it says, else duration * fps; 0 when it states neither
    duration_s: float  # from the container's header: 0.0 when it states none (live captures, browser WebM)
    rotation: int = 0  # clockwise degrees (0, 90, 180, 270) applied to the stored frames to display them
    mirrored: bool = (
        False  # flipped left-right after the rotation (a display matrix with negative determinant)
    )


def _is_attached_picture(stream) -> bool:
    import av

    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def video_streams(container) -> list:
    """The container's video streams, without attached pictures (cover art, thumbnails), which are single images."""
    return [s for s in container.streams.video if not _is_attached_picture(s)]


def first_video_stream(container, name: str):
    """The stream `read_frames` reads; ValueError saying what the container holds instead when it has none."""
    streams = video_streams(container)
    if not streams:
        kinds = sorted({s.type for s in container.streams if not _is_attached_picture(s)}) or ["nothing"]
        pictures = len(container.streams.video)
        cover = f" and {pictures} attached picture(s) (cover art, not video)" if pictures else ""
        raise ValueError(
            f"{name} has no video stream (it holds {', '.join(kinds)}{cover}); pass a video file"
        )
    return streams[0]


class _Tee:
    """A one-way byte source for PyAV (no `seek`, so FFmpeg reads it once, in order) that copies what it reads
    into `copy` when given: the video read from a pipe is kept for muxing afterwards."""

    def __init__(self, source, copy=None):
        self.source, self.copy = source, copy

    def read(self, n: int) -> bytes:
        data = self.source.read(n)
        if self.copy is not None:
            self.copy.write(data)
        return data

    def drain(self) -> None:
        """Copy the rest of the source: the demuxer may stop before the last bytes (trailing index, padding)."""
        while self.copy is not None and self.read(1 << 20):
            pass


def _source_name(source: str | Path) -> str:
    return "standard input" if str(source) == STDIN else str(source)


class VideoReader:
    """One video source read once, in one pass: a file, a FIFO, a pipe, or standard input (`-`).

    Opening decodes the first frame, so `info` (size as displayed, rate, duration as the header states it) is known
    before any frame is consumed; `frames` then carries on the same decode from that frame. Nothing is opened
    twice, so a source that can be read only once works like a file. With `keep`, a source that cannot be
    reopened (not a regular file) is also copied there as it is read: `replayable` is then that copy (complete
    after `finish`), for muxing. Raises FileNotFoundError for a missing path, ValueError for a folder, a file
    that is not a video (audio with cover art included) or one with no decodable frame.
    """

    def __init__(self, source: str | Path, keep: str | Path | None = None):
        import av

        self.name = _source_name(source)
        self._tee = self._keep = None
        path = Path(source)
        if str(source) != STDIN:
            if path.is_dir():
                raise ValueError(f"{path} is a folder: give a video file (MP4, MKV, WebM, ...)")
            if not path.exists():
                raise FileNotFoundError(f"video file not found: {path}")
        regular = str(source) != STDIN and path.is_file()
        self.replayable: Path | None = path if regular else None
        try:
            if regular:
                self.container = av.open(str(path))
            else:
                raw = sys.stdin.buffer if str(source) == STDIN else open(path, "rb")  # noqa: SIM115 (closed below)
                if keep is not None:
                    self._keep = open(keep, "wb")  # noqa: SIM115 (closed in finish)
                    self.replayable = Path(keep)
                self._tee = _Tee(raw, self._keep)
                self.container = av.open(self._tee, "r")
        except av.error.FFmpegError as e:
            self.close()
            hint = (
                "; a pipe is read once, front to back, so an MP4 needs its index first (`ffmpeg -movflags "
                "+faststart` or fragmented MP4), or send MKV, WebM or MPEG-TS"
                if not regular
                else ""
            )
            raise ValueError(
                f"cannot read {self.name} as a video (expected MP4, MKV, WebM, ...): {e}{hint}"
            ) from e
        try:
            self.stream = first_video_stream(self.container, self.name)
            self.stream.thread_type = "AUTO"
            self._decoded = self.container.decode(self.stream)
            try:
                first = next(self._decoded, None)
            except av.error.FFmpegError as e:
                raise ValueError(f"failed decoding the first frame of {self.name}: {e}") from e
            if first is None:
                raise ValueError(f"{self.name} has a video stream but no decodable frames")
        except BaseException:
            self.close()
            raise
        self._first = first
        self.info = self._info(first)

    def _info(self, first) -> VideoInfo:
        rate = self.stream.average_rate or self.stream.guessed_rate
        fps = float(rate) if rate else 0.0
        duration = _stream_duration(self.container, self.stream)
        duration_s = float(duration) if duration is not None else 0.0
        frame_count = self.stream.frames or round(duration_s * fps)
        if not duration_s and fps:
            duration_s = frame_count / fps
        orientation = display_orientation(first)
        width, height = (first.height, first.width) if orientation.swap else (first.width, first.height)
        return VideoInfo(
            width, height, fps, frame_count, duration_s, orientation.degrees, orientation.mirrored
        )

    def frames(self, fps: int = 30, size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
        """RGB uint8 [H, W, 3] frames as displayed, resampled to `fps` (see `read_frames`), to the source's end:
        the header's duration bounds nothing. Once per reader."""
        if not isinstance(fps, int) or fps <= 0:
            raise ValueError(f"fps must be a positive int, got {fps!r}")
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ValueError(f"size must be (height, width) with both >= 1, got {size!r}")
        if self._first is None:
            raise RuntimeError(f"the frames of {self.name} were already read: open it again")
        first, self._first = self._first, None
        return _resampled_frames(itertools.chain([first], self._decoded), self.stream, fps, self.name, size)

    def finish(self) -> Path | None:
        """Read what is left of the source into the copy (when keeping one), close, and return `replayable`."""
        if self._tee is not None:
            self._tee.drain()
        self.close()
        return self.replayable

    def close(self) -> None:
        if getattr(self, "container", None) is not None:
            self.container.close()
        if self._tee is not None and self._tee.source is not sys.stdin.buffer:
            self._tee.source.close()
        if self._keep is not None:
            self._keep.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _open_video(path: str | Path):
    """Open a regular video file and its first video stream, for the passes over packets that muxing makes."""
    import av

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give a video file (MP4, MKV, WebM, ...)")
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read {path} as a video (expected MP4, MKV, WebM, ...): {e}") from e
    try:
        return container, first_video_stream(container, str(path))
    except ValueError:
        container.close()
        raise


@dataclass(frozen=True)
class Orientation:
    """How a display matrix turns stored frames into displayed ones: transpose (`swap`), then flip columns and
    rows; `degrees` clockwise and `mirrored` say the same as a rotation followed by a left-right flip."""

    swap: bool = False
    flip_columns: bool = False
    flip_rows: bool = False

    @property
    def degrees(self) -> int:
        return _ORIENTATIONS[self][0]

    @property
    def mirrored(self) -> bool:
        return _ORIENTATIONS[self][1]

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        if self == Orientation():
            return rgb
        if self.swap:
            rgb = rgb.transpose(1, 0, 2)
        if self.flip_columns:
            rgb = rgb[:, ::-1]
        if self.flip_rows:
            rgb = rgb[::-1]
        return np.ascontiguousarray(rgb)


# (swap, flip columns, flip rows) -> (clockwise degrees, mirrored): the eight ways to lay a frame on the screen.
_ORIENTATIONS = {
    Orientation(False, False, False): (0, False),
    Orientation(False, True, False): (0, True),
    Orientation(False, True, True): (180, False),
    Orientation(False, False, True): (180, True),
    Orientation(True, True, False): (90, False),
    Orientation(True, False, False): (90, True),
    Orientation(True, False, True): (270, False),
    Orientation(True, True, True): (270, True),
}


def display_orientation(frame) -> Orientation:
    """How to show `frame`, from its display matrix, as FFmpeg's autorotate does (fftools: transpose for 90 and
    270 degrees, hflip/vflip for the mirrored and 180-degree cases; other angles are left unrotated).

    The matrix maps a stored pixel (x, y) to (a x + c y, b x + d y) on screen (libavutil/display.h), y down.
    """
    side = frame.side_data.get("DISPLAYMATRIX")
    if side is None:
        return Orientation()
    a, b, _, c, d, *_ = np.frombuffer(bytes(side), dtype="<i4", count=9).tolist()
    if b == 0 and c == 0 and a and d:
        return Orientation(False, a < 0, d < 0)
    if a == 0 and d == 0 and b and c:
        return Orientation(True, c < 0, b < 0)
    return Orientation()  # an angle between quarter turns, or a degenerate matrix: shown as stored


def _to_rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    """A decoded frame as displayed, RGB uint8 [H, W, 3]; scaled to `size` (height, width) when given."""
    orientation = display_orientation(frame)
    kwargs = {}
    if size is not None:
        height, width = size[::-1] if orientation.swap else size  # scale before turning: stored orientation
        if (frame.height, frame.width) != (height, width):
            kwargs = {"width": width, "height": height, "interpolation": "AREA"}
    return orientation.apply(frame.to_ndarray(format="rgb24", **kwargs))


def _stream_duration(container, stream) -> Fraction | None:
    import av

    if stream.duration is not None:
        return stream.duration * stream.time_base
    if container.duration is not None:
        return Fraction(container.duration, av.time_base)
    return None


def probe_video(source: str | Path) -> VideoInfo:
    """Size as displayed (the first frame's display matrix applied), frame rate, frame count and duration.

    Raises FileNotFoundError for a missing file, ValueError for a folder, a file that is not a video (audio with
    cover art included) or has no decodable frame. A source that can be read once (a pipe) is spent by this:
    open a `VideoReader` and use its `info` and `frames` instead.
    """
    with VideoReader(source) as reader:
        return reader.info


def read_frames(
    source: str | Path, fps: int = 30, size: tuple[int, int] | None = None
) -> Iterator[np.ndarray]:
    """Yield RGB uint8 [H, W, 3] frames as displayed, resampled to `fps` by presentation time, streaming.

    Output frame k is the latest input frame whose pts <= k / fps (times relative to the first frame, equal
    within TIMESTAMP_TOLERANCE), so any input rate, variable ones included, gives about duration * fps frames:
    frames are dropped or repeated. Each frame is turned and flipped by its display matrix (see
    `display_orientation`). With `size` (height, width), every frame is scaled to it (aspect not kept), so a
    stream whose resolution changes partway still yields one size; without it, frames keep their own size.
    The source is opened here, so a bad path raises at the call, not at the first frame.
    """
    reader = VideoReader(source)
    try:
        frames = reader.frames(fps, size)
    except BaseException:
        reader.close()
        raise
    return _closing(frames, reader)


def _closing(frames: Iterator[np.ndarray], reader: VideoReader) -> Iterator[np.ndarray]:
    with reader:
        yield from frames


def _resampled_frames(decoded: Iterator, stream, fps: int, name: str, size) -> Iterator[np.ndarray]:
    import av

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

    try:
        for frame in decoded:
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
        raise ValueError(f"failed decoding {name} after {k} output frames: {e}") from e
    if prev_frame is None:
        raise ValueError(f"{name} has a video stream but no decodable frames")
    # The last frame is shown until its own end time.
    yield from emit_prev_until(prev_time + frame_duration)


def shown_name(path: str | Path) -> str:
    """A path as text that any terminal prints: bytes that are not UTF-8 (kept by Python as surrogates) are
    shown as \\xNN escapes instead of failing the print."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
        check_suffix("output", self.path, WAV_SUFFIXES, "a WAV file")
        self.frames_written = 0
        self.container = "WAV"
        self._on_switch = on_switch
        try:  # opened here first for the OS's own reason (read-only, virtual file system): libsndfile's is vague
            open(self.path, "wb").close()
        except OSError as err:
            raise OSError(f"cannot write {shown_name(self.path)}: {err.strerror}") from None
        try:
            self._file = sf.SoundFile(
                os.fsencode(self.path),  # bytes: a name that is not valid UTF-8 is written as given
                "w",
                samplerate=sample_rate,
                channels=CHANNELS,
                subtype=WAV_SUBTYPE,
                format="RF64",
            )
        except sf.LibsndfileError as err:  # read-only or virtual file systems refuse here, after the checks
            raise OSError(f"cannot write {shown_name(self.path)}: {err.error_string}") from None
        for command in (_SFC_RF64_AUTO_DOWNGRADE, _SFC_UPDATE_HEADER_AUTO):
            if not sf._snd.sf_command(self._file._file, command, sf._ffi.NULL, 1):
                self._file.close()
                raise RuntimeError(f"libsndfile {sf.__libsndfile_version__} refused command {command:#x}")

    def write(self, chunk: np.ndarray) -> None:
        """Append a chunk; ValueError, writing nothing, if it holds NaN or infinite samples (no reader or encoder
        downstream handles them: they play as noise or silence, or break a mix)."""
        chunk = _as_stereo(chunk)
        if not np.isfinite(chunk).all():
            seconds = self.frames_written / self._file.samplerate
            raise ValueError(
                f"audio holding NaN or infinite samples was not written to {shown_name(self.path)}, which holds "
                f"the first {seconds:.2f} s"
            )
        try:
            self._write(chunk)
        except sf.LibsndfileError as err:  # libsndfile reports a refused write (ENOSPC, EFBIG) without errno
            reason = err.error_string or "the system refused the write"
            seconds = self.frames_on_disk() / self._file.samplerate  # part of this chunk may have landed
            raise OSError(
                f"writing {shown_name(self.path)} failed ({reason}: is the disk full?); it holds the first "
                f"{seconds:.2f} s of audio, complete up to there; free space and run again"
            ) from None
        self.frames_written += chunk.shape[1]

    def _write(self, chunk: np.ndarray) -> None:
        self._file.write(chunk.T)
        self._file.flush()
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
        with sf.SoundFile(os.fsencode(self.path)) as written:
            return written.frames

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

    with sf.SoundFile(os.fsencode(audio_wav)) as wav:
        written = 0
        while written < num_samples:
            n = min(block, num_samples - written)
            chunk = wav.read(n, dtype="float32", always_2d=True)
            if not np.isfinite(chunk).all():
                at = (written + int(np.argmin(np.isfinite(chunk).all(axis=1)))) / SAMPLE_RATE
                raise ValueError(
                    f"{shown_name(audio_wav)} holds NaN or infinite samples ({at:.2f} s in): an AAC encoder "
                    "would turn them into noise or silence, so the MP4 is not written; regenerate the audio"
                )
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


def _even_side(pixels: int) -> int:
    """An encoder's side for a stored side: yuv420p needs even sides of at least 2, so odd ones round up (a
    1-pixel-wide video is scaled to 2, never to 0)."""
    return max(2, pixels + pixels % 2)


def mux(video_in: str | Path, audio_wav: str | Path, out_path: str | Path) -> list[str]:
    """Write an MP4 with every video stream of video_in and audio_wav as AAC 48 kHz stereo.

    Video streams are copied packet for packet with their timestamps, so they keep all their frames and stay in
    sync; one whose codec MP4 cannot hold (VP8, Theora, ...) is re-encoded to H.264 (MPEG-4 part 2 without
    libx264). Attached pictures are left out. The audio starts at the first shown frame of the first video
    stream (the one `read_frames` reads) and is trimmed or zero-padded to that stream's last frame's end (see
    `shown_span`). The file is written as `<out_path>.partial` beside it and renamed when complete, so out_path
    never holds a partial file; a failure removes the partial file, and one left by a killed process is in plain
    sight and replaced by the next mux to that name. Returns one line per video stream saying copied or
    re-encoded. out_path must be named .mp4 or .m4v: MP4 is what is written.
    """
    import av

    audio_wav, out_path = Path(audio_wav), Path(out_path)
    check_suffix("output", out_path, MP4_SUFFIXES, "an MP4 file")
    if not audio_wav.is_file():
        raise FileNotFoundError(f"audio file not found: {audio_wav}")
    info = sf.info(os.fsencode(audio_wav))
    if info.samplerate != SAMPLE_RATE or info.channels != CHANNELS:
        raise ValueError(
            f"{audio_wav} is {info.samplerate} Hz with {info.channels} channels; "
            f"expected {SAMPLE_RATE} Hz stereo (resample it first)"
        )
    first, end = shown_span(video_in)
    partial = out_path.with_name(out_path.name + ".partial")
    try:
        container, _ = _open_video(video_in)
        with container, av.open(str(partial), "w", format="mp4") as out:
            lines = []
            handlers = {}
            streams = video_streams(container)
            for stream in streams:
                # The codec's own name: the decoder's may differ (AV1 decoded by libdav1d), and copying needs no
                # encoder, so the template's codec (the decoder) carries the stream's parameters (opaque).
                codec = stream.codec_context.codec.canonical_name
                if codec in out.supported_codecs:
                    handlers[stream.index] = _copier(out.add_stream_from_template(stream, opaque=True))
                    lines.append(f"video stream {stream.index} ({codec}): copied")
                    continue
                rate = stream.average_rate or stream.guessed_rate or 30
                out_video = out.add_stream(pick_video_encoder(), rate=rate)
                out_video.width, out_video.height = _even_side(stream.width), _even_side(stream.height)
                out_video.pix_fmt = "yuv420p"
                handlers[stream.index] = _reencoder(out_video)
                lines.append(
                    f"video stream {stream.index} ({codec}): re-encoded as "
                    f"{out_video.codec_context.name} (MP4 cannot hold {codec})"
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
        os.replace(partial, out_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return lines
