import os

import torch

# Triton kernels run on CPU tensors through the interpreter; triton reads this when a kernel is defined, so it
# must be set before any test module imports a kernel.
# On a GPU machine the kernels run for real (perf/gpu_check.sh), so only CPU-only runs interpret.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
