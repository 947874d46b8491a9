"""A synthetic audio-visual training set: bouncing shapes whose collisions make impact sounds.

The scene and its physics are soundreactor.demo_video's (one implementation); this module sounds every impact the
physics step reports. What the audio follows, so a model has something to learn from the pixels:
- pitch: the struck shape's size (f0 = PITCH_HZ_X_SIZE / size, size = radius / short side, 0.07-0.13 -> 460-860 Hz);
- timbre: its colour (each palette colour is one material: partial ratios of a modal model and a decay time);
- loudness: the closing speed along the contact normal (amplitude = LOUDNESS_PER_SPEED * speed, speed in short
  sides per second; contacts slower than MIN_SPEED are silent and not events);
- stereo pan: the contact point's horizontal position x (equal-power pan, gains cos(x pi/2), sin(x pi/2));
- optionally a continuous hum from shape 0 whose pitch follows its speed and whose pan follows its x.
Frames are 30 fps and audio 48 kHz stereo, 1600 samples per frame: an impact found by the step after frame k is
first shown in frame k + 1 and starts at sample (k + 1) * 1600 exactly (a broadband click plus ringing partials).
Everything is deterministic from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from soundreactor.demo_video import PALETTE, initial_shapes, render, step

FPS = 30
SAMPLE_RATE = 48000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS
SPEED = (0.6, 1.2)  # short sides per second: faster than the demo so a half-second clip usually has an impact
PITCH_HZ_X_SIZE = 60.0
LOUDNESS_PER_SPEED = 0.2
# Slower contacts (grazing a wall, resting pairs) are silent and are no events: they would be inaudible under the
# ringing of earlier impacts (-16 dB below a typical impact at 1 short side per second).
MIN_SPEED = 0.15
CLICK_S = 0.002  # decay of the broadband click that marks the attack
# One material per PALETTE colour: (name, partial frequency ratios of a modal model, decay time of the fundamental
# in seconds). Ratios of an ideal free bar, a bell, a plate, a string, a membrane and an odd-harmonic tube.
MATERIALS = (
    ("wood", (1.0, 2.76, 5.40), 0.06),
    ("glass", (1.0, 2.32, 4.25, 6.63), 0.30),
    ("metal", (1.0, 1.59, 2.14, 2.65), 0.22),
    ("string", (1.0, 2.0, 3.0, 4.0), 0.15),
    ("membrane", (1.0, 1.59, 2.14), 0.09),
    ("ceramic", (1.0, 3.0, 5.0), 0.12),
)
HUM_LEVEL = 0.04
assert len(MATERIALS) == len(PALETTE)


@dataclass(frozen=True)
class Event:
    """One impact sound."""

    frame: int  # video frame index (30 fps) at which the collision is first shown
    sample: int  # audio sample index (48 kHz) where the impact starts: frame * 1600
    x: float  # horizontal contact position in [0, 1] (0 = left edge); drives the stereo pan
    y: float  # vertical contact position in [0, 1] (0 = top edge)
    kind: str  # "wall" | "collision" (object-object)
    size: float  # relative size of the struck shape (radius / short side), the mean of both for a collision
    speed: float  # closing speed in short sides per second -> loudness
    material: str  # MATERIALS name of the struck shape ("a+b" for a collision)


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB, 30 fps
    audio: np.ndarray  # float32 [2, T * 1600], 48 kHz stereo, sample-aligned with frames
    events: tuple[Event, ...]  # sorted by sample


def _impact(rng: np.random.Generator, size: float, material: int, amplitude: float, n: int) -> np.ndarray:
    """Mono float32 [n] impact of one shape: a click and decaying partials, starting at sample 0.

    Partial k (0-based) has weight 1 / (k + 1) and decays (k + 1) times faster than the fundamental, as in struck
    bars and plates; the click is white noise decaying with time constant CLICK_S.
    """
    _, ratios, decay = MATERIALS[material]
    t = np.arange(n, dtype=np.float32) / SAMPLE_RATE
    omega = np.float32(2 * np.pi * PITCH_HZ_X_SIZE / size)
    envelope = np.exp(-t / np.float32(decay))
    out, partial_envelope = np.zeros(n, np.float32), np.ones(n, np.float32)
    for k, ratio in enumerate(ratios):
        partial_envelope *= envelope  # envelope ** (k + 1) without another exp
        out += np.sin(omega * np.float32(ratio) * t) * partial_envelope / (k + 1)
    out /= sum(1 / (k + 1) for k in range(len(ratios)))
    m = min(n, round(10 * CLICK_S * SAMPLE_RATE))  # the click is below -86 dB after 10 time constants
    out[:m] += 0.5 * rng.standard_normal(m).astype(np.float32) * np.exp(-t[:m] / np.float32(CLICK_S))
    return amplitude * out


def _hum(speeds: np.ndarray, xs: np.ndarray, n: int) -> np.ndarray:
    """Stereo [2, n] hum of shape 0: f = 110 Hz * (1 + speed), per-frame speed and x interpolated to samples."""
    frame_times = np.arange(len(speeds)) * SAMPLES_PER_FRAME
    samples = np.arange(n)
    freq = 110.0 * (1 + np.interp(samples, frame_times, speeds))
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    mono = HUM_LEVEL * (np.sin(phase) + 0.3 * np.sin(2 * phase))
    return _pan(np.interp(samples, frame_times, xs)) * mono


def _pan(x) -> np.ndarray:
    """Equal-power pan gains [2, ...] (left, right) for horizontal position x in [0, 1]."""
    angle = np.clip(x, 0.0, 1.0) * np.pi / 2
    return np.stack([np.cos(angle), np.sin(angle)])


def make_clip(
    seed: int, n_frames: int, hw: tuple[int, int] = (56, 112), hum: bool = False, shapes: int = 3
) -> Clip:
    """Render and sound `n_frames` frames of a scene drawn from `seed`.

    Returns a Clip: frames uint8 [n_frames, H, W, 3] (hw is (H, W)), audio float32 [2, n_frames * 1600] at 48 kHz
    clipped to [-1, 1], and the impacts as Events sorted by sample. Raises ValueError for n_frames < 1 or a side
    under 16 pixels.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames}")
    height, width = hw
    if height < 16 or width < 16:
        raise ValueError(f"frame size must be at least 16x16, got {hw}")
    rng = np.random.default_rng(seed)
    centers, velocities, radii, is_square, color_ids = initial_shapes(rng, height, width, shapes, SPEED)
    short = min(height, width)
    colors = PALETTE[color_ids]
    frames = np.empty((n_frames, height, width, 3), np.uint8)
    hum_speed, hum_x = np.empty(n_frames), np.empty(n_frames)
    impacts = []  # (frame, Collision)
    for k in range(n_frames):
        frames[k] = render(centers, radii, is_square, colors, height, width)
        hum_speed[k], hum_x[k] = np.hypot(*velocities[0]) / short, centers[0, 1] / width
        if k + 1 < n_frames:
            impacts += [(k + 1, c) for c in step(centers, velocities, radii, hw, 1.0 / FPS)]

    n = n_frames * SAMPLES_PER_FRAME
    audio = np.zeros((2, n))
    events = []
    for frame, c in impacts:
        start = frame * SAMPLES_PER_FRAME
        speed = c.speed / short
        if speed < MIN_SPEED:
            continue
        amplitude = LOUDNESS_PER_SPEED * speed
        struck = [c.i] if c.j < 0 else [c.i, c.j]
        length = min(n - start, round(5 * max(MATERIALS[color_ids[i]][2] for i in struck) * SAMPLE_RATE))
        mono = sum(
            _impact(rng, radii[i] / short, color_ids[i], amplitude / len(struck), length) for i in struck
        )
        x = c.x / width
        audio[:, start : start + length] += _pan(x)[:, None] * mono
        events.append(
            Event(
                frame=frame,
                sample=start,
                x=float(x),
                y=float(c.y / height),
                kind="wall" if c.j < 0 else "collision",
                size=float(np.mean(radii[struck]) / short),
                speed=float(speed),
                material="+".join(MATERIALS[color_ids[i]][0] for i in struck),
            )
        )
    if hum:
        audio += _hum(hum_speed, hum_x, n)
    return Clip(frames, np.clip(audio, -1.0, 1.0).astype(np.float32), tuple(events))


class SyntheticAV(torch.utils.data.Dataset):
    """`length` synthetic clips of `n_frames` frames, item i generated on the fly from (seed, i).

    Items are Clips (numpy arrays); the same (seed, i) always gives the same clip, whatever the worker or order.
    """

    def __init__(
        self, seed: int, length: int, n_frames: int, hw: tuple[int, int] = (56, 112), hum: bool = False
    ) -> None:
        self.seed, self.length, self.n_frames, self.hw, self.hum = seed, length, n_frames, hw, hum

    def __len__(self) -> int:
        return self.length

    def clip_seed(self, i: int) -> int:
        """The make_clip seed of item i: independent streams for different (seed, i) pairs."""
        return int(np.random.SeedSequence([self.seed, i]).generate_state(1)[0])

    def __getitem__(self, i: int) -> Clip:
        if not 0 <= i < self.length:
            raise IndexError(f"clip index {i} out of range for a SyntheticAV of length {self.length}")
        return make_clip(self.clip_seed(i), self.n_frames, self.hw, self.hum)
