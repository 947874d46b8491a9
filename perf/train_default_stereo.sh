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
# Re-running resumes every stage. Step counts (environment): VAE_STEPS, PRE_STEPS, ECT_STEPS.
set -euo pipefail
START_VAE=${1:?give round 2 VAE (train_default.sh RUN/vae/best.safetensors)}
START_MODEL=${2:?give round 2 pretrained model (train_default.sh RUN/pretrain/model.safetensors)}
RUN=${3:-runs/default_stereo}
VAE_STEPS=${VAE_STEPS:-3000}
PRE_STEPS=${PRE_STEPS:-10000}
ECT_STEPS=${ECT_STEPS:-2000}
EVAL_SCENES=${EVAL_SCENES:-8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-python}
SR="$PY -m soundreactor"
SR_DDP="$PY -m torch.distributed.run --nproc-per-node ${NPROC:-2} -m soundreactor"
HERE=$(dirname "$0")

VAE_STEPS=$VAE_STEPS bash "$HERE/train_vae_balance.sh" "$START_VAE" "$RUN/vae"
$SR_DDP train --stage pretrain --init "$START_MODEL" --vae "$RUN/vae/best.safetensors" --out-dir "$RUN/pretrain" \
  --grid-cache "$RUN/grids" --steps "$PRE_STEPS" --batch-size 8 --lr 1e-3 --ema-decay 0.995 \
  --dataset-size 2000 --checkpoint-every 250
$SR_DDP train --stage ect --init "$RUN/pretrain/model.safetensors" --out-dir "$RUN/ect" \
  --grid-cache "$RUN/grids" --steps "$ECT_STEPS" --batch-size 8 --lr 3e-4 --ema-decay 0.995 \
  --dataset-size 2000 --ect-stage-steps $((ECT_STEPS / 4)) --checkpoint-every 200
GUIDANCE=$($PY "$HERE/select_default.py" "$RUN/select_guidance" "$RUN/ect/model.safetensors" \
  --guidance 2 3 4.5 6 8 | tail -n 1)
for NFE in 4 1; do
  $SR evaluate --checkpoint "$RUN/ect/model.safetensors" --nfe "$NFE" --guidance "$GUIDANCE" \
    --scenes "$EVAL_SCENES" --out "$RUN/eval_nfe$NFE"
done
if [ "${PUBLISH:-0}" = 1 ]; then
  $PY -m soundreactor.default_model "$RUN/ect/model.safetensors" --guidance "$GUIDANCE"
fi
