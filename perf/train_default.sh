#!/usr/bin/env bash
# The recipe of the built-in default model: the `small` preset trained on the built-in synthetic scenes,
# VAE (adversarial) -> diffusion pretraining (Algorithm 1) -> ECT (Algorithm 2) -> guidance chosen on validation
# scenes -> evaluation on held-out scenes at NFE 4 and 1.
#
#   bash perf/train_default.sh [RUN_DIR]            # default runs/default; re-running resumes every stage
#   PUBLISH=1 bash perf/train_default.sh [RUN_DIR]  # then replace the package's default model and its report
#
# Step counts are the ones round 2 of the default model was trained with on one 2-core CPU (one thread per process) and can
# be changed through the environment (VAE_STEPS, PRE_STEPS, ECT_STEPS, DATASET_SIZE); on a GPU every stage uses it (bf16
# autocast). Each stage's run directory keeps its log, loss plot and resumable state; the VAE's also keeps
# eval.jsonl, its validation figures at every checkpoint, and best.safetensors, the checkpoint with the best
# validation `quality` (stages.vae_quality), which the later stages take. perf/results/default_model_round2.md has the
# wall times.
set -euo pipefail
RUN=${1:-runs/default}
export VAE_STEPS=${VAE_STEPS:-2600}
PRE_STEPS=${PRE_STEPS:-22000}
export DATASET_SIZE=${DATASET_SIZE:-2000}  # synthetic training scenes, for pretraining and ECT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # on a busy 2-core box two threads made steps 5x slower
PY=${PYTHON:-python}  # the interpreter of the environment soundreactor is installed in
HERE=$(dirname "$0")

# 1. the VAE: perf/train_vae_adv.sh (calibrated init, a plain autoencoder until step 300, then the multi-scale
#    STFT discriminator; its KL ramp would start at step 4000, after this budget)
bash "$HERE/train_vae_adv.sh" "$RUN/vae"
# 2. diffusion pretraining on 64-frame clips (the preset's 128-token window), latent_scale measured on the data, on
#    NPROC DDP ranks of one thread each: the global batch of 8 split over them, the same run as one process
#    (tests/test_training.py), in about half the time on 2 idle cores
$PY -m torch.distributed.run --nproc-per-node "${NPROC:-2}" -m soundreactor train --stage pretrain \
  --init "$RUN/vae/best.safetensors" --out-dir "$RUN/pretrain" --grid-cache "$RUN/grids" --steps "$PRE_STEPS" \
  --batch-size 8 --lr 1e-3 --ema-decay 0.995 --dataset-size "$DATASET_SIZE" --checkpoint-every 250
# 3. ECT, the guidance on validation scenes (4.5 for round 2), held-out evaluation, PUBLISH=1
bash "$HERE/finish_default.sh" "$RUN"
