#!/usr/bin/env bash
# A round of the built-in default model from the last one's: its VAE continued (perf/train_vae_balance.sh: the
# encoder trains, so the latents change), then pretraining warm-started from its pretrained transformer and head on
# the new latents (`train --vae`), ECT, the guidance chosen on validation scenes, the held-out evaluation at NFE 4
# and 1. Round 3 continued round 2 (perf/train_default.sh) with the stereo balance loss; round 4 continued round 3
# with parametric stereo (VAEConfig.stereo "pan"): options after RUN_DIR go to the VAE's train-vae.
#
#   bash perf/train_default_stereo.sh START_VAE START_PRETRAINED [RUN_DIR [TRAIN_VAE_OPTION ...]]
#   VAE_STEPS=2000 PRE_STEPS=15000 DATASET_SIZE=4000 bash perf/train_default_stereo.sh \
#     R3/vae.safetensors R3/pretrain/model.safetensors runs/default_pan --vae-stereo pan    # round 4
#   PUBLISH=1 bash perf/train_default_stereo.sh ...   # then replace the package's default model and its report
#
# START_VAE is the last round's VAE (train_default.sh's RUN/vae/best.safetensors), START_PRETRAINED its
# RUN/pretrain/model.safetensors. Re-running resumes every stage. Step counts (environment): VAE_STEPS (3000),
# PRE_STEPS (10000), DATASET_SIZE (2000), ECT_STEPS (finish_default.sh).
set -euo pipefail
START_VAE=${1:?give the VAE of the last round (train_default.sh RUN/vae/best.safetensors)}
START_MODEL=${2:?give the pretrained model of the last round (train_default.sh RUN/pretrain/model.safetensors)}
RUN=${3:-runs/default_stereo}
shift $(($# > 3 ? 3 : $#))
export VAE_STEPS=${VAE_STEPS:-3000}
PRE_STEPS=${PRE_STEPS:-10000}
export DATASET_SIZE=${DATASET_SIZE:-2000}  # synthetic training scenes, for pretraining and ECT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-python}
HERE=$(dirname "$0")

bash "$HERE/train_vae_balance.sh" "$START_VAE" "$RUN/vae" "$@"
$PY -m torch.distributed.run --nproc-per-node "${NPROC:-2}" -m soundreactor train --stage pretrain \
  --init "$START_MODEL" --vae "$RUN/vae/best.safetensors" --out-dir "$RUN/pretrain" --grid-cache "$RUN/grids" \
  --steps "$PRE_STEPS" --batch-size 8 --lr 1e-3 --ema-decay 0.995 --dataset-size "$DATASET_SIZE" --checkpoint-every 250
bash "$HERE/finish_default.sh" "$RUN"
