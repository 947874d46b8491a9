#!/usr/bin/env bash
# The adversarial VAE recipe (train_vae_adv.sh) continued from a trained VAE with the stereo balance loss
# (vae.balance_loss, issue 20's pan target): the encoder keeps training, so the latents change and the model's
# chain runs again on the result (perf/train_default_stereo.sh). Resumable with the same RUN_DIR.
#
#   bash perf/train_vae_balance.sh START.safetensors [RUN_DIR [TRAIN_VAE_OPTION ...]]   # default runs/vae_balance
#   VAE_STEPS=3000 STOP_AT=20:00 bash perf/train_vae_balance.sh ...
#   bash perf/train_vae_balance.sh START.safetensors runs/vae_pan --vae-stereo pan   # a panned decoder (round 4)
#
# The discriminator starts fresh from step 0 (a checkpoint holds no discriminator). Posterior noise and KL stay
# off (--kl-warmup far beyond the run): the start was trained without them and its log-variances are untrained.
set -euo pipefail
START=${1:?give the VAE checkpoint to start from (a model.safetensors of train-vae)}
RUN=${2:-runs/vae_balance}
shift $(($# > 2 ? 2 : $#))
export VAE_STEPS=${VAE_STEPS:-3000}
exec bash "$(dirname "$0")/train_vae_adv.sh" "$RUN" --init "$START" --vae-init keep \
  --balance-weight "${BALANCE_WEIGHT:-2}" --kl-warmup 1000000 --adv-start 0 "$@"
