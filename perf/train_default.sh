#!/usr/bin/env bash
# The recipe of the built-in default model: the `small` preset trained on the built-in synthetic scenes,
# VAE -> diffusion pretraining (Algorithm 1) -> ECT (Algorithm 2) -> evaluation at NFE 4 and 1.
#
#   bash perf/train_default.sh [RUN_DIR]            # default runs/default; re-running resumes every stage
#   PUBLISH=1 bash perf/train_default.sh [RUN_DIR]  # then replace the package's default model and its report
#
# Step counts are sized for one 2-core CPU (one thread per process) and can be raised through the environment
# (VAE_STEPS, PRE_STEPS, ECT_STEPS); on a GPU every stage uses it (bf16 autocast) and the same counts should take
# minutes (not measured: no GPU was lent). Each stage's run directory keeps its log, loss plot and resumable
# state; the VAE's also keeps eval.jsonl, its onset and envelope figures on validation scenes at every checkpoint,
# and best.safetensors, the checkpoint with the best validation quality (stages.vae_quality), which the later
# stages start from.
set -euo pipefail
RUN=${1:-runs/default}
VAE_STEPS=${VAE_STEPS:-1200}
PRE_STEPS=${PRE_STEPS:-2500}
ECT_STEPS=${ECT_STEPS:-800}
EVAL_SCENES=${EVAL_SCENES:-8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # on a busy 2-core box two threads made steps 5x slower
SR="${PYTHON:-python} -m soundreactor"  # PYTHON: the interpreter of the environment soundreactor is installed in

# 1. VAE from a calibrated init (the default init collapses: see vae.calibrated_init) on 4-frame crops,
#    as a plain autoencoder on this budget (the KL warm-up outlasts the run: no posterior noise, no KL).
$SR train-vae --preset small --out-dir "$RUN/vae" --vae-init calibrated --steps "$VAE_STEPS" \
  --batch-size 4 --clip-frames 4 --lr 1e-3 --envelope-weight 4 --kl-weight 1e-6 --kl-warmup $((2 * VAE_STEPS)) \
  --ema-decay 0.99 --checkpoint-every 150
# 2. diffusion pretraining on 64-frame clips (the preset's 128-token window), latent_scale measured on the data
$SR train --stage pretrain --init "$RUN/vae/best.safetensors" --out-dir "$RUN/pretrain" \
  --grid-cache "$RUN/grids" --steps "$PRE_STEPS" --batch-size 8 --lr 1e-3 --ema-decay 0.995 \
  --dataset-size 2000 --checkpoint-every 250
# 3. Easy Consistency Tuning from the pretrained EMA weights; writes the NFE 1/2/4 step times
$SR train --stage ect --init "$RUN/pretrain/model.safetensors" --out-dir "$RUN/ect" \
  --grid-cache "$RUN/grids" --steps "$ECT_STEPS" --batch-size 8 --lr 3e-4 --ema-decay 0.995 \
  --dataset-size 2000 --ect-stage-steps $((ECT_STEPS / 4)) --checkpoint-every 200
# 4. held-out scenes through the streaming runtime: the model, ground truth, its VAE and random weights
for NFE in 4 1; do
  $SR evaluate --checkpoint "$RUN/ect/model.safetensors" --nfe "$NFE" --scenes "$EVAL_SCENES" \
    --out "$RUN/eval_nfe$NFE"
done
if [ "${PUBLISH:-0}" = 1 ]; then
  # the package's copy (float32 stored as float16) and its report, which tests/test_default_model.py reproduces
  ${PYTHON:-python} -m soundreactor.default_model "$RUN/ect/model.safetensors"
fi
