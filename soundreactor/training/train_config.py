"""Training configuration: one frozen dataclass for every stage, stored as JSON in every checkpoint it writes.

Values marked [default] in SPEC.md section 9 are choices of ours, kept here as fields.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

STAGES = ("vae", "pretrain", "ect")


def option(default: Any, help: str) -> Any:
    """A field with its command-line help (`soundreactor train --help` shows it)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    stage: str  # "vae" | "pretrain" (Algorithm 1) | "ect" (Algorithm 2)
    steps: int = option(1000, "optimizer steps in all (a resumed run may raise it)")
    batch_size: int = option(8, "global batch in clips, split evenly over the DDP ranks")
    lr: float = option(1e-4, "AdamW learning rate")
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "max global gradient norm; 0 disables")
    max_skipped_steps: int = option(
        20,
        "stop when this many steps in a row had a non-finite loss or gradient (each is skipped, not applied)",
    )
    ema_decay: float = option(0.999, "EMA decay; the exported checkpoint holds the EMA weights")
    seed: int = option(0, "every random draw of step s comes from (seed, s), so resume and DDP equal one run")
    checkpoint_every: int = option(200, "steps between resumable checkpoints and exported models")
    data: str = option("synthetic", "'synthetic' (built-in scenes) or a folder of videos with sound")
    data_seed: int = option(0, "seed of the synthetic scenes")
    dataset_size: int = option(10_000, "synthetic clips (ignored for a folder)")
    clip_frames: int = option(0, "frames per training clip; 0 = the transformer's train_context // 2")
    hum: bool = option(False, "synthetic scenes with a continuous hum")
    # VAE (stable-audio-tools lineage: L1 + multi-resolution STFT + KL)
    l1_weight: float = option(1.0, "VAE: weight of the waveform L1")
    stft_weight: float = option(1.0, "VAE: weight of the multi-resolution STFT loss")
    envelope_weight: float = option(1.0, "VAE: weight of the log-RMS envelope L1 (keeps onsets and decays)")
    balance_weight: float = option(
        0.0,
        "VAE: weight of the stereo balance loss (vae.balance_loss: each channel's share of the energy, where "
        "the reference has sound); 0 = off",
    )
    kl_weight: float = option(1e-5, "VAE: weight of the KL term after the warm-up (the official config's)")
    kl_warmup: int = option(
        500, "VAE: steps of bottleneck warm-up: no KL and no posterior noise for the first half, then a ramp"
    )
    stft_eps: float = option(
        1e-8,
        "VAE: power floor of the STFT loss's magnitudes (auraloss's eps): 1e-8 floors a 32-point FFT 98 dB and a "
        "2048-point one 134 dB below a full-scale sine, so a -70 dBFS bed over silence still costs",
    )
    crop_frames: int = option(
        0,
        "VAE: train on a random window of this many frames of each clip (0 = the whole clip); 4-frame clips are "
        "a scene's first 133 ms, 2/3 of them digitally silent; 4-frame windows of 64-frame clips, 14%",
    )
    silence_share: float = option(0.0, "VAE: share of training batches muted to digital silence (RAVE: ~0.1)")
    freeze_encoder: bool = option(
        False,
        "VAE: train the decoder only; the encoder, hence the latents a model trained on them reads, stays as it "
        "is (a better decoder then replaces a trained model's own)",
    )
    # the adversarial stage (stable-audio-tools' Oobleck recipe: adversarial 0.1, feature matching 5.0)
    adv_weight: float = option(
        0.0, "VAE: weight of the STFT discriminator's hinge loss; 0 = no discriminator"
    )
    fm_weight: float = option(
        5.0, "VAE: weight of the discriminator's feature matching (with adv_weight > 0)"
    )
    adv_start: int = option(0, "VAE: step at which the discriminator and its losses switch on (a warm-up)")
    disc_lr: float = option(1e-4, "VAE: the discriminator's AdamW learning rate")
    disc_betas: tuple[float, float] = (0.8, 0.99)
    disc_filters: int = option(32, "VAE: channels of the discriminator's conv stacks")
    vae: str = option(
        "",
        "pretrain: take the VAE from this checkpoint (train-vae's best.safetensors) and the rest from --init: a "
        "model warm-started on a new VAE's latents (the latent scale is measured again; a resumed run must give "
        "the same one)",
    )
    vae_stereo: str = option(
        "",
        "VAE: 'pan' makes a two-channel VAE parametric (VAEConfig.stereo): the least varying latent channel "
        "gives way to each frame's pan, which the encoder computes and the decoder applies to one waveform "
        "(vae.panned_copy); '' keeps the starting VAE's",
    )
    vae_init: str = option(
        "keep",
        "VAE: 'keep' the starting weights, or 'calibrated': redraw them (vae.calibrated_init; from scratch)",
    )
    # diffusion pretraining (Algorithm 1, EDM2 loss)
    p_mean: float = option(-0.4, "pretrain: mean of ln t")
    p_std: float = option(1.0, "pretrain: standard deviation of ln t")
    p_uncond: float = option(0.1, "probability that a clip trains the guidance null query instead of v_i")
    latent_scale: float = option(0.0, "pretrain: latent scale; 0 = measure std / sigma_data on the data")
    train_dinov2: bool = option(
        False,
        "pretrain: DINOv2 trains with the rest (its grids are computed from the frames at every step, not "
        "cached); the small preset's random DINOv2 cannot tell an impact's frame from the frame before it",
    )
    # ECT (Algorithm 2)
    ect_p_mean: float = option(-1.1, "ECT: mean of ln t")
    ect_p_std: float = option(2.0, "ECT: standard deviation of ln t")
    ect_q: float = option(4.0, "ECT: t - r shrinks by this factor at every stage")
    ect_k: float = option(8.0, "ECT: k of the r mapping")
    ect_b: float = option(1.0, "ECT: b of the r mapping")
    ect_stage_steps: int = option(250, "ECT: steps per stage")
    huber_c: float = option(0.0, "ECT: pseudo-Huber c; 0 = iCT's 0.00054 * sqrt(latent_dim)")
    consistency_steps: dict[int, tuple[float, ...]] = field(
        default_factory=lambda: {1: (80.0,), 2: (80.0, 0.821), 4: (80.0, 24.4, 5.84, 0.9)}
    )  # sampler step times per NFE written into the ECT checkpoint

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if min(self.steps, self.batch_size, self.checkpoint_every, self.max_skipped_steps) < 1:
            raise ValueError("steps, batch_size, checkpoint_every and max_skipped_steps must be >= 1")
        if self.vae_init not in ("keep", "calibrated"):
            raise ValueError(f"vae_init must be 'keep' or 'calibrated', got {self.vae_init!r}")
        if self.vae_stereo not in ("", "pan"):
            raise ValueError(
                f"vae_stereo must be 'pan' (make a two-channel VAE parametric) or '' (keep the VAE's), got "
                f"{self.vae_stereo!r}; a panned VAE is not turned back into two channels"
            )
        if self.freeze_encoder and self.vae_init == "calibrated":
            raise ValueError(
                "freeze_encoder keeps the encoder a trained model reads, vae_init 'calibrated' redraws it: "
                "give one of them"
            )
        weights = (
            "l1_weight",
            "stft_weight",
            "envelope_weight",
            "balance_weight",
            "kl_weight",
            "adv_weight",
            "fm_weight",
        )
        negative = [name for name in weights if getattr(self, name) < 0]
        if negative:
            raise ValueError(f"loss weights must be >= 0 (0 turns a term off): {', '.join(negative)}")
        if not 0.0 <= self.silence_share <= 1.0:
            raise ValueError(f"silence_share must be in [0, 1], got {self.silence_share}")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {self.p_uncond}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data: dict[str, Any] = json.loads(text)
        data["betas"] = tuple(data["betas"])
        if "disc_betas" in data:  # configs written before the adversarial stage lack it
            data["disc_betas"] = tuple(data["disc_betas"])
        data["consistency_steps"] = {int(n): tuple(t) for n, t in data["consistency_steps"].items()}
        return cls(**data)
