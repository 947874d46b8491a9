"""TensorRT engines for an export directory: the KV-cache rewrite, the builder, the engine cache, the binding
plan and the ONNX Runtime vs TensorRT comparison.

TensorRT and cuda-python are imported lazily (`tensorrt_env`); `cache` and `bindings` are plain Python, so the
cache logic and the binding plan run and are tested without a GPU. Nothing here imports torch.
"""
