"""Accuracy measures of a quantized pipeline against fp32: cosine similarity, SNR and a log-mel distance.

The mel spectrogram is numpy only: Hann-windowed STFT, triangular filters on the HTK mel scale, power in dB.
"""

from __future__ import annotations

import numpy as np

N_FFT = 2048  # 42.7 ms at 48 kHz: resolves 23 Hz, fine enough for the lowest mel bands
HOP = 480  # 10 ms
N_MELS = 128
TOP_DB = (
    60.0  # bins more than 60 dB under the reference's peak count as silence (inaudible next to it), in both
)


def cosine_rows(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row (last axis), as float64; rows of zeros in both count as identical."""
    ref, out = reference.astype(np.float64), test.astype(np.float64)
    dot = (ref * out).sum(-1)
    norms = np.linalg.norm(ref, axis=-1) * np.linalg.norm(out, axis=-1)
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)


def snr_db(signal_energy: float, error_energy: float) -> float:
    """10 log10(signal / error); +inf for an exact match."""
    if error_energy == 0:
        return float("inf")
    return float(10 * np.log10(max(signal_energy, np.finfo(np.float64).tiny) / error_energy))


def energies(reference: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """(sum of reference^2, sum of (reference - test)^2) in float64, to pool into an SNR."""
    ref = reference.astype(np.float64)
    return float((ref**2).sum()), float(((ref - test.astype(np.float64)) ** 2).sum())


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangles spaced evenly in mel from 0 Hz to Nyquist, each peaking at 1."""
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(np.array(sample_rate / 2)), n_mels + 2))
    low, center, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - low) / (center - low)
    falling = (high - bins[None]) / (high - center)
    return np.clip(np.minimum(rising, falling), 0.0, None)


def log_mel_db(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mel power spectrogram in dB of audio [..., samples] -> [..., n_mels, frames] (centered, reflect-padded)."""
    padded = np.pad(
        audio.astype(np.float64), [(0, 0)] * (audio.ndim - 1) + [(N_FFT // 2, N_FFT // 2)], "reflect"
    )
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT, axis=-1)[..., ::HOP, :]
    power = np.abs(np.fft.rfft(frames * np.hanning(N_FFT), axis=-1)) ** 2
    mel = np.einsum("mf,...tf->...mt", mel_filterbank(sample_rate), power)
    return 10.0 * np.log10(np.maximum(mel, 1e-20))


def log_mel_distance_db(reference: np.ndarray, test: np.ndarray, sample_rate: int) -> float:
    """Mean absolute difference of the two log-mel spectrograms in dB, both floored at TOP_DB under the
    reference's peak so that near-silent bins don't dominate. Audio [..., samples]."""
    ref, out = log_mel_db(reference, sample_rate), log_mel_db(test, sample_rate)
    floor = ref.max() - TOP_DB
    return float(np.abs(np.maximum(ref, floor) - np.maximum(out, floor)).mean())
