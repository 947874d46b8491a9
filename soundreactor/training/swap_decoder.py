"""Give a trained model a better VAE decoder: `python -m soundreactor.training.swap_decoder MODEL VAE OUT`.

A decoder trained with `train-vae --freeze-encoder` reads the latents of the encoder it started from, so a model
whose transformer and head learned that encoder's latents can decode with it unchanged: the decoder can go on
training while the rest of the chain trains on the latents. OUT is MODEL with VAE's decoder; the swap refuses a
VAE whose encoder is not MODEL's (another latent space, which would decode the model's latents as noise).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from soundreactor.checkpoint import load_checkpoint, save_checkpoint

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
        raise ValueError(
            f"{vae_path}'s VAE config differs from {model_path}'s: its decoder cannot be swapped in"
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="trained model checkpoint (train --stage ect)")
    parser.add_argument("vae", help="checkpoint whose decoder to take (train-vae --freeze-encoder)")
    parser.add_argument("out", help="checkpoint to write")
    args = parser.parse_args(argv)
    swap_decoder(args.model, args.vae, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
