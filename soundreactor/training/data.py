"""A folder of the user's own videos as training clips, and the on-disk cache of DINOv2 grids.

Videos are read with PyAV: frames resampled to 30 fps by soundreactor.media.read_frames, audio resampled to 48 kHz
stereo float by `av.AudioResampler`, both cut into clips of `n_frames` frames (1600 samples each) that start on
the same instant: audio sample 0 is the first video frame's presentation time.

DINOv2 is frozen during training (the paper's section 3), so its grids for a clip never change: `GridCache`
computes them once per clip and keeps them on disk under a folder named by the DINOv2 weights' hash, the frame
size and the model's vision size, so other weights or sizes never read stale grids.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from soundreactor.files import atomic_write
from soundreactor.media import SAMPLE_RATE, read_frames, video_streams
from soundreactor.model.frames import FramePreprocess
from soundreactor.training.synthetic import FPS, SAMPLES_PER_FRAME, Clip

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")


def read_audio(path: str | Path) -> np.ndarray:
    """The first audio stream of a video as float32 [2, N] at 48 kHz, aligned so sample 0 is the first video
    frame's time (audio before it is dropped, a late start is padded with silence).

    Raises ValueError when the file has no audio stream.
    """
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio track; training needs videos with their sound")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=SAMPLE_RATE)
        chunks, first_time = [], None
        for frame in container.decode(stream):
            if first_time is None and frame.pts is not None:
                first_time = frame.pts * stream.time_base
            chunks += [f.to_ndarray() for f in resampler.resample(frame)]
        chunks += [f.to_ndarray() for f in resampler.resample(None)]
        video = container.streams.video[0] if container.streams.video else None
        video_start = (
            video.start_time * video.time_base if video is not None and video.start_time is not None else 0
        )
    audio = np.concatenate(chunks, axis=1).astype(np.float32) if chunks else np.zeros((2, 0), np.float32)
    offset = round((Fraction(first_time or 0) - Fraction(video_start)) * SAMPLE_RATE)
    if offset > 0:
        return np.pad(audio, ((0, 0), (offset, 0)))
    return audio[:, -offset:]


def measured_seconds(path: Path) -> float:
    """Seconds of `path` that have both video and sound, from the first video frame: the end of its packets
    (demuxed, not decoded), never the duration its header states, which a truncated or still-growing file
    overstates and a live capture leaves out. A read error ends the measure where the readable part ends.

    Raises ValueError naming what is missing (no video stream, no audio track), or av.error.FFmpegError when the
    file cannot be opened.
    """
    import av

    with av.open(str(path)) as container:
        videos = video_streams(container)
        if not videos:
            raise ValueError("not a video: it has no video stream")
        if not container.streams.audio:
            raise ValueError("no audio track")
        video, audio = videos[0], container.streams.audio[0]
        first, ends = None, {video.index: Fraction(0), audio.index: Fraction(0)}
        try:
            for packet in container.demux(video, audio):
                # AVI packets may carry only a DTS
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is None or packet.size == 0:
                    continue
                t = stamp * packet.time_base
                ends[packet.stream.index] = max(
                    ends[packet.stream.index], t + (packet.duration or 0) * packet.time_base
                )
                if packet.stream.index == video.index:
                    first = t if first is None else min(first, t)
        except av.error.FFmpegError:
            pass  # damaged from here on: what was read before is what the file holds
    if first is None:
        raise ValueError("not a video: its video stream has no frames")
    return float(min(ends.values()) - first)


class VideoFolder(torch.utils.data.Dataset):
    """Clips of `n_frames` frames (30 fps) with their 48 kHz stereo audio, from every video under `root`.

    Each video gives floor(seconds * 30 / n_frames) consecutive, non-overlapping clips, `seconds` measured from
    its packets (`measured_seconds`); item i is a Clip with frames uint8 [n_frames, H, W, 3] (the video's own
    size), audio float32 [2, n_frames * 1600] and no events. Reading clip k decodes its video from the start
    (PyAV cannot seek to an exact 30 fps slot), so cut long videos into short files first.
    Files that give no clip are listed in `skipped` with the reason (not a video, no audio track, too short,
    unreadable); `report()` says so. A clip that cannot be read when training draws it (the file was truncated
    or changed, its audio holds NaN) is replaced by the next readable clip, with a message, instead of stopping
    the run; a resumed run measures the file again. Files and folders whose names start with a dot are ignored.
    Raises FileNotFoundError for a missing folder and ValueError when it holds no usable video.
    """

    def __init__(self, root: str | Path, n_frames: int) -> None:
        import av

        self.root, self.n_frames = Path(root), n_frames
        if n_frames < 1:
            raise ValueError(f"n_frames must be at least 1, got {n_frames}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder not found: {self.root}")
        self.items: list[tuple[Path, int]] = []  # (video, first frame)
        self.skipped: list[tuple[Path, str]] = []
        self.replaced: dict[int, int] = {}  # item -> the readable item read in its place
        self.unreadable: dict[int, str] = {}  # item -> why it could not be read
        self.videos = 0
        files = (p for p in self.root.rglob("*") if p.is_file())
        for path in sorted(
            p for p in files if not any(s.startswith(".") for s in p.relative_to(self.root).parts)
        ):
            if path.suffix.lower() not in VIDEO_SUFFIXES:
                self.skipped.append((path, f"not a video (read: {', '.join(VIDEO_SUFFIXES)})"))
                continue
            try:
                seconds = measured_seconds(path)
            except (
                av.error.FFmpegError,
                OSError,
            ) as e:  # before ValueError: FFmpeg's InvalidDataError is one
                self.skipped.append((path, f"unreadable: {e}"))
                continue
            except ValueError as e:
                self.skipped.append((path, str(e)))
                continue
            count = int(seconds * FPS + 1e-6) // n_frames
            if not count:
                self.skipped.append(
                    (path, f"too short: {seconds:.2f} s with sound, a clip is {n_frames / FPS:.2f} s")
                )
                continue
            self.videos += 1
            self.items += [(path, k * n_frames) for k in range(count)]
        if not self.items:
            raise ValueError(
                f"no video under {self.root} gives a clip of {n_frames} frames with audio; "
                + "; ".join(f"{p.name}: {why}" for p, why in self.skipped[:8])
                + (f"; ... ({len(self.skipped)} files skipped)" if len(self.skipped) > 8 else "")
            )

    def report(self) -> list[str]:
        """What the folder gave, and every file it skipped with the reason."""
        videos = f"{self.videos} video" + ("s" if self.videos != 1 else "")
        lines = [f"{self.root}: {len(self.items)} clips of {self.n_frames} frames from {videos}"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} files:")
            lines += [f"  {path.relative_to(self.root)}: {why}" for path, why in self.skipped]
        return lines

    def __len__(self) -> int:
        return len(self.items)

    def clip_id(self, i: int) -> str:
        """A GridCache id for item i that changes when the file does (path, size, mtime, first frame, length)."""
        path, start = self.items[self.replaced.get(i, i)]
        stat = path.stat()
        return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{start}|{self.n_frames}"

    def clip_name(self, i: int) -> str:
        """Where item i comes from, for messages: the file and its frames at 30 fps."""
        path, start = self.items[i]
        return f"{path} frames {start}..{start + self.n_frames - 1}"

    def __getitem__(self, i: int) -> Clip:
        """Clip i, or, when it cannot be read, the first readable clip after it (see the class docstring)."""
        import av

        if not 0 <= i < len(self.items):
            raise IndexError(f"clip index {i} out of range for a VideoFolder of {len(self.items)} clips")
        j = self.replaced.get(i, i)
        while True:
            if j not in self.unreadable:
                try:
                    return self._read(j)
                except (ValueError, av.error.FFmpegError, OSError) as e:
                    self.unreadable[j] = str(e)
            j = (j + 1) % len(self.items)
            if j == i:
                raise ValueError(
                    f"no clip under {self.root} can be read any more (first: {self.unreadable[i]})"
                )
            if j not in self.unreadable:
                print(
                    f"skipping {self.clip_name(i)}: {self.unreadable[i]}; reading {self.clip_name(j)} instead",
                    file=sys.stderr,
                )
                self.replaced[i] = j

    def _read(self, i: int) -> Clip:
        path, start = self.items[i]
        frames = list(itertools.islice(read_frames(path, FPS), start, start + self.n_frames))
        if len(frames) < self.n_frames - 1:  # one frame short is rounding of the measured length
            raise ValueError(
                f"{path} ends at frame {start + len(frames)} (truncated or changed since scanned)"
            )
        frames += [frames[-1]] * (self.n_frames - len(frames))
        n = self.n_frames * SAMPLES_PER_FRAME
        audio = read_audio(path)[:, start * SAMPLES_PER_FRAME :][:, :n]
        if audio.shape[1] < n - SAMPLES_PER_FRAME:
            raise ValueError(f"{path}'s audio ends inside this clip (truncated or changed since scanned)")
        if not np.isfinite(audio).all():
            raise ValueError(f"{path}'s audio holds NaN or infinite samples")
        audio = np.pad(audio, ((0, 0), (0, n - audio.shape[1])))
        return Clip(np.stack(frames), np.ascontiguousarray(audio), ())


@torch.no_grad()
def clip_grids(model, frames: np.ndarray | Tensor, batch: int = 16) -> Tensor:
    """DINOv2 grids of a clip through the model's own frame preprocessing and DINOv2 modules.

    model: a SoundReactor; frames: uint8 [T, H, W, 3] RGB of any size (resized to `config.vision_hw` exactly as
    streaming does). Returns float32 [T, gh, gw, dim] on the model's device, computed `batch` frames at a time.
    """
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] RGB, got {frames.dtype} {list(frames.shape)}")
    device = next(model.parameters()).device
    preprocess = model.vision.preprocess
    if tuple(frames.shape[1:3]) != preprocess.input_hw:
        preprocess = FramePreprocess(tuple(frames.shape[1:3]), model.config.vision_hw).to(device)
    dinov2 = model.vision.dinov2
    grids = [dinov2(preprocess(chunk.to(device))) for chunk in frames.split(batch)]
    return torch.cat(grids).float()


def weights_hash(module: torch.nn.Module) -> str:
    """SHA-256 (hex) of a module's state dict: every key, dtype, shape and byte, in key order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class GridCache:
    """DINOv2 grids of training clips, computed once and kept as safetensors files under `root`.

    Files live in `root/<DINOv2 weights hash[:16]>-<vision H>x<W>/<frames H>x<W>/<sha256(clip_id)[:32]>.safetensors`,
    so other DINOv2 weights or sizes never read them; the clip id (which must identify the clip's content, e.g.
    VideoFolder.clip_id or the synthetic seed, index and length) is stored inside and checked on read. Writes go to
    a temporary file renamed into place, so a killed run or a concurrent DDP rank never leaves a torn file.
    Grids are stored as `dtype` (float16 by default: half the disk, about 1e-3 relative error on LayerNorm
    outputs) and returned as float32 on the model's device. `hits` and `misses` count lookups.
    """

    def __init__(self, root: str | Path, model, dtype: torch.dtype = torch.float16) -> None:
        self.model, self.dtype = model, dtype
        vh, vw = model.config.vision_hw
        self.root = Path(root) / f"{weights_hash(model.vision.dinov2)[:16]}-{vh}x{vw}-{str(dtype)[6:]}"
        self.hits = self.misses = 0

    def path(self, clip_id: str, frame_hw: tuple[int, int]) -> Path:
        name = hashlib.sha256(clip_id.encode()).hexdigest()[:32]
        return self.root / f"{frame_hw[0]}x{frame_hw[1]}" / f"{name}.safetensors"

    def grids(self, clip_id: str, frames: np.ndarray | Tensor) -> Tensor:
        """float32 [T, gh, gw, dim] for the clip: read from disk when cached, else computed and stored."""
        from safetensors.torch import save_file

        path = self.path(clip_id, tuple(frames.shape[1:3]))
        device = next(self.model.parameters()).device
        grids = self._read(path, clip_id)
        if grids is not None and grids.shape[0] == frames.shape[0]:
            self.hits += 1
            return grids.to(device=device, dtype=torch.float32)
        self.misses += 1
        # Rounded to the stored dtype, so a run gets the same values whether the cache was warm or cold.
        grids = clip_grids(self.model, frames).to(self.dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"clip_id": clip_id, "shape": json.dumps(list(grids.shape))}
        atomic_write(
            path, lambda temp: save_file({"grids": grids.cpu().contiguous()}, str(temp), metadata=metadata)
        )
        return grids.float()

    @staticmethod
    def _read(path: Path, clip_id: str) -> Tensor | None:
        """The stored grids of `clip_id`, or None when absent, stored for another clip, damaged (a disk fault, a
        copy cut short) or not finite: those are computed again and overwritten, never a crash on every resume."""
        from safetensors import SafetensorError, safe_open

        if not path.exists():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("clip_id") != clip_id:
                    return None
                grids = f.get_tensor("grids")
        except (SafetensorError, OSError, KeyError):
            return None
        return grids if torch.isfinite(grids).all() else None
