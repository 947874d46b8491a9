"""Model configuration: one dataclass per component, named presets, and a JSON round trip.

The config travels inside every checkpoint and export manifest, so a file always says what it was built for.
Fields marked [default] in SPEC.md are choices of ours, kept here rather than hard-coded in the modules.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

# Bounds every config is checked against before any model is built: a checkpoint's or manifest's stored config is
# untrusted input. Sizes are generous (the paper preset is far inside them) but keep a bad file from asking for
# terabytes or a billion layers; MAX_PARAMETERS is 16 GB of fp32 weights.
MAX_WIDTH = 1 << 16
MAX_DEPTH = 512
MAX_TOKENS = 1 << 20
MAX_PARAMETERS = 4_000_000_000


def check_int(owner: object, name: str, low: int = 1, high: int = MAX_WIDTH) -> None:
    """`owner.name` is an int (not a bool) in [low, high]; ValueError naming the field otherwise."""
    value = getattr(owner, name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(
            f"{type(owner).__name__}.{name} must be an integer in [{low}, {high}], got {value!r}"
        )


def check_float(
    owner: object, name: str, low: float = -math.inf, high: float = math.inf, open_low: bool = False
) -> None:
    """`owner.name` is a finite number in [low, high] ((low, high] with open_low); ValueError otherwise."""
    value = getattr(owner, name)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ValueError(
            f"{type(owner).__name__}.{name} must be a finite number in {bracket}{low}, {high}], got {value!r}"
        )


def check_divides(owner: object, width: str, heads: str) -> None:
    if getattr(owner, width) % getattr(owner, heads):
        raise ValueError(
            f"{type(owner).__name__}.{heads} ({getattr(owner, heads)}) must divide {width} ({getattr(owner, width)})"
        )


@dataclass(frozen=True)
class DinoConfig:
    """DINOv2 ViT with register tokens (ViT-S/14-reg4 in the paper preset)."""

    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: int = 4
    patch: int = 14
    registers: int = 4
    pos_grid: int = 37  # position embedding trained for a 37x37 patch grid (518 px)
    layerscale_init: float = 1e-5
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("dim", "heads", "mlp_ratio", "patch", "pos_grid"):
            check_int(self, name)
        check_int(self, "depth", 1, MAX_DEPTH)
        check_int(self, "registers", 0)
        check_divides(self, "dim", "heads")
        check_float(self, "layerscale_init", -1e3, 1e3)
        check_float(self, "eps", 0.0, 1.0, open_low=True)


@dataclass(frozen=True)
class VideoTokenConfig:
    """Temporal-difference aggregator: grid features -> one vision token per frame."""

    width: int = 384
    depth: int = 2
    heads: int = 6
    mlp_ratio: int = 4
    downsample: int = 2  # kernel and stride of the spatial downsampling conv
    eps: float = 1e-5  # LayerNorm epsilon of its blocks and final norm (SPEC is silent: torch's default)

    def __post_init__(self) -> None:
        for name in ("width", "heads", "mlp_ratio", "downsample"):
            check_int(self, name)
        check_int(self, "depth", 1, MAX_DEPTH)
        check_divides(self, "width", "heads")
        check_float(self, "eps", 0.0, 1.0, open_low=True)


UPSAMPLING = ("transposed", "nearest")
STEREO = ("channels", "pan")


@dataclass(frozen=True)
class VAEConfig:
    """Causal Oobleck audio VAE (`sr_ds_1600_dim_64_causal`)."""

    channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 4, 8, 16)
    strides: tuple[int, ...] = (2, 4, 5, 5, 8)
    latent_dim: int = 64
    audio_channels: int = 2
    sample_rate: int = 48_000
    # the decoder's upsampling: "transposed" (the official ConvTranspose1d, kernel 2 x stride) or "nearest"
    # (nearest-neighbour repeat, then a causal conv of kernel 2 x stride: Oobleck's use_nearest_upsample, free of
    # the transposed conv's per-phase gains that pulse at the latent rate); configs stored without it are transposed
    upsample: str = "transposed"
    # stereo: "channels" (official: the decoder's last conv writes both) or "pan" (parametric stereo: the latent's
    # last channel is each frame's pan, computed by the encoder from its input's channel energies, and the decoder
    # pans its mono waveform by it: vae.pan_logits, vae.FramePan); configs stored without it are "channels"
    stereo: str = "channels"

    def __post_init__(self) -> None:
        if self.upsample not in UPSAMPLING:
            raise ValueError(f"VAEConfig.upsample must be one of {UPSAMPLING}, got {self.upsample!r}")
        if self.stereo not in STEREO:
            raise ValueError(f"VAEConfig.stereo must be one of {STEREO}, got {self.stereo!r}")
        if self.stereo == "pan" and (self.audio_channels != 2 or self.latent_dim < 2):
            raise ValueError(
                "VAEConfig.stereo 'pan' pans into 2 channels by one of at least 2 latent channels; audio_channels "
                f"is {self.audio_channels}, latent_dim {self.latent_dim}"
            )
        for name in ("channels", "latent_dim", "audio_channels"):
            check_int(self, name)
        check_int(self, "sample_rate", 1, 1_000_000)
        for name in ("channel_mults", "strides"):
            values = getattr(self, name)
            if not isinstance(values, tuple) or not 1 <= len(values) <= 16:
                raise ValueError(f"VAEConfig.{name} must be a list of 1 to 16 integers, got {values!r}")
            if any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64 for v in values):
                raise ValueError(f"VAEConfig.{name} entries must be integers in [1, 64], got {values!r}")
        if len(self.channel_mults) != len(self.strides):
            raise ValueError(
                f"VAEConfig.channel_mults ({len(self.channel_mults)}) and strides ({len(self.strides)}) must be "
                "as long as each other: one per encoder block"
            )
        if self.channels * max(self.channel_mults) > MAX_WIDTH:
            raise ValueError(f"VAEConfig.channels x channel_mults exceeds {MAX_WIDTH} channels")

    @property
    def hop(self) -> int:
        """Audio samples per latent frame (1600 at 48 kHz, 30 Hz)."""
        out = 1
        for s in self.strides:
            out *= s
        return out


@dataclass(frozen=True)
class TransformerConfig:
    """LLaMA-style causal transformer over the interleaved token sequence S, v1, x1, v2, x2, ..."""

    d_model: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads (plain multi-head)
    ffn_hidden: int = 2816
    rope_base: float = 10_000.0
    train_context: int = 480  # tokens (240 frames, 8 s)
    window: int = 480  # sliding attention window in tokens, the KV cache length
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads"):
            check_int(self, name)
        check_int(self, "n_layers", 1, MAX_DEPTH)
        check_int(self, "ffn_hidden", 1, 4 * MAX_WIDTH)
        check_int(self, "train_context", 1, MAX_TOKENS)
        check_int(self, "window", 1, MAX_TOKENS)
        check_divides(self, "d_model", "n_heads")
        if self.head_dim % 2:
            raise ValueError(
                f"TransformerConfig.d_model / n_heads = {self.head_dim} must be even (RoPE pairs)"
            )
        if self.n_kv_heads is not None:
            check_int(self, "n_kv_heads")
            check_divides(self, "n_heads", "n_kv_heads")
        check_float(self, "rope_base", 1.0, 1e12, open_low=True)
        check_float(self, "norm_eps", 0.0, 1.0, open_low=True)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def effective_rope_base(self) -> float:
        """NTK-aware scaling: stretch the RoPE base when the window outgrows the training context."""
        if self.window <= self.train_context:
            return self.rope_base
        scale = self.window / self.train_context
        return self.rope_base * scale ** (self.head_dim / (self.head_dim - 2))


@dataclass(frozen=True)
class HeadConfig:
    """Diffusion head: MLP with adaptive LayerNorm, EDM preconditioning."""

    width: int = 1024
    depth: int = 6
    freq_dim: int = 256  # sinusoidal embedding size of c_noise
    sigma_data: float = 0.5
    latent_scale: float = 1.0  # latents are divided by this before the head, multiplied after

    def __post_init__(self) -> None:
        check_int(self, "width")
        check_int(self, "depth", 1, MAX_DEPTH)
        check_int(self, "freq_dim", 2)
        if self.freq_dim % 2:
            raise ValueError(f"HeadConfig.freq_dim must be even (cos and sin halves), got {self.freq_dim}")
        check_float(self, "sigma_data", 0.0, 1e6, open_low=True)
        check_float(self, "latent_scale", 0.0, 1e6, open_low=True)


@dataclass(frozen=True)
class SamplerConfig:
    """How x_i is sampled from the head: ECT consistency steps, or EDM Heun for diffusion checkpoints."""

    kind: str = "consistency"  # "consistency" | "heun"
    nfe: int = 4
    consistency_steps: dict[int, tuple[float, ...]] = field(
        default_factory=lambda: {1: (80.0,), 2: (80.0, 0.821), 4: (80.0, 24.4, 5.84, 0.9)}
    )
    heun_steps: int = 18
    t_min: float = 0.002
    t_max: float = 80.0
    rho: float = 7.0
    guidance: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in ("consistency", "heun"):
            raise ValueError(f"sampler kind must be 'consistency' or 'heun', got {self.kind!r}")
        check_int(self, "nfe", 1, 64)
        check_int(self, "heun_steps", 1, 10_000)
        check_float(self, "t_min", 0.0, 1e6, open_low=True)
        check_float(self, "t_max", self.t_min, 1e6, open_low=True)
        check_float(self, "rho", 0.0, 1e3, open_low=True)
        check_float(self, "guidance", 0.0, 1e3)
        for nfe, times in self.consistency_steps.items():
            numbers = all(isinstance(t, int | float) and math.isfinite(t) and t > 0 for t in times)
            if not numbers or len(times) != nfe or list(times) != sorted(times, reverse=True):
                raise ValueError(
                    f"SamplerConfig.consistency_steps[{nfe}] must be {nfe} finite positive decreasing times, "
                    f"got {times!r}"
                )
        if self.kind == "consistency" and self.nfe not in self.consistency_steps:
            raise ValueError(
                f"no consistency step times for nfe={self.nfe}; known: {sorted(self.consistency_steps)}"
            )


def check_guidance(value: float) -> float:
    """A guidance weight w given at run time (CLI, backends), held to SamplerConfig's bounds; ValueError if not."""
    return SamplerConfig(guidance=value).guidance


@dataclass(frozen=True)
class ModelConfig:
    preset: str
    dinov2: DinoConfig
    video: VideoTokenConfig
    vae: VAEConfig
    transformer: TransformerConfig
    head: HeadConfig
    sampler: SamplerConfig
    vision_hw: tuple[int, int] = (224, 392)  # model input resolution, multiples of the patch size
    fps: int = 30

    def __post_init__(self) -> None:
        check_int(self, "fps", 1, 1000)
        hw = self.vision_hw
        if (
            not isinstance(hw, tuple)
            or len(hw) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in hw)
        ):
            raise ValueError(f"ModelConfig.vision_hw must be two integers (height, width), got {hw!r}")
        h, w = hw
        p = self.dinov2.patch
        if not (p <= h <= 8192 and p <= w <= 8192) or h % p or w % p:
            raise ValueError(
                f"ModelConfig.vision_hw {hw} must be multiples of the patch size {p}, from {p} to 8192"
            )
        if self.parameter_estimate() > MAX_PARAMETERS:
            raise ValueError(
                f"this config asks for about {self.parameter_estimate():.3g} parameters, over the "
                f"{MAX_PARAMETERS:.0e} this engine accepts ({4 * MAX_PARAMETERS / 1e9:.0f} GB in fp32): a corrupted "
                "or hostile config? (sizes: dinov2, video, transformer, head, vae)"
            )

    def parameter_estimate(self) -> int:
        """Leading terms of the weight count (matrices and convolution kernels), within a small factor of exact;
        it bounds memory before anything is allocated."""
        d, v, t, h, a = self.dinov2, self.video, self.transformer, self.head, self.vae
        dino = d.depth * (4 + 2 * d.mlp_ratio) * d.dim**2 + d.pos_grid**2 * d.dim + 3 * d.patch**2 * d.dim
        video = v.depth * (4 + 2 * v.mlp_ratio) * v.width**2 + v.downsample**2 * d.dim * v.width
        kv = (t.n_kv_heads or t.n_heads) * t.head_dim
        transformer = t.n_layers * (2 * t.d_model**2 + 2 * t.d_model * kv + 3 * t.d_model * t.ffn_hidden)
        head = h.depth * 6 * h.width**2 + h.freq_dim * h.width + 2 * t.d_model * h.width
        widths = [a.channels * m for m in (1, *a.channel_mults)]
        # per block: three residual units (kernel 7 and 1) and the strided conv, in the encoder and the decoder
        vae = sum(
            2 * (24 * c_in**2 + 2 * s * c_in * c_out)
            for c_in, c_out, s in zip(widths[:-1], widths[1:], a.strides, strict=True)
        )
        return dino + video + transformer + head + vae

    @property
    def grid_hw(self) -> tuple[int, int]:
        """DINOv2 patch grid of one frame (16x28 for the paper preset)."""
        return self.vision_hw[0] // self.dinov2.patch, self.vision_hw[1] // self.dinov2.patch

    @property
    def samples_per_frame(self) -> int:
        return self.vae.hop

    def replace(self, **changes: Any) -> ModelConfig:
        """Copy with top-level or nested changes, e.g. replace(sampler={"nfe": 2})."""
        updates = {}
        for name, value in changes.items():
            current = getattr(self, name)
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                value = dataclasses.replace(current, **value)
            updates[name] = value
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Config from `to_dict`'s form; every field is validated (ValueError naming the first bad one)."""

        def build(kind: type, values: Any) -> Any:
            if not isinstance(values, dict):
                raise ValueError(f"config {kind.__name__} must be an object, got {type(values).__name__}")
            known = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields {sorted(unknown)}")
            out = {}
            for k, v in values.items():
                if isinstance(v, list):
                    v = tuple(v)
                if k == "consistency_steps":
                    if not isinstance(v, dict) or not all(isinstance(ts, list | tuple) for ts in v.values()):
                        raise ValueError(f"SamplerConfig.consistency_steps must map nfe to times, got {v!r}")
                    try:
                        v = {int(n): tuple(ts) for n, ts in v.items()}
                    except ValueError as err:
                        raise ValueError(
                            f"SamplerConfig.consistency_steps keys must be integers: {err}"
                        ) from None
                out[k] = v
            return kind(**out)

        if not isinstance(data, dict):
            raise ValueError(f"a model config must be a JSON object, got {type(data).__name__}")
        parts = {
            "dinov2": DinoConfig,
            "video": VideoTokenConfig,
            "vae": VAEConfig,
            "transformer": TransformerConfig,
            "head": HeadConfig,
            "sampler": SamplerConfig,
        }
        missing = [k for k in (*parts, "preset") if k not in data]
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if missing or unknown:
            raise ValueError(f"model config: missing fields {missing}, unknown fields {sorted(unknown)}")
        if not isinstance(data["preset"], str):
            raise ValueError(f"ModelConfig.preset must be a string, got {data['preset']!r}")
        top = {k: v for k, v in data.items() if k not in parts}
        nested = {k: build(kind, data[k]) for k, kind in parts.items()}
        if isinstance(top.get("vision_hw"), list):
            top["vision_hw"] = tuple(top["vision_hw"])
        return cls(**top, **nested)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"model config is not valid JSON: {err}") from None
        return cls.from_dict(data)


def paper() -> ModelConfig:
    """The sizes of SPEC.md: public DINOv2 ViT-S/14-reg4 and VAE, 24-layer 1024-wide transformer."""
    return ModelConfig(
        preset="paper",
        dinov2=DinoConfig(),
        video=VideoTokenConfig(),
        vae=VAEConfig(),
        transformer=TransformerConfig(),
        head=HeadConfig(),
        sampler=SamplerConfig(),
    )


def tiny() -> ModelConfig:
    """Same structure and audio framing (1600 samples per latent), tiny widths: tests and CPU demos."""
    return ModelConfig(
        preset="tiny",
        dinov2=DinoConfig(dim=32, depth=2, heads=2, pos_grid=6, layerscale_init=0.1),
        video=VideoTokenConfig(width=32, depth=1, heads=2),
        vae=VAEConfig(channels=4),
        transformer=TransformerConfig(
            d_model=64, n_layers=2, n_heads=4, ffn_hidden=128, train_context=16, window=16
        ),
        head=HeadConfig(width=64, depth=2, freq_dim=32),
        sampler=SamplerConfig(),
        vision_hw=(56, 112),
    )


def small() -> ModelConfig:
    """The tiny preset's structure and framing with a 128-token (64-frame, 2.1 s) training window, sized to train
    on one 2-core CPU (perf/train_default.sh) and to stream in real time on one idle CPU core (eager torch: 22-25 ms
    a frame at the demo's 224x448; ONNX Runtime about 3x faster, perf/results/onnxruntime_cpu_1core.md).

    DINOv2 is tiny and starts random; it stays frozen unless pretraining trains it (`--train-dinov2`: the random one
    keeps the synthetic scenes' shapes and colours but hardly when a contact starts, perf/results/default_model_r5.md);
    VAE channels 8 (2.4 MB) with 16 latent dims, a smaller target for the head.
    """
    return ModelConfig(
        preset="small",
        dinov2=DinoConfig(dim=32, depth=2, heads=2, pos_grid=6, layerscale_init=0.1),
        video=VideoTokenConfig(width=64, depth=1, heads=2),
        vae=VAEConfig(channels=8, latent_dim=16),
        transformer=TransformerConfig(
            d_model=128, n_layers=3, n_heads=4, ffn_hidden=256, train_context=128, window=128
        ),
        head=HeadConfig(width=128, depth=2, freq_dim=64),
        sampler=SamplerConfig(),
        vision_hw=(56, 112),
    )


PRESETS = {"paper": paper, "tiny": tiny, "small": small}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
