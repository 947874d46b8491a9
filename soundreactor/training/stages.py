"""The three stages as `loop.Task`s: what each trains, the batch of a step, and the checkpoint it exports.

Every stage reads a SoundReactor checkpoint and writes one: `train-vae` replaces its VAE; `pretrain` trains the
aggregator, transformer and head on the frozen DINOv2 grids (or on the frames, with DINOv2 trained too:
`train_dinov2`) and frozen VAE latents and stores the measured `latent_scale` and a Heun sampler; `ect` tunes those
from a pretrained checkpoint and stores the consistency step times. The VAE stays frozen in both AR stages, DINOv2
in ECT.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from soundreactor.checkpoint import save_checkpoint
from soundreactor.config import ModelConfig
from soundreactor.model.soundreactor import SoundReactor
from soundreactor.training import diffusion, ect
from soundreactor.training.data import GridCache, VideoFolder, clip_grids
from soundreactor.training.evaluate import VALIDATION_SEED, evaluate_vae
from soundreactor.training.loop import Critic, Task, step_generator
from soundreactor.training.synthetic import SyntheticAV
from soundreactor.training.train_config import TrainConfig
from soundreactor.training.vae import VAETrainee, calibrated_init, folded_state, panned_copy, warmup

GRID_MEMORY_BYTES = 1 << 30  # Features keeps every clip's grids in memory when the whole set's fit in this
LATENT_SCALE_CLIPS = 32  # clips the latent standard deviation is measured on
# validation scenes the VAE reconstructs at every checkpoint (16 s, about 60 impacts), to pick its best checkpoint;
# drawn from their own seed, so the figures reported by `evaluate` (EVAL_SEED) stay unseen by that choice
VAE_EVAL_SCENES, VAE_EVAL_FRAMES = 8, 60
# training clips calibrated_init measures on, long enough to hold impacts
VAE_INIT_CLIPS, VAE_INIT_FRAMES = 4, 30


def clip_frames(cfg: TrainConfig, model: SoundReactor) -> int:
    return cfg.clip_frames or model.config.transformer.train_context // 2


def dataset(cfg: TrainConfig, model: SoundReactor, frames: int):
    """Clips with `.frames` uint8 [N, H, W, 3] and `.audio` float32 [2, N * hop]: the synthetic set at the model's
    vision size, or every video under the folder `cfg.data`."""
    if cfg.data == "synthetic":
        return SyntheticAV(cfg.data_seed, cfg.dataset_size, frames, hw=model.config.vision_hw, hum=cfg.hum)
    folder = VideoFolder(cfg.data, frames)
    print("\n".join(folder.report()), file=sys.stderr)
    return folder


def clip_id(clips, i: int) -> str:
    """What identifies clip i's content, for the grid cache."""
    if isinstance(clips, SyntheticAV):
        return f"synthetic|{clips.clip_seed(i)}|{clips.n_frames}|{clips.hw}|{clips.hum}"
    return clips.clip_id(i)


def clip_names(clips, cfg: TrainConfig):
    """Task.clips: the names of the clips a step draws (the first draw of its generator, as in every batch)."""

    def names(step: int, part: slice) -> list[str]:
        indices = torch.randint(len(clips), (cfg.batch_size,), generator=step_generator(cfg.seed, step))
        if isinstance(clips, SyntheticAV):
            return [f"synthetic clip {i} (seed {clips.clip_seed(i)})" for i in indices[part].tolist()]
        return [clips.clip_name(i) for i in indices[part].tolist()]

    return names


def _save(model: SoundReactor, config: ModelConfig, path: Path, extra: dict[str, str]) -> None:
    save_checkpoint(path, config, model.state_dict(), extra)


class Features:
    """What a training step reads of clip i: its VAE latent means [N, C] (kept in memory) and its vision input:
    DINOv2 grids [N, h, w, C'] (kept in memory too when the whole set's fit in GRID_MEMORY_BYTES, else on disk by a
    `data.GridCache` when `grid_cache` names a folder, else recomputed), or, when DINOv2 trains (`frames`), the
    uint8 frames [N, H, W, 3] (kept in memory). Once both are held, the clip is not made again: making a 64-frame
    synthetic clip cost about as much as the small preset's training step."""

    def __init__(
        self, model: SoundReactor, clips, grid_cache: str | Path | None = None, frames: bool = False
    ) -> None:
        self.model, self.clips, self.frames = model, clips, frames
        self.cache = GridCache(grid_cache, model) if grid_cache and not frames else None
        self.latents: dict[int, Tensor] = {}
        self.held: dict[int, Tensor] | None = None  # vision inputs kept in memory
        cfg = model.config
        gh, gw = cfg.grid_hw
        if frames or len(clips) * clips.n_frames * gh * gw * cfg.dinov2.dim * 4 <= GRID_MEMORY_BYTES:
            self.held = {}

    @torch.no_grad()
    def latent(self, i: int, clip=None) -> Tensor:
        if i not in self.latents:
            audio = torch.from_numpy((clip or self.clips[i]).audio)[None]
            self.latents[i] = self.model.vae.encode(audio.to(next(self.model.vae.parameters()).device))[0].T
        return self.latents[i]

    @torch.no_grad()
    def vision(self, i: int, clip) -> Tensor:
        if self.held is not None and i in self.held:
            return self.held[i]
        if self.frames:
            vision = torch.from_numpy(clip.frames)
        elif self.cache is not None:
            vision = self.cache.grids(clip_id(self.clips, i), clip.frames)
        else:
            vision = clip_grids(self.model, clip.frames)
        if self.held is not None:
            self.held[i] = vision
        return vision

    @torch.no_grad()
    def __call__(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        latents, visions = [], []
        for i in indices.tolist():
            held = i in self.latents and self.held is not None and i in self.held
            clip = None if held else self.clips[i]
            visions.append(self.vision(i, clip))
            latents.append(self.latent(i, clip))
        return torch.stack(latents), torch.stack(visions)


def freeze(*modules: nn.Module) -> None:
    for m in modules:
        m.requires_grad_(False).eval()


def _init_audio(cfg: TrainConfig, model: SoundReactor) -> Tensor:
    """[VAE_INIT_CLIPS, 2, T] training audio that initialisations measure on."""
    clips = dataset(cfg, model, VAE_INIT_FRAMES)
    return torch.from_numpy(np.stack([clips[i].audio for i in range(min(VAE_INIT_CLIPS, len(clips)))]))


def vae_task(model: SoundReactor, cfg: TrainConfig) -> Task:
    if cfg.vae_stereo and cfg.vae_stereo == model.config.vae.stereo:
        print(f"--vae-stereo {cfg.vae_stereo}: the VAE already is; nothing converted", file=sys.stderr)
    elif cfg.vae_stereo:
        model.vae, dropped = panned_copy(model.vae, _init_audio(cfg, model))
        model.config = model.config.replace(vae={"stereo": cfg.vae_stereo})
        last = model.config.vae.latent_dim - 1
        moved = f"; channel {last} moved into its place" if dropped != last else ""
        print(
            f"parametric stereo: latent channel {dropped} (the least varying) gave way{moved}; channel {last} is "
            "the pan",
            file=sys.stderr,
        )
    frames = clip_frames(cfg, model)
    clips = dataset(cfg, model, frames)
    if cfg.vae_init == "calibrated":
        calibrated_init(model.vae, _init_audio(cfg, model), cfg.seed)
    trainee = VAETrainee(model.vae, cfg)
    latent_dim, hop = model.config.vae.latent_dim, model.config.vae.hop
    if cfg.crop_frames > frames:
        raise ValueError(f"crop_frames {cfg.crop_frames} must not exceed the clips' {frames} frames")
    length = cfg.crop_frames or frames

    def batch(step: int, part: slice) -> dict[str, Tensor]:
        gen = step_generator(cfg.seed, step)
        indices = torch.randint(len(clips), (cfg.batch_size,), generator=gen)
        eps = torch.randn(cfg.batch_size, latent_dim, length, generator=gen)
        # a muted batch (RAVE's silence batches): the VAE learns that silence decodes to silence
        muted = torch.rand((), generator=gen).item() < cfg.silence_share
        starts = torch.randint(frames - length + 1, (cfg.batch_size,), generator=gen)[part] * hop
        if muted:
            audio = torch.zeros(len(starts), model.config.vae.audio_channels, length * hop)
        else:
            windows = zip(indices[part].tolist(), starts.tolist(), strict=True)
            audio = torch.from_numpy(np.stack([clips[i].audio[:, s : s + length * hop] for i, s in windows]))
        return {
            "audio": audio,
            "eps": eps[part],
            "warmup": torch.tensor(warmup(cfg, step)),
            "adversarial": torch.tensor(float(step >= cfg.adv_start)),
        }

    def export(module: nn.Module, path: Path, extra: dict[str, str]) -> None:
        out = copy.deepcopy(model).cpu()
        out.vae.load_state_dict(folded_state(module.vae))
        _save(out, out.config, path, extra)

    def evaluate(module: nn.Module) -> dict[str, float]:
        """The VAE's reconstructions of validation scenes scored as `evaluate` scores a model (what it keeps, not
        its loss), and the `vae_quality` that selects among checkpoints."""
        figures = evaluate_vae(
            module.vae, scenes=VAE_EVAL_SCENES, n_frames=VAE_EVAL_FRAMES, seed=VALIDATION_SEED
        )["reconstruction"]
        return {"quality": vae_quality(figures), **{k: figures[k] for k in VAE_EVAL_FIGURES}}

    critic = Critic(trainee.discriminator, trainee.discriminator_loss) if trainee.discriminator else None
    return Task(
        trainee, batch, export, evaluate, select="quality", clips=clip_names(clips, cfg), critic=critic
    )


VAE_EVAL_FIGURES = (
    "onset_f1",
    "onset_precision",
    "onset_recall",
    "envelope_corr",
    "pan_corr",
    "logmel_distance_db",
    "loudness_error_db",
    "impact_gap_db",
    "gap_ratio",
    "silence_dbfs",
)


def vae_quality(figures: dict) -> float:
    """The figure that selects a VAE checkpoint: the geometric mean of onset F1, envelope correlation and the
    between-impacts gap ratio, each clipped to [0, 1] (undefined counts 0).

    It is 0 whenever one of them is: a silent or untrained decoder (no onsets, no envelope), a steady bed that
    leaves impacts no louder than the rest (gap ratio 0), or output that clicks on every frame with a flat envelope
    cannot score by the other two (the previous recipe selected by onset F1 alone).
    """
    parts = [figures.get(k) for k in ("onset_f1", "envelope_corr", "gap_ratio")]
    clipped = [min(1.0, max(0.0, p)) if p is not None else 0.0 for p in parts]
    return float(np.prod(clipped) ** (1 / 3))


def ar_task(
    model: SoundReactor, cfg: TrainConfig, device: torch.device, grid_cache: str | Path | None = None
) -> Task:
    """Pretraining or ECT of `model` (moved to `device`; pretraining sets its latent_scale)."""
    frames = clip_frames(cfg, model)
    clips = dataset(cfg, model, frames)
    model = model.to(device)
    freeze(model.vae)
    if not cfg.train_dinov2:
        freeze(model.vision.dinov2)
    else:  # not reached by the forward: the masked-patch objective's token, and pos_embed (read resized, a buffer)
        model.vision.dinov2.mask_token.requires_grad_(False)
        model.vision.dinov2.pos_embed.requires_grad_(False)
    if cfg.train_dinov2 and grid_cache:
        print("--train-dinov2: grids are computed at every step; --grid-cache is not used", file=sys.stderr)
    features = Features(model, clips, grid_cache, frames=cfg.train_dinov2)
    if cfg.stage == "pretrain":
        _set_latent_scale(model, cfg, features)
        frames_hw = tuple(clips[0].frames.shape[1:3]) if cfg.train_dinov2 else None
        trainee: nn.Module = diffusion.DiffusionTrainee(model, frames_hw)
        sampler = {"kind": "heun"}
    else:
        trainee = ect.ECTTrainee(model, cfg)
        sampler = {"kind": "consistency", "consistency_steps": dict(cfg.consistency_steps)}
    latent_dim = model.config.vae.latent_dim

    def batch(step: int, part: slice) -> dict[str, Tensor]:
        gen = step_generator(cfg.seed, step)
        indices = torch.randint(len(clips), (cfg.batch_size,), generator=gen)
        if cfg.stage == "pretrain":
            draws = diffusion.draw_pretrain(cfg, gen, cfg.batch_size, frames, latent_dim)
        else:
            draws = ect.draw_ect(cfg, gen, step, cfg.batch_size, frames, latent_dim)
        latents, vision = features(indices[part])
        return {"latents": latents, "vision": vision, **{k: v[part] for k, v in draws.items()}}

    def export(module: nn.Module, path: Path, extra: dict[str, str]) -> None:
        out = copy.deepcopy(model).cpu()
        if module.dinov2 is not None:
            out.vision.dinov2.load_state_dict(module.dinov2.state_dict())
        out.vision.tokenizer.load_state_dict(module.tokenizer.state_dict())
        out.transformer.load_state_dict(module.transformer.state_dict())
        out.head.load_state_dict(module.head.state_dict())
        _save(out, out.config.replace(sampler=sampler), path, extra)

    return Task(trainee, batch, export, clips=clip_names(clips, cfg))


def _set_latent_scale(model: SoundReactor, cfg: TrainConfig, features: Features) -> None:
    """Set HeadConfig.latent_scale in place: cfg.latent_scale, or measured on the first clips."""
    scale = cfg.latent_scale
    if scale <= 0:
        count = min(LATENT_SCALE_CLIPS, len(features.clips))
        latents = torch.stack([features.latent(i) for i in range(count)])
        scale = diffusion.measure_latent_scale(latents, model.config.head.sigma_data)
    model.config = model.config.replace(head={"latent_scale": scale})
    model.head.cfg = model.config.head
