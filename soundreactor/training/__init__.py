"""Training: data (synthetic and folder datasets, DINOv2 grid cache), training stages and evaluation.

Sits above model/ and runtime/; nothing below imports it. Submodules import torch, so import them directly.
"""
