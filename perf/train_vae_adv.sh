#!/usr/bin/env bash
# The VAE of the small preset with the adversarial recipe (issue 20): calibrated init, a plain-autoencoder warm-up,
# then a multi-scale STFT discriminator (hinge + feature matching), silence batches, random 4-frame windows of
# 64-frame scenes. Resumable: run it again with the same RUN_DIR (and a larger VAE_STEPS) to go on.
#
#   bash perf/train_vae_adv.sh [RUN_DIR [TRAIN_VAE_OPTION ...]]   # default runs/vae_adv
#   VAE_STEPS=20000 bash perf/train_vae_adv.sh runs/vae_adv
#   STOP_AT=14:40 bash perf/train_vae_adv.sh ...         # stop (resumably) at that UTC time today
#
# Options after RUN_DIR go to train-vae after the recipe's and replace them (argparse keeps the last one given):
# perf/train_vae_balance.sh continues a trained VAE that way.
# RUN_DIR/eval.jsonl gets the validation figures of every checkpoint (onset P/R/F1, envelope, pan, log-mel, the
# impact gap and its ratio to the truth's, the level in the truth's silence) and best.safetensors the checkpoint
# with the highest `quality` (stages.vae_quality). Every option below is stored in state.pt: a resumed run must
# give the same ones (only --steps may change), so the KL ramp is fixed in steps rather than tied to VAE_STEPS.
# On a GPU the same command uses it (bf16 autocast); DISC_FILTERS=32 is the discriminator's usual width there.
set -euo pipefail
RUN=${1:-runs/vae_adv}
shift $(($# > 0))
VAE_STEPS=${VAE_STEPS:-20000}
DISC_FILTERS=${DISC_FILTERS:-16}  # 16 for one CPU thread: 32 made a step 2.4x slower than 16 here
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SR="${PYTHON:-python} -m soundreactor"

STOP=()
if [ -n "${STOP_AT:-}" ]; then
  # SIGTERM at STOP_AT, SIGKILL a minute later (a run here outlived its SIGTERM): the last checkpoint, written
  # atomically, is kept and the run resumes from it
  LEFT=$(($(date -u -d "$STOP_AT" +%s) - $(date -u +%s)))
  [ "$LEFT" -gt 0 ] || { echo "STOP_AT=$STOP_AT (UTC, today) has passed: give a later time" >&2; exit 2; }
  STOP=(timeout --signal=TERM --kill-after=60 "$LEFT")
fi

# adversarial weights are stable-audio-tools' Oobleck recipe (adv 0.1, feature matching 5, STFT 1, KL 1e-5);
# the envelope weight, lr and EMA are perf/train_default.sh's; the discriminator joins at step 300, where that
# recipe's plain autoencoder had its best validation onsets; KL and posterior noise ramp in over steps 4000-8000
"${STOP[@]}" $SR train-vae --preset small --out-dir "$RUN" --vae-init calibrated --steps "$VAE_STEPS" \
  --batch-size 4 --clip-frames 64 --crop-frames 4 --lr 1e-3 --ema-decay 0.99 --checkpoint-every 100 \
  --envelope-weight 4 --kl-weight 1e-5 --kl-warmup 8000 --silence-share 0.1 \
  --adv-weight 0.1 --fm-weight 5 --adv-start 300 --disc-lr 2e-4 --disc-filters "$DISC_FILTERS" "$@"
