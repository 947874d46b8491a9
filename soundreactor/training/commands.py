"""`soundreactor train-vae` and `soundreactor train --stage pretrain|ect`.

Every TrainConfig field of a plain type is an option (`--batch-size`, `--p-uncond`, ...). One process trains on
CPU or one GPU; for several GPUs or nodes launch the same command with torchrun, e.g.
`torchrun --nproc-per-node 8 -m soundreactor train --stage pretrain ...`. Only stdlib imports at module level:
the CLI stays light.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, get_type_hints

from soundreactor.training.train_config import TrainConfig  # stdlib only

PLAIN = (int, float, str, bool)


def _config_options(parser: argparse.ArgumentParser) -> None:
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        if f.name == "stage" or kind not in PLAIN:
            continue
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata.get('help', '')} (default {f.default})".replace("%", "%%")  # argparse formats it
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=text)


def _config(args: argparse.Namespace, stage: str) -> TrainConfig:
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name != "stage" and getattr(args, f.name, None) is not None
    }
    return TrainConfig(stage=stage, **given)


def _model(args: argparse.Namespace, cfg: TrainConfig):
    from soundreactor.model.soundreactor import SoundReactor, init_model

    if args.init:
        model = SoundReactor.load(args.init)
        if cfg.vae:
            _take_vae(model, cfg.vae)
        return model
    if not args.preset:
        raise ValueError("give --init CHECKPOINT (a trained model) or --preset NAME (seeded random weights)")
    model, _ = init_model(args.preset, seed=args.model_seed)
    return model


def _take_vae(model, path: str) -> None:
    """Put the VAE of checkpoint `path` into `model` in place (`train --vae`). What the transformer, head and
    runtime read of a VAE must match (latent size, samples per frame, rate, channels); its inner layout (widths,
    upsampling, stereo) comes with it."""
    from pathlib import Path

    from soundreactor.model.soundreactor import SoundReactor

    if not Path(path).is_file():
        raise ValueError(f"--vae {path} not found: give a VAE checkpoint (train-vae's RUN/best.safetensors)")
    source = SoundReactor.load(path)
    ours, theirs = model.config.vae, source.config.vae
    differ = [
        f"{name} {getattr(theirs, name)} vs {getattr(ours, name)}"
        for name in ("latent_dim", "hop", "sample_rate", "audio_channels")
        if getattr(theirs, name) != getattr(ours, name)
    ]
    if differ:
        raise ValueError(
            f"--vae {path} does not fit the --init model ({'; '.join(differ)}): give a VAE trained for the "
            "model's preset"
        )
    model.vae = source.vae
    model.config = model.config.replace(vae=theirs)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pretraining on the VAE of {path}, the transformer and head of the --init model")


def _run(args: argparse.Namespace, stage: str) -> None:
    import torch

    from soundreactor.training import stages
    from soundreactor.training.loop import default_device, train

    cfg = _config(args, stage)
    if cfg.vae and stage != "pretrain":
        why = (
            "ECT must run on the VAE its checkpoint holds"
            if stage == "ect"
            else "train-vae trains --init's VAE"
        )
        raise ValueError(
            f"--vae warm-starts pretraining on a new VAE's latents (train --stage pretrain); {why}"
        )
    if cfg.vae_stereo and stage != "vae":
        raise ValueError(
            "--vae-stereo converts a VAE in train-vae; pretraining takes a converted one with --vae VAE"
        )
    if cfg.train_dinov2 and stage != "pretrain":
        raise ValueError(
            "--train-dinov2 trains DINOv2 in pretraining (train --stage pretrain); ECT keeps the one its "
            "checkpoint holds"
        )
    if cfg.vae and not args.init:
        raise ValueError("--vae needs --init: the model whose transformer and head start the run")
    if cfg.freeze_encoder and not args.init:
        raise ValueError(
            "--freeze-encoder trains a decoder for the encoder of a trained VAE: give --init with its checkpoint "
            "(train-vae's RUN/best.safetensors)"
        )
    device = default_device(args.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = _model(args, cfg)
        if stage == "vae":
            task = stages.vae_task(model, cfg)
        else:
            if stage == "ect" and (not args.init or model.config.sampler.kind != "heun"):
                raise ValueError(
                    "--stage ect starts from a pretrained checkpoint: give --init with the model.safetensors "
                    "that `train --stage pretrain` wrote (it samples with Heun; "
                    + (
                        f"{args.init} samples with {model.config.sampler.kind!r})"
                        if args.init
                        else "none given)"
                    )
                )
            task = stages.ar_task(model, cfg, device, args.grid_cache)
    path = train(task, cfg, args.out_dir, device)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path}")


def cmd_train_vae(args: argparse.Namespace) -> None:
    _run(args, "vae")


def cmd_train(args: argparse.Namespace) -> None:
    _run(args, args.stage)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", help="checkpoint to start from (made by init, train-vae or train)")
    parser.add_argument("--preset", help="start from seeded random weights of this preset instead of --init")
    parser.add_argument("--model-seed", type=int, default=0, help="seed of the random weights with --preset")
    parser.add_argument(
        "--out-dir",
        required=True,
        help="run directory: resumes from its newest checkpoint-<step>/ if it has one",
    )
    parser.add_argument(
        "--device",
        help="cpu or cuda (default: cuda if there is a GPU; under torchrun each rank takes GPU LOCAL_RANK)",
    )
    _config_options(parser)


def add_commands(sub: Any) -> None:
    vae = sub.add_parser("train-vae", help="train the causal Oobleck VAE (L1 + multi-resolution STFT + KL)")
    _common(vae)
    vae.set_defaults(func=cmd_train_vae)
    ar = sub.add_parser("train", help="diffusion pretraining (Alg. 1) or Easy Consistency Tuning (Alg. 2)")
    ar.add_argument("--stage", choices=("pretrain", "ect"), required=True)
    ar.add_argument(
        "--grid-cache", metavar="DIR", help="keep the frozen DINOv2 grids of every clip on disk here (reused)"
    )
    _common(ar)
    ar.set_defaults(func=cmd_train)
