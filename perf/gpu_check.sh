#!/usr/bin/env bash
# The GPU check in one go, from the repo root on the GPU machine (its own python3, no network):
#
#     PYTHONPATH=. bash perf/gpu_check.sh [--quick] [--dry-run]
#
# 1. environment: nvidia-smi, Python / torch / triton / CUDA versions, which optional modules import;
# 2. the CUDA-graph backend tests, CUDA ones included, with --noconftest: tests/conftest.py turns on the Triton
#    interpreter, which the GPU runs must not use (set GPU_CHECK_TRITON_TESTS=1 to also run the Triton kernel
#    tests that way; most of them need the interpreter and skip);
# 3. the decode-attention kernel against the torch paths it replaces (perf/bench_kernels.py, a short sweep that
#    also records each method's error against the reference: the kernel's correctness check on a real GPU), and
#    the Snake kernel against its torch path over one VAE frame (perf/bench_snake.py, errors recorded too);
# 4. serving: a few paced streams through tritonserver against the same backend in process (perf/bench_serving.py,
#    cuda-graph backend, tiny preset); it skips when tritonserver or tritonclient is missing (put the
#    nvidia_pytriton, tritonclient, grpcio, python_rapidjson and geventhttpclient wheels in $GPU_CHECK_WHEELS);
# 5. the GPU perf suite, perf/bench_gpu.py, in what is left of a 6-minute budget.
# Everything lands in perf/results/gpu/: gpu_check.log, bench_gpu_<device>.json / .md, the PNG plots and the two
# kernel benchmarks; when the caller sets OUT to a folder (the device runner does), they go there as one archive,
# gpu_results.tgz, with the log and markdown reports beside it.
# Missing modules (pytest and its dependencies, safetensors) are unpacked from the wheels in $GPU_CHECK_WHEELS
# (default perf/wheels) when that folder exists. --dry-run runs the same steps on CPU with each benchmark's
# --dry-run (tiny shapes; the tests are left to CI), to check the script itself; GPU_CHECK_RESULTS moves the
# results folder.
set -uo pipefail

BUDGET_S=345 # of 360 s: the summary and the copy need a few seconds
RESULTS=${GPU_CHECK_RESULTS:-perf/results/gpu}
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
PYTHON=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
QUICK=()
DRY=()
for arg in "$@"; do
    case "$arg" in
    --quick) QUICK=(--quick) ;;
    --dry-run) DRY=(--dry-run) ;;
    *) echo "unknown argument $arg: use --quick and/or --dry-run" && exit 2 ;;
    esac
done
declare -A STATUS=([tests]=not-run [triton-tests]=not-run [kernels]=not-run [snake]=not-run [serving]=not-run
    [bench]=not-run)

section() { printf '\n=== %s (t = %d s)\n' "$1" "$SECONDS"; }
verdict() { if [[ $1 -eq 0 ]]; then echo pass; elif [[ $1 -eq 124 ]]; then echo timeout; else echo "FAIL ($1)"; fi; }

section environment
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "nvidia-smi not found"
nvidia-smi || true
echo "C compiler (Triton builds its launchers with it): $(command -v cc || command -v gcc || echo MISSING)"
WHEELS=${GPU_CHECK_WHEELS:-perf/wheels}
if [[ -d "$WHEELS" ]]; then
    SITE=$(mktemp -d)
    for wheel in "$WHEELS"/*.whl; do
        file=$(basename "$wheel")
        module=${file%%-*}
        if ! "$PYTHON" -c "import ${module,,}" 2>/dev/null; then
            "$PYTHON" -m zipfile -e "$wheel" "$SITE" && echo "unpacked $file: no ${module,,} here"
        fi
    done
    export PYTHONPATH="$PYTHONPATH:$SITE" # after the repo; only modules that were missing are in it
    chmod +x "$SITE"/pytriton/tritonserver/bin/* "$SITE"/pytriton/tritonserver/python_backend_stubs/*/* 2>/dev/null
fi
"$PYTHON" - <<'EOF'
import importlib, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
for name in ("triton", "numpy", "safetensors", "pytest", "matplotlib", "soundfile", "av"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except ImportError as err:
        print(f"{name} MISSING ({err})")
EOF
if ((${#DRY[@]} == 0)) && ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "CUDA is not available here: nothing to check (--dry-run runs the steps on CPU)"
    exit 1
fi

section "CUDA-graph backend tests (CPU ones too)"
if ((${#DRY[@]})); then
    echo "dry run: the tests are CI's"
elif "$PYTHON" -c "import pytest" 2>/dev/null; then
    timeout 150 "$PYTHON" -m pytest -q -rA -p no:cacheprovider --noconftest tests/test_cuda_graph_backend.py
    STATUS[tests]=$(verdict $?)
    if [[ "${GPU_CHECK_TRITON_TESTS:-0}" == 1 ]]; then
        section "Triton kernel tests without the interpreter"
        timeout 90 "$PYTHON" -m pytest -q -rA -p no:cacheprovider --noconftest tests/test_triton_kernels.py
        STATUS[triton-tests]=$(verdict $?)
    fi
else
    echo "pytest is missing and no wheel provides it: tests skipped (put pytest wheels in $WHEELS)"
fi

section "decode-attention kernel benchmark"
timeout 60 "$PYTHON" perf/bench_kernels.py --windows 64,480,960 --batches 1,16,64 --iters 10 --out "$RESULTS" "${DRY[@]}"
STATUS[kernels]=$(verdict $?)

section "Snake activation kernel benchmark"
timeout 40 "$PYTHON" perf/bench_snake.py --out "$RESULTS" "${DRY[@]}"
STATUS[snake]=$(verdict $?)

section "serving through tritonserver"
timeout 75 "$PYTHON" perf/bench_serving.py --device cuda --backend cuda-graph --streams 1,8 --seconds 2 \
    --out "$RESULTS" "${DRY[@]}"
STATUS[serving]=$(verdict $?)

section "GPU perf suite"
remaining=$((BUDGET_S - SECONDS))
if ((remaining < 150)); then # slow tests: a quick suite rather than none
    QUICK=(--quick)
    remaining=150
fi
# the suite starts no new measurement past --budget-s; the timeout is the hard stop (its JSON is kept up to date)
timeout "$remaining" "$PYTHON" perf/bench_gpu.py "${QUICK[@]}" "${DRY[@]}" --budget-s $((remaining - 45)) --out "$RESULTS"
STATUS[bench]=$(verdict $?)
if [[ "${STATUS[bench]}" == timeout ]]; then # cut short: markdown and plots from the JSON it kept
    for json in "$RESULTS"/bench_gpu_*.json; do
        [[ "$json" == *cpu-dry-run* ]] || "$PYTHON" perf/bench_gpu.py --replot "$json" >/dev/null
    done
fi

section summary
for step in tests triton-tests kernels snake serving bench; do
    printf '%-13s %s\n' "$step" "${STATUS[$step]}"
done
ls -l "$RESULTS"
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then # the runner returns at most 8 files: one archive, and the reports
    tar czf "$OUT/gpu_results.tgz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" &&
        cp "$RESULTS"/*.md "$RESULTS/gpu_check.log" "$OUT/" && echo "copied $RESULTS to $OUT (gpu_results.tgz)"
fi
[[ "${STATUS[tests]}" != FAIL* && "${STATUS[bench]}" == pass ]]
