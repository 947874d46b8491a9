#!/usr/bin/env bash
# The recipe of the built-in default model: the `small` preset trained on the built-in synthetic scenes,
# VAE (adversarial) -> diffusion pretraining (Algorithm 1) -> ECT (Algorithm 2) -> guidance chosen on validation
# scenes -> evaluation on held-out scenes at NFE 4 and 1.
#
#   bash perf/train_default.sh [RUN_DIR]            # default runs/default; re-running resumes every stage
#   PUBLISH=1 bash perf/train_default.sh [RUN_DIR]  # then replace the package's default model and its report
#
# Step counts are the ones the published model was trained with on one 2-core CPU (one thread per process) and can
# be changed through the environment (VAE_STEPS, PRE_STEPS, ECT_STEPS); on a GPU every stage uses it (bf16
# autocast). Each stage's run directory keeps its log, loss plot and resumable state; the VAE's also keeps
# eval.jsonl, its validation figures at every checkpoint, and best.safetensors, the checkpoint with the best
# validation `quality` (stages.vae_quality), which the later stages take. perf/results/default_model_round2.md has the
# wall times.
set -euo pipefail
RUN=${1:-runs/default}
VAE_STEPS=${VAE_STEPS:-2600}
PRE_STEPS=${PRE_STEPS:-22000}
ECT_STEPS=${ECT_STEPS:-2000}
EVAL_SCENES=${EVAL_SCENES:-8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # on a busy 2-core box two threads made steps 5x slower
PY=${PYTHON:-python}  # the interpreter of the environment soundreactor is installed in
SR="$PY -m soundreactor"
# pretraining and ECT on NPROC DDP ranks of one thread each: the global batch of 8 split over them, the same run as
# one process (tests/test_training.py), in about half the time on 2 idle cores
SR_DDP="$PY -m torch.distributed.run --nproc-per-node ${NPROC:-2} -m soundreactor"

# 1. the VAE: perf/train_vae_adv.sh's recipe (calibrated init, a plain autoencoder until step 300, then the
#    multi-scale STFT discriminator; its KL ramp would start at step 4000, after this budget)
$SR train-vae --preset small --out-dir "$RUN/vae" --vae-init calibrated --steps "$VAE_STEPS" \
  --batch-size 4 --clip-frames 64 --crop-frames 4 --lr 1e-3 --ema-decay 0.99 --checkpoint-every 100 \
  --envelope-weight 4 --kl-weight 1e-5 --kl-warmup 8000 --silence-share 0.1 \
  --adv-weight 0.1 --fm-weight 5 --adv-start 300 --disc-lr 2e-4 --disc-filters 16
# 2. diffusion pretraining on 64-frame clips (the preset's 128-token window), latent_scale measured on the data
$SR_DDP train --stage pretrain --init "$RUN/vae/best.safetensors" --out-dir "$RUN/pretrain" \
  --grid-cache "$RUN/grids" --steps "$PRE_STEPS" --batch-size 8 --lr 1e-3 --ema-decay 0.995 \
  --dataset-size 2000 --checkpoint-every 250
# 3. Easy Consistency Tuning from the pretrained EMA weights; writes the NFE 1/2/4 step times
$SR_DDP train --stage ect --init "$RUN/pretrain/model.safetensors" --out-dir "$RUN/ect" \
  --grid-cache "$RUN/grids" --steps "$ECT_STEPS" --batch-size 8 --lr 3e-4 --ema-decay 0.995 \
  --dataset-size 2000 --ect-stage-steps $((ECT_STEPS / 4)) --checkpoint-every 200
# 4. the guidance weight, on validation scenes: the highest `quality` (4.5 for the published model)
GUIDANCE=$($PY perf/select_default.py "$RUN/select_guidance" "$RUN/ect/model.safetensors" --guidance 2 3 4.5 6 8 |
  tail -n 1)
# 5. held-out scenes through the streaming runtime: the model, ground truth, its VAE and random weights
for NFE in 4 1; do
  $SR evaluate --checkpoint "$RUN/ect/model.safetensors" --nfe "$NFE" --guidance "$GUIDANCE" \
    --scenes "$EVAL_SCENES" --out "$RUN/eval_nfe$NFE"
done
if [ "${PUBLISH:-0}" = 1 ]; then
  # the package's copy (float32 stored as float16) and its report, which tests/test_default_model.py reproduces
  $PY -m soundreactor.default_model "$RUN/ect/model.safetensors" --guidance "$GUIDANCE"
fi
