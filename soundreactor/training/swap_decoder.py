"""Give a trained model a better VAE decoder: `python -m soundreactor.training.swap_decoder MODEL VAE OUT`.

A decoder trained with `train-vae --freeze-encoder` reads the latents of the encoder it started from, so a model
whose transformer and head learned that encoder's latents can decode with it unchanged: the decoder can go on
training while the rest of the chain trains on the latents. OUT is MODEL with VAE's decoder; the swap refuses a
VAE whose encoder is not MODEL's (another latent space, which would decode the model's latents as noise).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from soundreactor.checkpoint import load_checkpoint, save_checkpoint
from soundreactor.outputs import OutputPathError, check_outputs, check_suffix

DECODER = "vae.decoder."
ENCODER = "vae.encoder."
# train-vae trains under weight norm and folds it back (g * v / ||v||): a frozen encoder comes back within a few
# float32 ulps of its weights, far inside this bound; another training run's encoder is off by whole percents
ENCODER_RTOL = 1e-5


def swap_decoder(model_path: str | Path, vae_path: str | Path, out: str | Path) -> None:
    """Write `out`: `model_path`'s checkpoint with the VAE decoder of `vae_path`'s.

    Raises ValueError when the two VAEs' configs or encoders differ.
    """
    config, tensors = load_checkpoint(model_path)
    vae_config, vae_tensors = load_checkpoint(vae_path)
    if vae_config.vae != config.vae:
        differ = [
            f"{f.name} {getattr(vae_config.vae, f.name)} vs {getattr(config.vae, f.name)}"
            for f in dataclasses.fields(config.vae)
            if getattr(vae_config.vae, f.name) != getattr(config.vae, f.name)
        ]
        raise ValueError(
            f"{vae_path}'s VAE config differs from {model_path}'s ({'; '.join(differ)}): its decoder cannot be "
            "swapped in; a model takes a VAE of another layout by pretraining on it (train --stage pretrain "
            "--init MODEL --vae VAE)"
        )
    for key in (k for k in tensors if k.startswith(ENCODER)):
        ours, theirs = tensors[key].float(), vae_tensors[key].float()
        if not torch.allclose(theirs, ours, rtol=0, atol=ENCODER_RTOL * ours.abs().max().item()):
            raise ValueError(
                f"{vae_path}'s encoder is not {model_path}'s ({key} differs): its decoder reads other latents; "
                "train the decoder from the model's own VAE with `train-vae --freeze-encoder`"
            )
    decoder = {k: v for k, v in vae_tensors.items() if k.startswith(DECODER)}
    extra = {"decoder_from": Path(vae_path).name, "model_from": Path(model_path).name}
    save_checkpoint(out, config, {**tensors, **decoder}, extra)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, or 1 with one `error:` line (nothing written) for a bad path or checkpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m soundreactor.training.swap_decoder", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "model", help="trained model checkpoint (train --stage ect: RUN/ect/model.safetensors)"
    )
    parser.add_argument(
        "vae", help="checkpoint whose decoder to take (train-vae --freeze-encoder: RUN/best.safetensors)"
    )
    parser.add_argument("out", help="checkpoint to write (.safetensors)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        check_outputs([("OUT", args.out)], [("MODEL", args.model), ("VAE", args.vae)])
        check_suffix("OUT", args.out, (".safetensors",), "a safetensors checkpoint")
        if Path(args.out).exists() and not args.force:
            raise OutputPathError(f"OUT {args.out} exists; give --force to replace it, or choose another OUT")
        swap_decoder(args.model, args.vae, args.out)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
