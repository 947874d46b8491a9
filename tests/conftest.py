import os

# Triton kernels run on CPU tensors through the interpreter; triton reads this when a kernel is defined, so it
# must be set before any test module imports a kernel.
os.environ["TRITON_INTERPRET"] = "1"
