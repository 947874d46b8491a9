"""A synthetic demo clip: colored circles and squares bouncing off the walls and off each other.

Rendered with numpy only and deterministic for a seed, so demos and tests need no video assets. Collisions are
elastic between discs (a square collides as the disc inscribed in it), with mass proportional to area.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from soundreactor.media import pick_video_encoder

BACKGROUND = np.array([24, 26, 34], np.uint8)
PALETTE = np.array(
    [[230, 80, 70], [70, 170, 230], [240, 200, 60], [110, 210, 120], [200, 110, 220], [250, 150, 60]],
    np.uint8,
)


def _initial_shapes(rng: np.random.Generator, height: int, width: int, count: int):
    """Non-overlapping random discs (rejection sampling) with speeds of 0.3-0.6 short sides per second."""
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
    speeds = rng.uniform(0.3, 0.6, count) * short
    velocities = np.stack([np.sin(angles), np.cos(angles)], axis=1) * speeds[:, None]
    is_square = rng.random(count) < 0.5
    colors = PALETTE[np.resize(rng.permutation(len(PALETTE)), count)]
    return centers, velocities, radii, is_square, colors


def _step(centers: np.ndarray, velocities: np.ndarray, radii: np.ndarray, size: tuple[int, int], dt: float):
    """Advance positions in place, then resolve wall and pairwise collisions."""
    centers += velocities * dt
    bounds = np.array(size, float)
    for axis in range(2):
        low, high = radii, bounds[axis] - radii
        hit_low, hit_high = centers[:, axis] < low, centers[:, axis] > high
        centers[:, axis] = np.clip(centers[:, axis], low, high)
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
            # Push apart along the normal, heavier shape moving less.
            share = masses[j] / (masses[i] + masses[j])
            centers[i] -= normal * overlap * share
            centers[j] += normal * overlap * (1 - share)


def _render(centers, radii, is_square, colors, height: int, width: int) -> np.ndarray:
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
    centers, velocities, radii, is_square, colors = _initial_shapes(rng, height, width, shapes)
    for _ in range(n):
        yield _render(centers, radii, is_square, colors, height, width)
        _step(centers, velocities, radii, size, 1.0 / fps)


def make_demo_video(
    path: str | Path, seconds: float = 4.0, fps: int = 30, size: tuple[int, int] = (480, 854), seed: int = 0
) -> Path:
    """Encode the demo scene as an MP4 (H.264, or MPEG-4 part 2 where FFmpeg lacks an H.264 encoder)."""
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
        for i, rgb in enumerate(demo_frames(round(seconds * fps), size, seed, fps)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path
