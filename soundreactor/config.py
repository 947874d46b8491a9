"""Model configuration: one dataclass per component, named presets, and a JSON round trip.

The config travels inside every checkpoint and export manifest, so a file always says what it was built for.
Fields marked [default] in SPEC.md are choices of ours, kept here rather than hard-coded in the modules.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


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


@dataclass(frozen=True)
class VideoTokenConfig:
    """Temporal-difference aggregator: grid features -> one vision token per frame."""

    width: int = 384
    depth: int = 2
    heads: int = 6
    mlp_ratio: int = 4
    downsample: int = 2  # kernel and stride of the spatial downsampling conv
    eps: float = 1e-5  # LayerNorm epsilon of its blocks and final norm (SPEC is silent: torch's default)


@dataclass(frozen=True)
class VAEConfig:
    """Causal Oobleck audio VAE (`sr_ds_1600_dim_64_causal`)."""

    channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 4, 8, 16)
    strides: tuple[int, ...] = (2, 4, 5, 5, 8)
    latent_dim: int = 64
    audio_channels: int = 2
    sample_rate: int = 48_000

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
        if self.kind == "consistency" and self.nfe not in self.consistency_steps:
            raise ValueError(
                f"no consistency step times for nfe={self.nfe}; known: {sorted(self.consistency_steps)}"
            )


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
        h, w = self.vision_hw
        p = self.dinov2.patch
        if h % p or w % p:
            raise ValueError(f"vision_hw {self.vision_hw} must be multiples of the patch size {p}")

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
        def build(kind: type, values: dict[str, Any]) -> Any:
            known = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields {sorted(unknown)}")
            out = {}
            for k, v in values.items():
                if isinstance(v, list):
                    v = tuple(v)
                if k == "consistency_steps":
                    v = {int(n): tuple(ts) for n, ts in v.items()}
                out[k] = v
            return kind(**out)

        parts = {
            "dinov2": DinoConfig,
            "video": VideoTokenConfig,
            "vae": VAEConfig,
            "transformer": TransformerConfig,
            "head": HeadConfig,
            "sampler": SamplerConfig,
        }
        top = {k: v for k, v in data.items() if k not in parts}
        nested = {k: build(kind, data[k]) for k, kind in parts.items()}
        if "vision_hw" in top:
            top["vision_hw"] = tuple(top["vision_hw"])
        return cls(**top, **nested)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


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
    on one 2-core CPU (perf/train_default.sh) and to run at 7.7 ms a frame through ONNX Runtime on 2 cores.

    DINOv2 stays tiny and random-frozen, as in the training issue's measurement (the synthetic scenes' shapes and
    colours survive random features); VAE channels 8 (2.4 MB) with 16 latent dims, a smaller target for the head.
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
