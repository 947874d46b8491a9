#!/usr/bin/env bash
# Round 3 of the built-in default model: round 2 (perf/train_default.sh) continued with the stereo balance loss.
# The VAE goes on from round 2's with vae.balance_loss (perf/train_vae_balance.sh: the encoder trains, so the
# latents change), then pretraining warm-starts from round 2's pretrained transformer and head on the new latents
# (`train --vae`), ECT, the guidance chosen on validation scenes, and the held-out evaluation at NFE 4 and 1.
#
#   bash perf/train_default_stereo.sh ROUND2_VAE ROUND2_PRETRAINED [RUN_DIR]   # default runs/default_stereo
#   PUBLISH=1 bash perf/train_default_stereo.sh ...   # then replace the package's default model and its report
#
# ROUND2_VAE is train_default.sh's RUN/vae/best.safetensors, ROUND2_PRETRAINED its RUN/pretrain/model.safetensors.
# Re-running resumes every stage. Step counts (environment): VAE_STEPS, PRE_STEPS, ECT_STEPS (finish_default.sh).
set -euo pipefail
START_VAE=${1:?give round 2 VAE (train_default.sh RUN/vae/best.safetensors)}
START_MODEL=${2:?give round 2 pretrained model (train_default.sh RUN/pretrain/model.safetensors)}
RUN=${3:-runs/default_stereo}
export VAE_STEPS=${VAE_STEPS:-3000}
PRE_STEPS=${PRE_STEPS:-10000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-python}
HERE=$(dirname "$0")

bash "$HERE/train_vae_balance.sh" "$START_VAE" "$RUN/vae"
$PY -m torch.distributed.run --nproc-per-node "${NPROC:-2}" -m soundreactor train --stage pretrain \
  --init "$START_MODEL" --vae "$RUN/vae/best.safetensors" --out-dir "$RUN/pretrain" --grid-cache "$RUN/grids" \
  --steps "$PRE_STEPS" --batch-size 8 --lr 1e-3 --ema-decay 0.995 --dataset-size 2000 --checkpoint-every 250
bash "$HERE/finish_default.sh" "$RUN"
