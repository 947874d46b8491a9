"""Causal Oobleck audio VAE (`sr_ds_1600_dim_64_causal`): offline codec, streaming decoder, official weights.

Module names follow the official stable-audio-tools / SoundReactor code, so a checkpoint loads after
`vae_state_from_official` strips its wrapper prefix and folds its weight norm into plain `weight` tensors.

Causality: a conv pads `(k-1)*dilation + 1 - stride` zeros on the left; a transposed conv trims its last
`k - stride` samples. The streaming decoder replaces the padding with each conv's input history and turns
the trim into a pending overlap-add tail, so frame by frame it reproduces the offline decoder with zero
look-ahead. Its `step` is purely functional over an explicit list of state tensors (static shapes, no
value-dependent branches), which is what ONNX export and CUDA-graph capture need.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soundreactor.config import VAEConfig

log = logging.getLogger(__name__)

DILATIONS = (1, 3, 9)


class SnakeBeta(nn.Module):
    """y = x + sin(exp(alpha) x)^2 / (exp(beta) + 1e-9), per channel, log-scale parameters."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha.exp()[:, None].to(x.dtype)
        inv_beta = torch.reciprocal(self.beta.exp() + 1e-9)[:, None].to(x.dtype)
        return x + inv_beta * torch.sin(alpha * x) ** 2

    def stream(self, x: Tensor, states: Iterator[Tensor], new_states: list[Tensor]) -> Tensor:
        return self(x)


class FoldedSnakeBeta(nn.Module):
    """A SnakeBeta for inference copies: exp(alpha) and 1 / (exp(beta) + 1e-9) computed once, in fp32, instead
    of in every call (four kernels per activation a frame, on weights only). Later edits of the source
    module's parameters are not seen."""

    def __init__(self, snake: SnakeBeta):
        super().__init__()
        alpha, beta = snake.alpha.detach().float(), snake.beta.detach().float()
        self.register_buffer("alpha_exp", alpha.exp()[:, None])
        self.register_buffer("inv_beta", torch.reciprocal(beta.exp() + 1e-9)[:, None])
        # (x, alpha_exp, inv_beta) -> y: a fused kernel a runtime may set (triton_kernels.snake.snake_beta)
        self.fused: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.fused is not None:
            return self.fused(x.contiguous(), self.alpha_exp, self.inv_beta)
        return torch.addcmul(x, self.inv_beta, torch.sin(self.alpha_exp * x).square())

    def stream(self, x: Tensor, states: Iterator[Tensor], new_states: list[Tensor]) -> Tensor:
        return self(x)


def fold_snakes(module: nn.Module) -> None:
    """Replace, in place, every SnakeBeta under `module` by its FoldedSnakeBeta."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SnakeBeta):
                setattr(parent, name, FoldedSnakeBeta(child))


class CausalConv1d(nn.Conv1d):
    """Conv1d with left zero padding; streaming keeps the last `history` input frames instead."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs: Any):
        super().__init__(in_channels, out_channels, kernel_size, padding=0, **kwargs)

    @property
    def history(self) -> int:
        return (self.kernel_size[0] - 1) * self.dilation[0] + 1 - self.stride[0]

    def state_shape(self, batch: int) -> tuple[int, int, int] | None:
        return (batch, self.in_channels, self.history) if self.history else None

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.history, 0)))

    def stream(self, x: Tensor, states: Iterator[Tensor], new_states: list[Tensor]) -> Tensor:
        if not self.history:
            return super().forward(x)
        x = torch.cat([next(states), x], dim=-1)
        new_states.append(x[..., -self.history :])
        return super().forward(x)


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """ConvTranspose1d trimmed by `k - stride` on the right; streaming carries them as a pending tail."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)

    @property
    def tail(self) -> int:
        return self.kernel_size[0] - self.stride[0]

    def state_shape(self, batch: int) -> tuple[int, int, int] | None:
        return (batch, self.out_channels, self.tail) if self.tail else None

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[..., : x.shape[-1] * self.stride[0]]

    def stream(self, x: Tensor, states: Iterator[Tensor], new_states: list[Tensor]) -> Tensor:
        # The tail carries bias-free partial sums, so the bias is added exactly once per output sample.
        y = F.conv_transpose1d(x, self.weight, None, self.stride)
        length = x.shape[-1] * self.stride[0]
        if self.tail:
            new_states.append(y[..., length:])
            y = y[..., :length] + F.pad(next(states), (0, length - self.tail))
        return y + self.bias[:, None]


class CausalNearestUpsampleConv1d(CausalConv1d):
    """Nearest-neighbour upsampling by `factor`, then a causal conv of kernel 2 x factor (stride 1).

    A constant input comes out constant: every output phase sums all taps against the same value, so there is no
    per-phase gain (the transposed conv's pulse at the input rate). Streaming repeats each new frame and keeps
    the conv's input history, as CausalConv1d does.
    """

    def __init__(self, in_channels: int, out_channels: int, factor: int):
        super().__init__(in_channels, out_channels, 2 * factor)
        self.factor = factor

    def _repeat(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=self.factor, mode="nearest")

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self._repeat(x))

    def stream(self, x: Tensor, states: Iterator[Tensor], new_states: list[Tensor]) -> Tensor:
        return super().stream(self._repeat(x), states, new_states)


PAN_FLOOR = 1600 * 1e-8  # frame energy below which a frame counts as centred: 1600 samples at -80 dBFS RMS
PAN_LOGIT_MAX = 3.8  # |logit| bound: tanh(3.8) = 0.999, a gain ratio of about 1:45 (-33 dB)
# samples over which the gains move from the previous frame's pan to this one's (3.3 ms at 48 kHz)
PAN_RAMP = 160
# the bottleneck's lowest log-variance: the pan channel carries no posterior noise
LOGVAR_DETERMINISTIC = -30.0


def pan_logits(audio: Tensor, hop: int) -> Tensor:
    """Audio [B, 2, N*hop] -> each frame's pan logit [B, 1, N]: the l with which FramePan's equal-power gains
    cos(a), sin(a), a = pi/4 (1 + tanh(l)), give the frame's energy balance b = (E_R - E_L) / (E_R + E_L).

    sin^2(a) - cos^2(a) = sin(pi/2 tanh(l)), so l = atanh(2/pi asin(b)); a source panned by gains cos(x pi/2),
    sin(x pi/2) gives l = atanh(2x - 1). Frames quieter than PAN_FLOOR are centred (l = 0)."""
    energy = audio.float().square().unflatten(-1, (-1, hop)).sum(-1)  # [B, 2, N]
    balance = (energy[:, 1] - energy[:, 0]) / (energy.sum(1) + PAN_FLOOR)
    tanh_l = (2 / torch.pi) * torch.asin(balance.clamp(-1.0, 1.0))
    bound = math.tanh(PAN_LOGIT_MAX)
    return torch.atanh(tanh_l.clamp(-bound, bound))[:, None].to(audio.dtype)


class FramePan(nn.Module):
    """Parametric stereo (VAEConfig.stereo "pan"): the decoder's mono waveform, equal-power panned by the latent's
    last channel, each frame's pan logit (`pan_logits`, which the encoder computes from its input), reached from the
    previous frame's over the frame's first PAN_RAMP samples.

    Why: the inter-channel level difference of parametric stereo coding. A decoder of two free channels has to
    carry a gain ratio through every upsampling stage, and ours did not learn it (issue 20: one balance for every
    impact, its channels anticorrelated); a learned read-out of the pan did not start either (its weights shrank).
    The zero state (logit 0, the centre) is the offline zero padding; the ramp keeps the gains continuous at frame
    boundaries (a step in gain on a ringing tone is a click); it is short because impacts start at frame starts
    and their attack carries most of their energy.
    """

    def __init__(self, hop: int) -> None:
        super().__init__()
        ramp = (torch.arange(1, hop + 1) / min(PAN_RAMP, hop)).clamp(max=1.0)
        self.register_buffer("ramp", ramp, persistent=False)

    def state_shape(self, batch: int) -> tuple[int, int, int]:
        return (batch, 1, 1)  # the previous frame's logit

    def _pan(self, mono: Tensor, logit: Tensor, previous: Tensor) -> Tensor:
        """mono [B, 1, N*hop], logits [B, 1, N] of each frame and of the one before it -> [B, 2, N*hop]."""
        ramp = self.ramp.to(mono.dtype)
        logits = (previous[..., None] + (logit - previous)[..., None] * ramp).flatten(-2)
        angle = (torch.pi / 4) * (1 + torch.tanh(logits))
        return torch.cat((mono * torch.cos(angle), mono * torch.sin(angle)), dim=1)

    def forward(self, mono: Tensor, latents: Tensor) -> Tensor:
        logit = latents[:, -1:]
        return self._pan(mono, logit, F.pad(logit, (1, 0))[..., :-1])

    def stream(
        self, mono: Tensor, latent: Tensor, states: Iterator[Tensor], new_states: list[Tensor]
    ) -> Tensor:
        logit = latent[:, -1:]
        new_states.append(logit)
        return self._pan(mono, logit, next(states))


class Stage(nn.Module):
    """A `layers` Sequential run in order, offline or streaming (the official nesting of every block)."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    def stream(self, x: Tensor, states: Iterator[Tensor], new_states: list[Tensor]) -> Tensor:
        for layer in self.layers:
            x = layer.stream(x, states, new_states)
        return x


class ResidualUnit(Stage):
    def __init__(self, channels: int, dilation: int):
        super().__init__(
            SnakeBeta(channels),
            CausalConv1d(channels, channels, 7, dilation=dilation),
            SnakeBeta(channels),
            CausalConv1d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)

    def stream(self, x: Tensor, states: Iterator[Tensor], new_states: list[Tensor]) -> Tensor:
        return x + super().stream(x, states, new_states)


def encoder_block(in_channels: int, out_channels: int, stride: int) -> Stage:
    return Stage(
        *(ResidualUnit(in_channels, d) for d in DILATIONS),
        SnakeBeta(in_channels),
        CausalConv1d(in_channels, out_channels, 2 * stride, stride=stride),
    )


def decoder_block(in_channels: int, out_channels: int, stride: int, upsample: str = "transposed") -> Stage:
    """SnakeBeta, the upsampling (VAEConfig.upsample; at index 1 either way, so keys keep their names), 3 units."""
    if upsample == "nearest":
        up: nn.Module = CausalNearestUpsampleConv1d(in_channels, out_channels, stride)
    else:
        up = CausalConvTranspose1d(in_channels, out_channels, 2 * stride, stride)
    return Stage(
        SnakeBeta(in_channels),
        up,
        *(ResidualUnit(out_channels, d) for d in DILATIONS),
    )


def _widths(cfg: VAEConfig) -> list[int]:
    return [cfg.channels * m for m in (1, *cfg.channel_mults)]


class OobleckEncoder(Stage):
    """Audio [B, 2, T] -> mean and log-variance [B, 2*latent, T/hop].

    VAEConfig.stereo "pan": the convolutions give latent - 1 channels of each, and the last latent channel is
    each frame's pan logit (`pan_logits`) with the bottleneck's lowest log-variance: no posterior noise.
    """

    def __init__(self, cfg: VAEConfig):
        widths = _widths(cfg)
        panned = cfg.stereo == "pan"
        learned = cfg.latent_dim - panned
        super().__init__(
            CausalConv1d(cfg.audio_channels, widths[0], 7),
            *(encoder_block(widths[i], widths[i + 1], s) for i, s in enumerate(cfg.strides)),
            SnakeBeta(widths[-1]),
            CausalConv1d(widths[-1], 2 * learned, 3),
        )
        self.panned, self.learned, self.hop = panned, learned, cfg.hop

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        if not self.panned:
            return out
        mean, logvar = out.split(self.learned, dim=1)
        pan = pan_logits(x, self.hop)
        return torch.cat((mean, pan, logvar, torch.full_like(pan, LOGVAR_DETERMINISTIC)), dim=1)


class OobleckDecoder(Stage):
    """Latents [B, latent, N] -> audio [B, 2, N*hop]; `step` decodes one latent frame from explicit state.

    VAEConfig.stereo "channels" (official): the last conv writes both channels; "pan": it writes one, which
    `pan` (FramePan) places in the stereo field by the latent's last channel.
    """

    def __init__(self, cfg: VAEConfig):
        widths = _widths(cfg)
        panned = cfg.stereo == "pan"
        super().__init__(
            CausalConv1d(cfg.latent_dim, widths[-1], 7),
            *(
                decoder_block(widths[i + 1], widths[i], cfg.strides[i], cfg.upsample)
                for i in reversed(range(len(cfg.strides)))
            ),
            SnakeBeta(widths[0]),
            CausalConv1d(widths[0], 1 if panned else cfg.audio_channels, 7, bias=False),
        )
        self.pan = FramePan(cfg.hop) if panned else None
        self.latent_dim = cfg.latent_dim
        self.n_states = len(self.state_shapes(1))

    def forward(self, x: Tensor) -> Tensor:
        audio = self.layers(x)
        return audio if self.pan is None else self.pan(audio, x)

    def stream(self, x: Tensor, states: Iterator[Tensor], new_states: list[Tensor]) -> Tensor:
        audio = super().stream(x, states, new_states)
        return audio if self.pan is None else self.pan.stream(audio, x, states, new_states)

    def state_shapes(self, batch: int) -> list[tuple[int, int, int]]:
        """One shape per conv with input history, per transposed conv with a tail and for the pan, in `step`
        order (module order: the layers, then the pan)."""
        stateful = (
            m for m in self.modules() if isinstance(m, CausalConv1d | CausalConvTranspose1d | FramePan)
        )
        shapes = (m.state_shape(batch) for m in stateful)
        return [s for s in shapes if s is not None]

    def state_size(self) -> int:
        """Floats of streaming state per stream (173,696 for the paper config)."""
        return sum(c * t for _, c, t in self.state_shapes(1))

    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> list[Tensor]:
        """Zero state: the same as the offline decoder's zero padding before the first frame."""
        return [torch.zeros(s, device=device, dtype=dtype) for s in self.state_shapes(batch)]

    def step(self, latent: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Decode one frame: latent [B, latent] -> audio [B, 2, hop] and the new state (inputs untouched)."""
        if latent.dim() != 2 or latent.shape[1] != self.latent_dim:
            raise ValueError(f"latent must be [batch, {self.latent_dim}], got {list(latent.shape)}")
        if len(state) != self.n_states:
            raise ValueError(f"state must be the {self.n_states} tensors of init_state, got {len(state)}")
        new_state: list[Tensor] = []
        audio = self.stream(latent[:, :, None], iter(state), new_state)
        return audio, new_state


class AudioVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = OobleckEncoder(cfg)
        self.decoder = OobleckDecoder(cfg)

    def encode(self, audio: Tensor) -> Tensor:
        """Audio [B, 2, T] with T a multiple of hop -> latent mean [B, latent, T/hop]."""
        cfg = self.cfg
        if audio.dim() != 3 or audio.shape[1] != cfg.audio_channels or audio.shape[-1] % cfg.hop:
            raise ValueError(
                f"audio must be [batch, {cfg.audio_channels}, T] with T a multiple of {cfg.hop}, "
                f"got {list(audio.shape)}; pad or trim the end to whole frames"
            )
        # The second half is the log-variance, only used to sample in training.
        return self.encoder(audio)[:, : cfg.latent_dim]

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, latent, N] -> audio [B, 2, N*hop], causal offline decoding."""
        if latents.dim() != 3 or latents.shape[1] != self.cfg.latent_dim:
            raise ValueError(
                f"latents must be [batch, {self.cfg.latent_dim}, frames], got {list(latents.shape)}"
            )
        return self.decoder(latents)


# weight-norm key pairs (g suffix, v suffix) -> how the file was written: torch.nn.utils.weight_norm (stable-audio-
# tools' WNConv1d) stores weight_g/weight_v; torch.nn.utils.parametrizations.weight_norm, its replacement, stores g
# as original0 and v as original1 under parametrizations.weight.
WEIGHT_NORM_KEYS = {
    (".weight_g", ".weight_v"): "legacy weight norm (weight_g/weight_v)",
    (
        ".parametrizations.weight.original0",
        ".parametrizations.weight.original1",
    ): "parametrized weight norm (parametrizations.weight.original0/original1)",
}
EMA_CHOICES = ("ema", "online")


def fold_weight_norm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Replace every weight-norm pair (either layout of WEIGHT_NORM_KEYS) by `X.weight = g * v / ||v||`.

    The norm runs over every dim where g has size 1, as torch's weight norm does (dim=0 by default, also for
    ConvTranspose1d, whose dim 0 is the input channel: g [in, 1, 1]). Computed in float32, returned in v's dtype.
    Raises ValueError for a g without its v (or the reverse) and for shapes that do not pair up.
    """
    out: dict[str, Tensor] = {}
    pairs: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key, value in state_dict.items():
        for suffixes in WEIGHT_NORM_KEYS:
            role = next((r for r, sfx in zip("gv", suffixes, strict=True) if key.endswith(sfx)), None)
            if role is not None:
                base = key[: -len(suffixes["gv".index(role)])] + ".weight"
                pairs.setdefault(base, {})[role] = (key, value)
                break
        else:
            out[key] = value
    for base, pair in pairs.items():
        if len(pair) != 2:
            (role, (key, _)), other = next(iter(pair.items())), "v" if "g" in pair else "g"
            raise ValueError(
                f"{key} ({role}) has no matching weight-norm {other} for {base}; the pair is incomplete"
            )
        (g_key, g), (v_key, v) = pair["g"], pair["v"]
        if g.dim() != v.dim() or any(gs not in (1, vs) for gs, vs in zip(g.shape, v.shape, strict=True)):
            raise ValueError(f"{g_key} shape {list(g.shape)} does not fit {v_key} shape {list(v.shape)}")
        dims = [d for d in range(v.dim()) if g.shape[d] == 1]
        v32 = v.float()
        out[base] = (v32 * (g.float() / torch.linalg.vector_norm(v32, dim=dims, keepdim=True))).to(v.dtype)
    return out


def weight_norm_layouts(keys: list[str]) -> tuple[str, ...]:
    """The weight-norm layouts (WEIGHT_NORM_KEYS names) that `keys` use."""
    return tuple(name for (g, _), name in WEIGHT_NORM_KEYS.items() if any(k.endswith(g) for k in keys))


def _vae_prefixes(keys: list[str]) -> list[str]:
    """Every key prefix under which a VAE's `encoder.layers.*` / `decoder.layers.*` sit, sorted."""
    prefixes = set()
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts) - 1):
            if parts[i] in ("encoder", "decoder") and parts[i + 1] == "layers":
                prefixes.add("".join(p + "." for p in parts[:i]))
                break
    if not prefixes:
        raise ValueError(
            "no `encoder.layers.*` / `decoder.layers.*` keys found; is this an Oobleck VAE file?"
        )
    return sorted(prefixes)


def is_ema(prefix: str) -> bool:
    """An exponential-moving-average copy: stable-audio-tools' `autoencoder_ema.ema_model.`, or any `ema` part."""
    return any(p == "ema" or p.startswith("ema_") or p.endswith("_ema") for p in prefix.split("."))


def choose_prefix(prefixes: list[str], weights: str = "ema") -> str:
    """The VAE copy to read among `prefixes`: with weights="ema" the EMA copy where the file has one (what
    stable-audio-tools' `export_model` unwraps and releases), else the online weights. An EMA wrapper's
    reference to the online model (ema_pytorch's `online_model.`) duplicates it and is never chosen by itself."""
    if weights not in EMA_CHOICES:
        raise ValueError(f"VAE weights must be one of {', '.join(EMA_CHOICES)}, got {weights!r}")
    pool = [p for p in prefixes if "online_model" not in p.split(".")] or prefixes
    ema = [p for p in pool if is_ema(p)]
    online = [p for p in pool if not is_ema(p)]
    chosen = (ema or online) if weights == "ema" else online
    if not chosen:
        raise ValueError(
            f"the file holds only EMA copies of the VAE ({', '.join(map(repr, ema))}); use --vae-weights ema"
        )
    if len(chosen) > 1:
        raise ValueError(
            f"several VAE copies under key prefixes {', '.join(map(repr, chosen))}: choose one with "
            "--vae-prefix PREFIX (`prefix=` in the API)"
        )
    return chosen[0]


@dataclass(frozen=True)
class VAELayout:
    """How a VAE checkpoint was laid out, as read by `vae_state_from_official`."""

    prefix: str  # key prefix stripped ('' for an unwrapped file)
    ema: bool  # the copy read is an EMA copy
    weight_norm: tuple[str, ...]  # WEIGHT_NORM_KEYS names folded; () for plain weights
    others: tuple[str, ...]  # prefixes of the other VAE copies in the file, not read
    dropped: int  # keys outside the chosen encoder/decoder

    def describe(self) -> str:
        copy = f"key prefix {self.prefix!r}" if self.prefix else "no key prefix"
        parts = [copy + (" (EMA copy)" if self.ema else "")]
        parts.append(", ".join(self.weight_norm) + " folded" if self.weight_norm else "plain weights")
        if self.others:
            parts.append(f"not read: {', '.join(map(repr, self.others))} (--vae-prefix/--vae-weights choose)")
        if self.dropped:
            parts.append(f"{self.dropped} other keys ignored")
        return "; ".join(parts)


def _listing(keys: list[str]) -> str:
    return f"{len(keys)} ({', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''})"


def vae_state_from_official(
    raw: Mapping[str, Any], cfg: VAEConfig | None = None, prefix: str | None = None, weights: str = "ema"
) -> tuple[dict[str, Tensor], VAELayout]:
    """Official checkpoint dict -> (float state dict for `AudioVAE(cfg)`, the layout that was read).

    Accepts what stable-audio-tools-style training writes: a nested `state_dict` (Lightning, `export_model`),
    any key prefix (`autoencoder.`, `model.`, `module.` from DDP, `_orig_mod.` from torch.compile,
    `pretransform.model.` inside a diffusion checkpoint), EMA copies (`prefix` picks a copy, else `weights`,
    see `choose_prefix`), legacy or parametrized weight norm (folded). Every key, shape and dtype (floating
    point) is checked; ValueError names each mismatch.
    """
    cfg = cfg or VAEConfig()
    if isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    prefixes = _vae_prefixes(list(raw))
    if prefix is None:
        prefix = choose_prefix(prefixes, weights)
    elif prefix not in prefixes:
        raise ValueError(
            f"no VAE keys under prefix {prefix!r}; the file holds VAE weights under {', '.join(map(repr, prefixes))}"
        )
    ours = (prefix + "encoder.", prefix + "decoder.")
    state = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(ours)}
    dropped = [k for k in raw if not k.startswith(ours)]
    if dropped:
        log.info("VAE checkpoint: dropped %s keys outside encoder/decoder", _listing(dropped))
    layout = VAELayout(
        prefix,
        is_ema(prefix),
        weight_norm_layouts(list(state)),
        tuple(p for p in prefixes if p != prefix),
        len(dropped),
    )
    not_float = [
        f"{k} ({v.dtype})" for k, v in state.items() if not (isinstance(v, Tensor) and v.is_floating_point())
    ]
    if not_float:
        raise ValueError(f"VAE checkpoint (prefix {prefix!r}) holds non-float weights: {_listing(not_float)}")
    state = fold_weight_norm(state)

    with torch.device("meta"):
        expected = {k: v.shape for k, v in AudioVAE(cfg).state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {list(state[k].shape)} != {list(expected[k])}"
        for k in expected
        if k in state and state[k].shape != expected[k]
    ]
    if missing or unexpected or misshaped:
        problems = [
            f"{name}: {_listing(keys)}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if keys
        ]
        raise ValueError(
            f"checkpoint (prefix {prefix!r}) does not fit AudioVAE({cfg}): " + "; ".join(problems)
        )
    return {k: v.float() for k, v in state.items()}, layout
