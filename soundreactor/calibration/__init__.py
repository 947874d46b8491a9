"""INT8 and FP8 versions of the per-frame graphs as explicit Q/DQ, and a measured accuracy report.

TensorRT 11 has no implicit calibrator: precision comes from QuantizeLinear/DequantizeLinear pairs in the ONNX.
`calibrate` runs the fp32 export frame by frame over a calibration video (the demo scene by default), feeds each
chosen graph its real inputs (frames with the previous grid, ar_* with the real KV caches, sampler inputs, VAE
states), gathers per-tensor statistics, and writes a complete export directory with those graphs quantized
(int8 symmetric or FP8 E4M3; weights per output channel, activations per tensor, zero points 0). `report`
measures per component and end to end against fp32 on the same frames and noise.

Library: ONNX Runtime's quantization tools (`create_calibrator`, `QDQQuantizer`). They are part of the
onnxruntime package the project already depends on, run on the CPU, handle opset-23 graphs and FP8
(QFLOAT8E4M3FN), and their Q/DQ graphs also run on ORT's CPU provider, so the report runs everywhere.
NVIDIA ModelOpt (`nvidia-modelopt[onnx]` 0.47) was tried in a scratch venv: it installs and quantizes on CPU,
but it pins onnx 1.21 and onnxruntime-gpu 1.24 (the project has onnx 1.23 and the CPU onnxruntime, which must
not share an environment with onnxruntime-gpu) and pulls cupy-cuda12x, so it is not a dependency here.

Modules: `chain` (graphs stepped frame by frame, calibration frames), `ranges` (statistics), `quantize` (Q/DQ
graphs), `calibrate` (the quantized export directory), `metrics`, `report`, `commands` (`soundreactor calibrate`).
"""
