#!/usr/bin/env bash
# The adversarial VAE recipe (train_vae_adv.sh) continued from a trained VAE with the stereo balance loss
# (vae.balance_loss, issue 20's pan target): the encoder keeps training, so the latents change and the model's
# chain (train_default.sh) runs again on the result. Resumable with the same RUN_DIR.
#
#   bash perf/train_vae_balance.sh START.safetensors [RUN_DIR]     # default runs/vae_balance
#   VAE_STEPS=3000 STOP_AT=20:00 bash perf/train_vae_balance.sh ...
#
# The discriminator starts fresh (a checkpoint holds no discriminator). Posterior noise and KL stay off
# (--kl-warmup far beyond the run): the start was trained without them and its log-variances are untrained.
set -euo pipefail
START=${1:?give the VAE checkpoint to start from (a model.safetensors of train-vae)}
RUN=${2:-runs/vae_balance}
VAE_STEPS=${VAE_STEPS:-3000}
DISC_FILTERS=${DISC_FILTERS:-16}
BALANCE_WEIGHT=${BALANCE_WEIGHT:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SR="${PYTHON:-python} -m soundreactor"

STOP=()
if [ -n "${STOP_AT:-}" ]; then
  LEFT=$(($(date -u -d "$STOP_AT" +%s) - $(date -u +%s)))
  [ "$LEFT" -gt 0 ] || { echo "STOP_AT=$STOP_AT (UTC, today) has passed: give a later time" >&2; exit 2; }
  STOP=(timeout --signal=TERM --kill-after=60 "$LEFT")
fi

"${STOP[@]}" $SR train-vae --init "$START" --out-dir "$RUN" --steps "$VAE_STEPS" \
  --batch-size 4 --clip-frames 64 --crop-frames 4 --lr 1e-3 --ema-decay 0.99 --checkpoint-every 100 \
  --envelope-weight 4 --balance-weight "$BALANCE_WEIGHT" --kl-weight 1e-5 --kl-warmup 1000000 \
  --silence-share 0.1 --adv-weight 0.1 --fm-weight 5 --adv-start 0 --disc-lr 2e-4 --disc-filters "$DISC_FILTERS"
