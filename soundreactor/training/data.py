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
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from soundreactor.files import atomic_write
from soundreactor.media import SAMPLE_RATE, probe_video, read_frames
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


class VideoFolder(torch.utils.data.Dataset):
    """Clips of `n_frames` frames (30 fps) with their 48 kHz stereo audio, from every video under `root`.

    Each video gives floor(duration * 30 / n_frames) consecutive, non-overlapping clips; item i is a Clip with
    frames uint8 [n_frames, H, W, 3] (the video's own size), audio float32 [2, n_frames * 1600] and no events.
    Reading clip k decodes its video from the start (PyAV cannot seek to an exact 30 fps slot), so cut long
    videos into short files first. Videos without audio are skipped and listed in `skipped`.
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
        for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES):
            try:
                with av.open(str(path)) as container:
                    has_audio = bool(container.streams.audio)
                info = probe_video(path)
            except (av.error.FFmpegError, ValueError) as e:
                self.skipped.append((path, str(e)))
                continue
            if not has_audio:
                self.skipped.append((path, "no audio track"))
                continue
            count = int(info.duration_s * FPS + 1e-6) // n_frames
            self.items += [(path, k * n_frames) for k in range(count)]
        if not self.items:
            raise ValueError(
                f"no video under {self.root} gives a clip of {n_frames} frames with audio "
                f"(suffixes {', '.join(VIDEO_SUFFIXES)}; skipped: {len(self.skipped)})"
            )

    def __len__(self) -> int:
        return len(self.items)

    def clip_id(self, i: int) -> str:
        """A GridCache id for item i that changes when the file does (path, size, mtime, first frame, length)."""
        path, start = self.items[i]
        stat = path.stat()
        return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{start}|{self.n_frames}"

    def clip_name(self, i: int) -> str:
        """Where item i comes from, for messages: the file and its frames at 30 fps."""
        path, start = self.items[i]
        return f"{path} frames {start}..{start + self.n_frames - 1}"

    def __getitem__(self, i: int) -> Clip:
        if not 0 <= i < len(self.items):
            raise IndexError(f"clip index {i} out of range for a VideoFolder of {len(self.items)} clips")
        path, start = self.items[i]
        frames = list(itertools.islice(read_frames(path, FPS), start, start + self.n_frames))
        if not frames:
            raise ValueError(f"{path} ended before frame {start}: its duration in the container is wrong")
        frames += [frames[-1]] * (self.n_frames - len(frames))  # a duration rounded up: repeat the last frame
        n = self.n_frames * SAMPLES_PER_FRAME
        audio = read_audio(path)[:, start * SAMPLES_PER_FRAME :][:, :n]
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
        from safetensors import safe_open
        from safetensors.torch import save_file

        path = self.path(clip_id, tuple(frames.shape[1:3]))
        device = next(self.model.parameters()).device
        if path.exists():
            with safe_open(str(path), "pt") as f:
                if f.metadata().get("clip_id") == clip_id:
                    grids = f.get_tensor("grids")
                    if grids.shape[0] == frames.shape[0]:
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
