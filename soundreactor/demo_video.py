"""A synthetic demo clip: colored circles and squares bouncing off the walls and off each other.

Rendered with numpy only and deterministic for a seed, so demos and tests need no video assets. Collisions are
elastic between discs (a square collides as the disc inscribed in it), with mass proportional to area. The physics
step reports its collisions, so the training set (soundreactor.training.synthetic) shares this scene and sounds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soundreactor.media import pick_video_encoder

BACKGROUND = np.array([24, 26, 34], np.uint8)
PALETTE = np.array(
    [[230, 80, 70], [70, 170, 230], [240, 200, 60], [110, 210, 120], [200, 110, 220], [250, 150, 60]],
    np.uint8,
)


@dataclass(frozen=True)
class Collision:
    """One impact found by `step`, in pixels; `j` is -1 for a wall."""

    i: int
    j: int
    y: float  # contact point
    x: float
    speed: float  # closing speed along the contact normal, pixels per second


def initial_shapes(
    rng: np.random.Generator, height: int, width: int, count: int, speed: tuple[float, float] = (0.3, 0.6)
):
    """Non-overlapping random discs (rejection sampling) with speeds in `speed` short sides per second.

    Returns (centers [N, 2] (y, x) px, velocities [N, 2] px/s, radii [N] px, is_square [N] bool, color_ids [N]
    indices into PALETTE).
    """
    short = min(height, width)
    radii = rng.uniform(0.07, 0.13, count) * short
    centers = np.zeros((count, 2))
    for i in range(count):
        for _ in range(1000):
            c = rng.uniform(radii[i], [height - radii[i], width - radii[i]])
            if all(np.hypot(*(c - centers[j])) > radii[i] + radii[j] for j in range(i)):
                break
        centers[i] = c
    angles = rng.uniform(0, 2 * np.pi, count)
    speeds = rng.uniform(*speed, count) * short
    velocities = np.stack([np.sin(angles), np.cos(angles)], axis=1) * speeds[:, None]
    is_square = rng.random(count) < 0.5
    color_ids = np.resize(rng.permutation(len(PALETTE)), count)
    return centers, velocities, radii, is_square, color_ids


def step(
    centers: np.ndarray, velocities: np.ndarray, radii: np.ndarray, size: tuple[int, int], dt: float
) -> list[Collision]:
    """Advance positions in place, then resolve wall and pairwise collisions; return the impacts resolved.

    A wall counts as an impact only when the shape was moving into it (not when it is merely clamped), a pair
    only when it was approaching, so every reported impact reverses a velocity.
    """
    collisions = []
    centers += velocities * dt
    bounds = np.array(size, float)
    for axis in range(2):
        low, high = radii, bounds[axis] - radii
        hit_low, hit_high = centers[:, axis] < low, centers[:, axis] > high
        centers[:, axis] = np.clip(centers[:, axis], low, high)
        for i in np.flatnonzero(
            (hit_low & (velocities[:, axis] < 0)) | (hit_high & (velocities[:, axis] > 0))
        ):
            contact = centers[i].copy()
            contact[axis] = 0.0 if hit_low[i] else bounds[axis]
            collisions.append(Collision(int(i), -1, *contact, abs(velocities[i, axis])))
        velocities[hit_low, axis] = np.abs(velocities[hit_low, axis])
        velocities[hit_high, axis] = -np.abs(velocities[hit_high, axis])
    masses = radii**2
    for i in range(len(radii)):
        for j in range(i + 1, len(radii)):
            offset = centers[j] - centers[i]
            distance = np.hypot(*offset)
            overlap = radii[i] + radii[j] - distance
            if overlap <= 0 or distance == 0:
                continue
            normal = offset / distance
            approach = np.dot(velocities[i] - velocities[j], normal)
            if approach > 0:  # only when moving toward each other, so touching pairs don't stick
                impulse = 2 * approach / (masses[i] + masses[j])
                velocities[i] -= impulse * masses[j] * normal
                velocities[j] += impulse * masses[i] * normal
                collisions.append(Collision(i, j, *(centers[i] + normal * radii[i]), approach))
            # Push apart along the normal, heavier shape moving less.
            share = masses[j] / (masses[i] + masses[j])
            centers[i] -= normal * overlap * share
            centers[j] += normal * overlap * (1 - share)
    return collisions


def render(centers, radii, is_square, colors, height: int, width: int) -> np.ndarray:
    """One RGB uint8 frame [H, W, 3] of the shapes (colors: [N, 3] uint8) on the background."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = BACKGROUND
    for (cy, cx), r, square, color in zip(centers, radii, is_square, colors, strict=True):
        # Masks are computed only inside each shape's bounding box.
        y0, y1 = max(int(cy - r), 0), min(int(np.ceil(cy + r)) + 1, height)
        x0, x1 = max(int(cx - r), 0), min(int(np.ceil(cx + r)) + 1, width)
        dy = np.arange(y0, y1)[:, None] + 0.5 - cy
        dx = np.arange(x0, x1)[None, :] + 0.5 - cx
        inside = (np.abs(dy) <= r) & (np.abs(dx) <= r) if square else dy**2 + dx**2 <= r**2
        frame[y0:y1, x0:x1][inside] = color
    return frame


def demo_frames(
    n: int, size: tuple[int, int] = (480, 854), seed: int = 0, fps: int = 30, shapes: int = 5
) -> Iterator[np.ndarray]:
    """Yield n RGB uint8 frames of shape [H, W, 3] (size is (H, W)) of the demo scene at `fps`."""
    height, width = size
    if height < 16 or width < 16:
        raise ValueError(f"demo frame size must be at least 16x16, got {size}")
    rng = np.random.default_rng(seed)
    centers, velocities, radii, is_square, color_ids = initial_shapes(rng, height, width, shapes)
    for _ in range(n):
        yield render(centers, radii, is_square, PALETTE[color_ids], height, width)
        step(centers, velocities, radii, size, 1.0 / fps)


def make_demo_video(
    path: str | Path, seconds: float = 4.0, fps: int = 30, size: tuple[int, int] = (480, 854), seed: int = 0
) -> Path:
    """Encode the demo scene as an MP4 (H.264, or MPEG-4 part 2 where FFmpeg lacks an H.264 encoder)."""
    return write_video(path, demo_frames(round(seconds * fps), size, seed, fps), size, fps)


def write_video(path: str | Path, frames: Iterable[np.ndarray], size: tuple[int, int], fps: int = 30) -> Path:
    """Encode RGB uint8 frames [H, W, 3] (size is (H, W), even sides) as an MP4 (H.264, or MPEG-4 part 2 where
    FFmpeg lacks an H.264 encoder). Raises ValueError for an odd side."""
    import av

    height, width = size
    if height % 2 or width % 2:
        raise ValueError(f"video size must have even sides for yuv420p, got {size}")
    path = Path(path)
    codec = pick_video_encoder()
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "h264":
            stream.options = {"crf": "18"}
        else:
            stream.bit_rate = 4_000_000
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def write_y4m(path: str | Path, frames: Iterable[np.ndarray], fps: int = 30) -> Path:
    """RGB uint8 frames [H, W, 3] (even sides) as an uncompressed Y4M (I420, BT.601 full range): the format
    Chromium's fake camera plays (--use-file-for-fake-video-capture), so pages can be tested with the demo scene."""
    path = Path(path)
    with open(path, "wb") as out:
        for i, rgb in enumerate(frames):
            height, width = rgb.shape[:2]
            if height % 2 or width % 2:
                raise ValueError(f"Y4M frames need even sides for 4:2:0, got {height}x{width}")
            if i == 0:
                out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
            r, g, b = (rgb[..., c].astype(np.float32) for c in range(3))
            y = 0.299 * r + 0.587 * g + 0.114 * b
            chroma = (0.564 * (b - y) + 128, 0.713 * (r - y) + 128)  # Cb, Cr
            out.write(b"FRAME\n")
            for plane in (y, *(c.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3)) for c in chroma)):
                out.write(np.clip(np.rint(plane), 0, 255).astype(np.uint8).tobytes())
    return path
