#!/usr/bin/env bash
# The recipe of the built-in default model: the `small` preset trained on the built-in synthetic scenes,
# VAE -> diffusion pretraining (Algorithm 1) -> ECT (Algorithm 2) -> evaluation at NFE 4 and 1.
#
#   bash perf/train_default.sh [RUN_DIR]          # default runs/default; re-running resumes every stage
#
# Step counts are sized for one 2-core CPU (35 min in all on a busy one, one thread per process) and can be raised
# through the environment (VAE_STEPS, PRE_STEPS, ECT_STEPS); on a GPU every stage uses it (bf16 autocast) and
# the same counts should take minutes (not measured: no GPU was lent). Each stage's run directory keeps its log, loss plot and resumable state; the
# VAE's also keeps eval.jsonl, its onset and envelope figures at every checkpoint (judge it by those).
set -euo pipefail
RUN=${1:-runs/default}
VAE_STEPS=${VAE_STEPS:-1200}
PRE_STEPS=${PRE_STEPS:-2000}
ECT_STEPS=${ECT_STEPS:-1000}
EVAL_SCENES=${EVAL_SCENES:-8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # on a busy 2-core box two threads made steps 5x slower
SR="${PYTHON:-python} -m soundreactor"  # PYTHON: the interpreter of the environment soundreactor is installed in

# 1. VAE from a calibrated init (the default init collapses: see vae.calibrated_init) on 4-frame crops,
#    as a plain autoencoder on this budget (the KL warm-up outlasts 1200 steps: no posterior noise, no KL).
$SR train-vae --preset small --out-dir "$RUN/vae" --vae-init calibrated --steps "$VAE_STEPS" \
  --batch-size 4 --clip-frames 4 --lr 1e-3 --envelope-weight 4 --kl-weight 1e-6 --kl-warmup 2400 \
  --ema-decay 0.99 --checkpoint-every 150
# 2. diffusion pretraining on 64-frame clips (the preset's 128-token window), latent_scale measured on the data
$SR train --stage pretrain --init "$RUN/vae/model.safetensors" --out-dir "$RUN/pretrain" \
  --grid-cache "$RUN/grids" --steps "$PRE_STEPS" --batch-size 8 --lr 1e-3 --ema-decay 0.995 \
  --dataset-size 2000 --checkpoint-every 250
# 3. Easy Consistency Tuning from the pretrained EMA weights; writes the NFE 1/2/4 step times
$SR train --stage ect --init "$RUN/pretrain/model.safetensors" --out-dir "$RUN/ect" \
  --grid-cache "$RUN/grids" --steps "$ECT_STEPS" --batch-size 8 --lr 3e-4 --ema-decay 0.995 \
  --dataset-size 2000 --ect-stage-steps $((ECT_STEPS / 4)) --checkpoint-every 250
# 4. held-out scenes through the streaming runtime: the model, ground truth, its VAE and random weights
for NFE in 4 1; do
  $SR evaluate --checkpoint "$RUN/ect/model.safetensors" --nfe "$NFE" --scenes "$EVAL_SCENES" \
    --out "$RUN/eval_nfe$NFE"
done
