"""VAE training: the causal Oobleck VAE under weight norm, L1 + multi-resolution STFT + envelope + stereo balance +
KL losses.

The module tree is the official one (stable-audio-tools / SonyResearch soundreactor_vae), trained under the same
weight-norm parametrisation; `folded_vae` turns it back into the plain `weight` tensors our AudioVAE holds. The
bottleneck is the official VAEBottleneck: the encoder's 2*latent channels are (mean, log-variance), the
log-variance clamped to [-30, 20], KL = 0.5 * sum_channels(mean^2 + var - logvar - 1) averaged over batch and time.
The STFT loss is auraloss's sum-and-difference multi-resolution STFT loss at the official FFT sizes.
"""

from __future__ import annotations

import copy
import dataclasses

import auraloss
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from soundreactor.model.vae import AudioVAE
from soundreactor.training.discriminator import (
    MultiScaleSTFTDiscriminator,
    discriminator_hinge,
    feature_matching,
    generator_hinge,
)
from soundreactor.training.train_config import TrainConfig

# the official sr_ds_1600_dim_64_causal spectral loss (its perceptual weighting needs scipy and is left out)
FFT_SIZES = (2048, 1024, 512, 256, 128, 64, 32)
ENVELOPE_HOP = 160  # samples per envelope point: 3.3 ms at 48 kHz, 10 per video frame
ENVELOPE_FLOOR = 1e-4  # RMS floor of the log envelope (-80 dBFS): silence compares as silence


def _convs(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.Conv1d | nn.ConvTranspose1d)]


def with_weight_norm(vae: AudioVAE) -> AudioVAE:
    """A copy of `vae` with every conv under weight norm (dim 0, as the official checkpoints' weight_g/_v)."""
    out = copy.deepcopy(vae)
    for conv in _convs(out):
        weight_norm(conv, dim=0)
    return out


@torch.no_grad()
def folded_state(trained: AudioVAE) -> dict[str, Tensor]:
    """State dict of a plain AudioVAE from a `with_weight_norm` one: each weight folded to g * v / ||v||.

    Read through the parametrisation, never by removing it: the trained module stays as it is.
    """
    state = {k: v for k, v in trained.state_dict().items() if ".parametrizations." not in k}
    for name, module in trained.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            state[f"{name}.weight"] = module.weight.detach().clone()
    return state


@torch.no_grad()
def panned_copy(vae: AudioVAE, audio: Tensor) -> tuple[AudioVAE, int]:
    """`vae` (stereo "channels") turned parametric (VAEConfig.stereo "pan"); returns it and the latent channel
    it gave up for the pan: the one whose means vary least on `audio` [B, 2, T] (the one the decoder can best do
    without: on round 3's VAE the quietest channel's removal left validation onset F1 as it was, the loudest's
    took it from 0.87 to 0.75). The last channel moves into its place, so the others keep their indices (what a model
    trained on the old latents reads warm-starts on them), and the last becomes the pan: the encoder's last conv
    loses the given-up channel's mean and log-variance rows, the decoder's first conv reads the others as before
    and not the pan (zero weights), its last conv becomes the left channel's times sqrt(2) (at the centre,
    gains 1/sqrt(2), the left output is what it was); every other weight is kept."""
    if vae.cfg.stereo != "channels":
        raise ValueError(
            f"panned_copy turns a two-channel VAE into a panned one; this one is {vae.cfg.stereo!r}"
        )
    latent = vae.cfg.latent_dim
    dropped = int(vae.encode(audio).std(dim=(0, 2)).argmin())
    kept = list(range(latent - 1))  # the last channel moves into the given-up one's place: the rest stay put
    if dropped < latent - 1:
        kept[dropped] = latent - 1
    out = AudioVAE(dataclasses.replace(vae.cfg, stereo="pan"))
    state = vae.state_dict()
    encoder_last = f"encoder.layers.{len(vae.encoder.layers) - 1}"
    for name in ("weight", "bias"):  # rows: latent means, then log-variances
        state[f"{encoder_last}.{name}"] = state[f"{encoder_last}.{name}"][kept + [latent + c for c in kept]]
    first = state["decoder.layers.0.weight"]
    state["decoder.layers.0.weight"] = torch.cat([first[:, kept], torch.zeros_like(first[:, :1])], dim=1)
    decoder_last = f"decoder.layers.{len(vae.decoder.layers) - 1}.weight"
    state[decoder_last] = state[decoder_last][:1] * 2**0.5
    out.load_state_dict(state)
    return out.train(vae.training), dropped


LATENT_STD_AT_INIT = 0.3  # calibrated_init's target std of the encoder's means


def _fan_in(conv: nn.Module) -> float:
    w = conv.weight
    if isinstance(conv, nn.ConvTranspose1d):  # weight [in, out, k]: an output sums k / stride taps per input
        return w.shape[0] * w.shape[2] / conv.stride[0]
    return w.shape[1] * w.shape[2]


def _draw(conv: nn.Module, std: float, gen: torch.Generator) -> Tensor:
    """Normal weights of `conv` with this std; a transposed conv of kernel 2 x stride gets checkerboard-free taps.

    Output sample n of such a conv sums taps n mod s and n mod s + s of the kernel, so random taps give each of the
    s output phases its own gain: a stationary input comes out with its energy modulated at the input's rate. In
    the decoder's first block (stride 8 at 30 Hz) that is a 5 dB pulse at every latent frame for a constant
    latent. Drawing one tap per half and repeating it `stride` times makes every phase equal (0.03 dB): the conv
    starts as a nearest-neighbour upsampling after a 2-tap conv, the 1-D case of ICNR init (Aitken et al. 2017,
    "Checkerboard artifact free sub-pixel convolution"; Odena et al. 2016, "Deconvolution and checkerboard
    artifacts"). Training unties the taps again (6-9 dB within 300 steps here); it starts from no pulse.
    """
    w = conv.weight
    if isinstance(conv, nn.ConvTranspose1d) and w.shape[2] == 2 * conv.stride[0]:
        halves = torch.randn(w.shape[0], w.shape[1], 2, generator=gen) * std
        return halves.repeat_interleave(conv.stride[0], dim=2)
    return torch.randn(w.shape, generator=gen) * std


@torch.no_grad()
def _set_gain(part: nn.Module, gain: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for conv in _convs(part):
        conv.weight.copy_(_draw(conv, gain / _fan_in(conv) ** 0.5, gen))
        if conv.bias is not None:
            conv.bias.zero_()


@torch.no_grad()
def _calibrate(part: nn.Module, run, target: float, seed: int) -> float:
    """Bisect the gain (in [0.3, 1.5], 16 halvings) at which std(run()) reaches target; returns it."""
    low, high = 0.3, 1.5
    for _ in range(16):
        gain = 0.5 * (low + high)
        _set_gain(part, gain, seed)
        out = run().std().item()
        low, high = (gain, high) if out < target or out != out else (low, gain)  # NaN counts as too high
    _set_gain(part, low, seed)
    return low


def calibrated_init(vae: AudioVAE, audio: Tensor, seed: int = 0) -> tuple[float, float]:
    """Redraw every conv of `vae` in place: normal, zero bias, std = gain / sqrt(fan_in), one gain per side,
    bisected so that the encoder's means have std LATENT_STD_AT_INIT on `audio` [B, 2, T] and the decoder's
    output of such latents has the std of `audio`. Returns (encoder gain, decoder gain).

    Why: torch's default conv init shrinks the signal by about sqrt(3) per conv, so after the Oobleck encoder's
    stack the audio-dependent part of the latents was 2% of a constant the biases made (std 0.0018 against
    0.094, channels 8), and the decoder's output did not depend on its input: every VAE trained from it here
    collapsed to a steady noise bed. The gain is a cliff (0.7 gave latents of std 0.02, 0.8 of 0.33, at 25
    convs deep), hence the bisection on the data rather than a fixed constant (an LSUV-style init, Mishkin and
    Matas 2016, for the whole network instead of layer by layer).
    """
    if audio.std() == 0:
        raise ValueError("calibrated_init needs audio that is not silent: give clips with sound in them")
    enc_gain = _calibrate(vae.encoder, lambda: vae.encode(audio), LATENT_STD_AT_INIT, seed)
    gen = torch.Generator().manual_seed(seed)
    shape = (audio.shape[0], vae.cfg.latent_dim, audio.shape[-1] // vae.cfg.hop)
    latents = torch.randn(shape, generator=gen) * LATENT_STD_AT_INIT
    dec_gain = _calibrate(vae.decoder, lambda: vae.decode(latents), audio.std().item(), seed + 1)
    return enc_gain, dec_gain


def log_envelope(audio: Tensor) -> Tensor:
    """[B, C, T] -> log RMS [B, C, T / ENVELOPE_HOP] (natural log)."""
    power = F.avg_pool1d(audio.float().square(), ENVELOPE_HOP, ENVELOPE_HOP)
    return 0.5 * torch.log(power + ENVELOPE_FLOOR**2)


def balance_loss(recon: Tensor, audio: Tensor) -> Tensor:
    """Stereo balance error: |b(recon) - b(audio)| per envelope window, b = (E_R - E_L) / (E_R + E_L) in [-1, 1],
    averaged with the reference's energy as weights (0 where the reference is silent throughout).

    Why: the sum-and-difference STFT loss cannot tell L from R (|STFT(L-R)| is |STFT(R-L)|), and the adversarial
    VAE it trained decoded every impact at one balance (+0.15 +- 0.05 whatever the source's x; pan correlation 0.18
    against the truth's 0.94) with its channels anticorrelated (-0.75 against +0.5). This is the inter-channel
    level difference of spatial audio coding, bounded (no log of silence) and weighted towards the windows a
    listener localises: the loud ones. At weights 2 and 8 it did not teach the small preset's VAE to pan
    (perf/results/vae_balance.md).
    """
    recon_energy = F.avg_pool1d(recon.float().square(), ENVELOPE_HOP, ENVELOPE_HOP)
    energy = F.avg_pool1d(audio.float().square(), ENVELOPE_HOP, ENVELOPE_HOP)

    def balance(e: Tensor) -> Tensor:  # the floor keeps windows quieter than -80 dBFS at balance 0
        return (e[:, 1] - e[:, 0]) / (e[:, 1] + e[:, 0] + ENVELOPE_FLOOR**2)

    weight = energy.sum(1)
    error = (balance(recon_energy) - balance(energy)).abs()
    # a muted batch has no weight: floored at one -80 dBFS window, not at float32's tiny, whose inverse times a
    # loss weight over 2 overflowed to inf in the backward pass (0 * inf = NaN: every muted step was skipped)
    return (weight * error).sum() / weight.sum().clamp_min(ENVELOPE_FLOOR**2)


def warmup(cfg: TrainConfig, step: int) -> float:
    """Bottleneck warm-up factor in [0, 1]: 0 for the first half of cfg.kl_warmup steps, then a linear ramp.

    It scales both the KL weight and the posterior noise: the VAE starts as a plain autoencoder, so the decoder
    learns to read the latents before noise and KL can teach it to ignore them (with posterior noise from step 0
    a tiny VAE collapsed to the prior here: KL 0.07 after 750 steps at KL weight 1e-4, 0.5 after 370 at 1e-5).
    """
    if cfg.kl_warmup <= 0:
        return 1.0
    return min(1.0, max(0.0, 2.0 * step / cfg.kl_warmup - 1.0))


class VAETrainee(nn.Module):
    """forward(audio [B, 2, T], eps [B, latent, T/hop], warmup [] (see `warmup`), adversarial [] (0 or 1))
    -> (loss, metrics).

    With cfg.adv_weight > 0 it holds a MultiScaleSTFTDiscriminator: on adversarial steps the VAE's loss adds the
    generator hinge and feature-matching terms, and `discriminator_loss()` then gives the discriminator's hinge
    loss on that step's (real, reconstructed) pair, for its own optimizer (`loop.Critic`).
    """

    def __init__(self, vae: AudioVAE, cfg: TrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.latent_dim = vae.cfg.latent_dim
        self.vae = with_weight_norm(vae)
        # frozen: no gradient, no graph and no optimizer state for it (the loop optimizes requires_grad only)
        self.vae.encoder.requires_grad_(not cfg.freeze_encoder)
        self.stft = auraloss.freq.SumAndDifferenceSTFTLoss(
            fft_sizes=list(FFT_SIZES),
            hop_sizes=[n // 4 for n in FFT_SIZES],
            win_lengths=list(FFT_SIZES),
            # spectral convergence divides by the target's norm: undefined on the silent stretches that
            # synthetic clips often are (it gave 2.6e4 on a silent batch); log and linear magnitudes remain
            w_sc=0.0,
            w_lin_mag=1.0,
            eps=cfg.stft_eps,
        )
        self.discriminator = (
            MultiScaleSTFTDiscriminator(vae.cfg.audio_channels, cfg.disc_filters)
            if cfg.adv_weight > 0
            else None
        )
        self._pair: tuple[Tensor, Tensor] | None = None  # the last adversarial step's (audio, reconstruction)

    def forward(
        self, audio: Tensor, eps: Tensor, warmup: Tensor, adversarial: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        mean, logvar = self.vae.encoder(audio).split(self.latent_dim, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        latents = mean + warmup * torch.exp(0.5 * logvar) * eps
        recon = self.vae.decoder(latents).float()
        l1 = (recon - audio).abs().mean()
        stft = self.stft(recon, audio)
        envelope = (log_envelope(recon) - log_envelope(audio)).abs().mean()
        balance = balance_loss(recon, audio)
        kl = 0.5 * (mean.square() + logvar.exp() - logvar - 1).float().sum(1).mean()
        cfg = self.cfg
        loss = cfg.l1_weight * l1 + cfg.stft_weight * stft + cfg.envelope_weight * envelope
        loss = loss + cfg.balance_weight * balance
        loss = loss + warmup * cfg.kl_weight * kl
        metrics = {"l1": l1, "stft": stft, "envelope": envelope, "balance": balance, "kl": kl}
        if self.discriminator is None:
            return loss, metrics
        adv = fm = torch.zeros((), device=audio.device)
        self._pair = None
        if adversarial is not None and bool(adversarial):
            real, fake = self.discriminator(audio), self.discriminator(recon)
            adv, fm = generator_hinge(fake), feature_matching(real, fake)
            loss = loss + cfg.adv_weight * adv + cfg.fm_weight * fm
            self._pair = (audio.detach(), recon.detach())
        return loss, {**metrics, "adv": adv, "fm": fm}

    def discriminator_loss(self) -> Tensor | None:
        """The discriminator's hinge loss on the last forward's pair; None where that step was not adversarial."""
        if self._pair is None:
            return None
        audio, recon = self._pair
        self._pair = None
        return discriminator_hinge(self.discriminator(audio), self.discriminator(recon))
