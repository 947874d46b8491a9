"""Training configuration: one frozen dataclass for every stage, stored as JSON in every checkpoint it writes.

Values marked [default] in SPEC.md section 9 are choices of ours, kept here as fields.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

STAGES = ("vae", "pretrain", "ect")


@dataclass(frozen=True)
class TrainConfig:
    stage: str  # "vae" | "pretrain" (Algorithm 1) | "ect" (Algorithm 2)
    steps: int = 1000
    batch_size: int = 8  # global batch: split evenly over DDP ranks
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    ema_decay: float = 0.999  # EMA of the trained weights; the exported checkpoint holds the EMA
    seed: int = 0  # every random draw of step s comes from (seed, s): resume and DDP reproduce a plain run
    checkpoint_every: int = 200  # steps between resumable checkpoints (and exported models)
    data: str = "synthetic"  # the built-in synthetic set, or a folder of videos with sound
    data_seed: int = 0
    dataset_size: int = 10_000  # synthetic clips (ignored for a folder)
    clip_frames: int = 0  # frames per training clip; 0 = the transformer's train_context // 2
    hum: bool = False  # synthetic continuous source
    # VAE (stable-audio-tools lineage: L1 + multi-resolution STFT + KL)
    l1_weight: float = 1.0
    stft_weight: float = 1.0
    envelope_weight: float = 1.0  # L1 of log-RMS envelopes: keeps onsets and decays (see issue 12)
    kl_weight: float = 1e-4
    kl_warmup: int = 500  # steps of linear KL ramp from 0 (a warm-up without KL first)
    # diffusion pretraining (Algorithm 1, EDM2 loss)
    p_mean: float = -0.4
    p_std: float = 1.0
    p_uncond: float = 0.1  # probability that a clip trains the guidance null query instead of v_i
    latent_scale: float = 0.0  # 0 = measure on the data (std / sigma_data) at step 0
    # ECT (Algorithm 2)
    ect_p_mean: float = -1.1
    ect_p_std: float = 2.0
    ect_q: float = 4.0
    ect_k: float = 8.0
    ect_b: float = 1.0
    ect_stage_steps: int = 250  # steps per ECT stage: t - r shrinks by q at every stage
    huber_c: float = 0.0  # pseudo-Huber c; 0 = iCT's 0.00054 * sqrt(latent_dim)
    consistency_steps: dict[int, tuple[float, ...]] = field(
        default_factory=lambda: {1: (80.0,), 2: (80.0, 0.821), 4: (80.0, 24.4, 5.84, 0.9)}
    )

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch_size and checkpoint_every must be >= 1")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {self.p_uncond}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data: dict[str, Any] = json.loads(text)
        data["betas"] = tuple(data["betas"])
        data["consistency_steps"] = {int(n): tuple(t) for n, t in data["consistency_steps"].items()}
        return cls(**data)
