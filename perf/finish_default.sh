#!/usr/bin/env bash
# The default model's chain from a pretrained checkpoint on: ECT -> the guidance chosen on validation scenes ->
# held-out evaluation at NFE 4 and 1 -> (PUBLISH=1) the package's copy. perf/train_default.sh and
# perf/train_default_stereo.sh end with it.
#
#   bash perf/finish_default.sh RUN_DIR     # reads RUN_DIR/pretrain/model.safetensors; resumes like every stage
#
# Environment: ECT_STEPS (2000), EVAL_SCENES (8), DATASET_SIZE (2000), NPROC (2 DDP ranks), PUBLISH, PYTHON.
set -euo pipefail
RUN=${1:?give the run directory whose pretrain/model.safetensors to finish}
ECT_STEPS=${ECT_STEPS:-2000}
EVAL_SCENES=${EVAL_SCENES:-8}
export DATASET_SIZE=${DATASET_SIZE:-2000}  # synthetic training scenes (grids cached in RUN_DIR/grids)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-python}

# Easy Consistency Tuning from the pretrained EMA weights (NPROC DDP ranks, as pretraining); writes the NFE 1/2/4
# step times
$PY -m torch.distributed.run --nproc-per-node "${NPROC:-2}" -m soundreactor train --stage ect \
  --init "$RUN/pretrain/model.safetensors" --out-dir "$RUN/ect" --grid-cache "$RUN/grids" --steps "$ECT_STEPS" \
  --batch-size 8 --lr 3e-4 --ema-decay 0.995 --dataset-size "$DATASET_SIZE" --ect-stage-steps $((ECT_STEPS / 4)) \
  --checkpoint-every 200
# the guidance weight, on validation scenes: the highest `quality`
GUIDANCE=$($PY "$(dirname "$0")/select_default.py" "$RUN/select_guidance" "$RUN/ect/model.safetensors" \
  --guidance 2 3 4.5 6 8 | tail -n 1)
# held-out scenes through the streaming runtime: the model, ground truth, its VAE and random weights
for NFE in 4 1; do
  $PY -m soundreactor evaluate --checkpoint "$RUN/ect/model.safetensors" --nfe "$NFE" --guidance "$GUIDANCE" \
    --scenes "$EVAL_SCENES" --out "$RUN/eval_nfe$NFE"
done
if [ "${PUBLISH:-0}" = 1 ]; then
  # the package's copy (float32 stored as float16) and its report, which tests/test_default_model.py reproduces
  $PY -m soundreactor.default_model "$RUN/ect/model.safetensors" --guidance "$GUIDANCE"
fi
