import os

import torch

from soundreactor.threads import available_cores

# Triton kernels run on CPU tensors through the interpreter; triton reads this when a kernel is defined, so it
# must be set before any test module imports a kernel.
# On a GPU machine the kernels run for real (perf/gpu_check.sh), so only CPU-only runs interpret.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# pytest-xdist workers share the cores: each runs torch, ONNX Runtime and the processes it starts on its share
# (2 workers with 2-thread OpenMP pools on 2 cores spin against each other at every op).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    share = max(1, available_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(share)
    torch.set_num_threads(share)
