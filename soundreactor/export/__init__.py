"""ONNX export of the per-frame graphs (SPEC 5), their manifest, and the TensorRT-readiness check.

`manifest` and `check` import no torch, so the ONNX Runtime backend and `soundreactor check` run without it;
`graphs` and `exporter` need torch.
"""
