"""Names the `calibrate` command offers, importable without onnx (the CLI's parser must build without it)."""

DEFAULT_COMPONENTS = ("vision", "ar_audio", "ar_vision", "sampler")
SCHEME_NAMES = ("fp8", "int8")  # the keys of quantize.SCHEMES (tests/test_calibration.py keeps them equal)
