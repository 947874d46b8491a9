#!/usr/bin/env bash
# The recipe of the built-in default model: the `small` preset trained on the built-in synthetic scenes,
# VAE (adversarial) -> diffusion pretraining (Algorithm 1) -> ECT (Algorithm 2), while the VAE's decoder goes on
# training alone on the frozen encoder -> that decoder swapped into the ECT model -> evaluation at NFE 4 and 1.
#
#   bash perf/train_default.sh [RUN_DIR]            # default runs/default; re-running resumes every stage
#   PUBLISH=1 bash perf/train_default.sh [RUN_DIR]  # then replace the package's default model and its report
#
# Step counts are the ones the published model was trained with on one 2-core CPU (one thread per process) and can
# be changed through the environment (VAE_STEPS, DECODER_STEPS, PRE_STEPS, ECT_STEPS); on a GPU every stage uses it
# (bf16 autocast). Each stage's run directory keeps its log, loss plot and resumable state; the VAE stages also keep
# eval.jsonl, their validation figures at every checkpoint, and best.safetensors, the checkpoint with the best
# validation `quality` (stages.vae_quality), which the later stages take.
set -euo pipefail
RUN=${1:-runs/default}
VAE_STEPS=${VAE_STEPS:-2600}
DECODER_STEPS=${DECODER_STEPS:-6000}
PRE_STEPS=${PRE_STEPS:-6000}
ECT_STEPS=${ECT_STEPS:-1600}
EVAL_SCENES=${EVAL_SCENES:-8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # on a busy 2-core box two threads made steps 5x slower
SR="${PYTHON:-python} -m soundreactor"  # PYTHON: the interpreter of the environment soundreactor is installed in
ADVERSARIAL=(--batch-size 4 --clip-frames 64 --crop-frames 4 --lr 1e-3 --ema-decay 0.99 --checkpoint-every 100
  --envelope-weight 4 --kl-weight 1e-5 --silence-share 0.1 --adv-weight 0.1 --fm-weight 5 --disc-lr 2e-4
  --disc-filters 16)

# 1. the VAE: perf/train_vae_adv.sh's recipe (calibrated init, a plain autoencoder until step 300, then the
#    multi-scale STFT discriminator; the KL ramp starts at step 4000, after this budget)
$SR train-vae --preset small --out-dir "$RUN/vae" --vae-init calibrated --steps "$VAE_STEPS" "${ADVERSARIAL[@]}" \
  --kl-warmup 8000 --adv-start 300
# 2. in the background, its decoder alone on the frozen encoder (the latents stages 3-4 learn stay valid), with a
#    fresh discriminator from step 0 and no posterior noise; on 2 cores it runs beside stages 3-4
$SR train-vae --init "$RUN/vae/best.safetensors" --out-dir "$RUN/decoder" --freeze-encoder \
  --steps "$DECODER_STEPS" "${ADVERSARIAL[@]}" --kl-warmup 1000000 --adv-start 0 > "$RUN/decoder.log" 2>&1 &
DECODER=$!
# 3. diffusion pretraining on 64-frame clips (the preset's 128-token window), latent_scale measured on the data
$SR train --stage pretrain --init "$RUN/vae/best.safetensors" --out-dir "$RUN/pretrain" \
  --grid-cache "$RUN/grids" --steps "$PRE_STEPS" --batch-size 8 --lr 1e-3 --ema-decay 0.995 \
  --dataset-size 2000 --checkpoint-every 250
# 4. Easy Consistency Tuning from the pretrained EMA weights; writes the NFE 1/2/4 step times
$SR train --stage ect --init "$RUN/pretrain/model.safetensors" --out-dir "$RUN/ect" \
  --grid-cache "$RUN/grids" --steps "$ECT_STEPS" --batch-size 8 --lr 3e-4 --ema-decay 0.995 \
  --dataset-size 2000 --ect-stage-steps $((ECT_STEPS / 4)) --checkpoint-every 200
wait "$DECODER" || { echo "the decoder stage failed: see $RUN/decoder.log" >&2; exit 1; }
# 5. the ECT model with the decoder stage's best decoder
${PYTHON:-python} -m soundreactor.training.swap_decoder "$RUN/ect/model.safetensors" \
  "$RUN/decoder/best.safetensors" "$RUN/model.safetensors"
# 6. held-out scenes through the streaming runtime: the model, ground truth, its VAE and random weights
for NFE in 4 1; do
  $SR evaluate --checkpoint "$RUN/model.safetensors" --nfe "$NFE" --scenes "$EVAL_SCENES" --out "$RUN/eval_nfe$NFE"
done
if [ "${PUBLISH:-0}" = 1 ]; then
  # the package's copy (float32 stored as float16) and its report, which tests/test_default_model.py reproduces
  ${PYTHON:-python} -m soundreactor.default_model "$RUN/model.safetensors"
fi
