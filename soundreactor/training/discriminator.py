"""The VAE's adversary: a multi-scale STFT discriminator with hinge losses and feature matching.

The design of EnCodec's MS-STFT discriminator (Defossez et al. 2022), which stable-audio-tools trains Oobleck VAEs
against (adversarial weight 0.1, feature matching 5.0 in the soundreactor_vae config): per FFT size, the complex
STFT of every audio channel (real and imaginary parts as image channels) runs through a small 2-D conv stack,
strided along frequency and dilated along time, ending in a one-channel map of real/fake logits. Every
intermediate activation is a feature map for the feature-matching loss. Written here from the paper's description.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

DISC_FFT_SIZES = (2048, 512, 128)  # a long, a middle and a short window: tones, attacks and clicks
TIME_DILATIONS = (1, 2, 4)
KERNEL = (3, 9)  # (time, frequency)
SLOPE = 0.2  # LeakyReLU


def _conv(inputs: int, outputs: int, kernel: tuple[int, int], stride=(1, 1), dilation=(1, 1)) -> nn.Conv2d:
    padding = ((kernel[0] - 1) * dilation[0] // 2, (kernel[1] - 1) * dilation[1] // 2)
    return weight_norm(nn.Conv2d(inputs, outputs, kernel, stride, padding, dilation))


class STFTDiscriminator(nn.Module):
    """audio [B, C, T] -> (logits [B, 1, frames, bins'], feature maps) at one FFT size."""

    def __init__(self, n_fft: int, audio_channels: int, filters: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        layers = [_conv(2 * audio_channels, filters, KERNEL)]
        for d in TIME_DILATIONS:
            layers.append(_conv(filters, filters, KERNEL, stride=(1, 2), dilation=(d, 1)))
        layers.append(_conv(filters, filters, (3, 3)))
        self.layers = nn.ModuleList(layers)
        self.out = _conv(filters, 1, (3, 3))

    def forward(self, audio: Tensor) -> tuple[Tensor, list[Tensor]]:
        b, c, t = audio.shape
        spec = torch.stft(
            audio.reshape(b * c, t).float(),
            self.n_fft,
            self.n_fft // 4,
            window=self.window,
            normalized=True,  # scales alike across FFT sizes
            return_complex=True,
        )
        # [B*C, bins, frames] complex -> [B, 2C, frames, bins] real: time first, as the kernel is (time, frequency)
        x = torch.view_as_real(spec).reshape(b, c, *spec.shape[1:], 2).permute(0, 1, 4, 3, 2)
        x = x.reshape(b, 2 * c, spec.shape[2], spec.shape[1])
        features = []
        for layer in self.layers:
            x = F.leaky_relu(layer(x), SLOPE)
            features.append(x)
        return self.out(x), features


class MultiScaleSTFTDiscriminator(nn.Module):
    """One STFTDiscriminator per DISC_FFT_SIZES entry."""

    def __init__(self, audio_channels: int = 2, filters: int = 32) -> None:
        super().__init__()
        self.scales = nn.ModuleList(STFTDiscriminator(n, audio_channels, filters) for n in DISC_FFT_SIZES)

    def forward(self, audio: Tensor) -> list[tuple[Tensor, list[Tensor]]]:
        return [scale(audio) for scale in self.scales]


def discriminator_hinge(real: list, fake: list) -> Tensor:
    """Hinge loss of the discriminator: mean over scales of relu(1 - D(real)) + relu(1 + D(fake))."""
    losses = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for (r, _), (f, _) in zip(real, fake, strict=True)]
    return torch.stack(losses).mean()


def generator_hinge(fake: list) -> Tensor:
    """Hinge loss of the generator: mean over scales of relu(1 - D(fake))."""
    return torch.stack([F.relu(1 - f).mean() for f, _ in fake]).mean()


def feature_matching(real: list, fake: list) -> Tensor:
    """L1 between the feature maps of real and generated audio, each relative to the real map's mean magnitude
    (so every layer counts alike whatever its scale), averaged over layers and scales. The real side carries no
    gradient: it is the target."""
    terms = []
    for (_, real_maps), (_, fake_maps) in zip(real, fake, strict=True):
        for r, f in zip(real_maps, fake_maps, strict=True):
            r = r.detach()
            terms.append((f - r).abs().mean() / (r.abs().mean() + 1e-8))
    return torch.stack(terms).mean()
