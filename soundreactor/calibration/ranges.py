"""Activation statistics per tensor, gathered frame by frame with ONNX Runtime's calibrators.

Each graph gets ORT's augmented copy (extra outputs for every input/output of the quantized op types) and sees
one frame's real inputs per `collect` call, so nothing from earlier frames (KV caches of tens of MB in the paper
preset) has to be kept. int8 gathers min/max (scale = max |x| / 127); fp8 gathers histograms, from which ORT's
float8 recipe takes the standard deviation (the only calibration ORT offers for float8).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, TensorsData, create_calibrator

from soundreactor.calibration.chain import Feeds

HISTOGRAM_BINS = 2048  # ORT's default for its float8 (Distribution) calibration; it requires >= 512


class OneFeed(CalibrationDataReader):
    def __init__(self, feeds: Feeds) -> None:
        self.pending: Iterator[Feeds] = iter([feeds])

    def get_next(self) -> Feeds | None:
        return next(self.pending, None)


class RangeCollector:
    """Statistics of every input/output of the `op_types` nodes of the graph at `path`, over the frames fed."""

    def __init__(
        self, path: Path, op_types: tuple[str, ...], method: CalibrationMethod, workdir: Path
    ) -> None:
        options = {"symmetric": True} if method == CalibrationMethod.MinMax else {"num_bins": HISTOGRAM_BINS}
        self.calibrator = create_calibrator(
            path,
            list(op_types),
            augmented_model_path=str(workdir / f"{path.stem}.augmented.onnx"),
            calibrate_method=method,
            use_external_data_format=True,
            extra_options=options,
        )
        self.frames = 0

    def collect(self, feeds: Feeds) -> None:
        # ORT's histogram collector prints a line per call; keep the CLI's output readable
        with contextlib.redirect_stdout(io.StringIO()):
            self.calibrator.collect_data(OneFeed(feeds))
        self.frames += 1

    def ranges(self) -> TensorsData:
        if not self.frames:
            raise ValueError("no frames were collected; feed at least one frame before asking for ranges")
        with contextlib.redirect_stdout(io.StringIO()):
            return self.calibrator.compute_data()


def summarize(ranges: TensorsData) -> dict[str, dict[str, float]]:
    """Per tensor, the statistics the scales come from, as plain floats (for manifests and comparisons)."""
    out = {}
    for name in sorted(ranges.data):
        data = ranges.data[name]
        keys = ("lowest", "highest") if hasattr(data, "lowest") else ("avg", "std")
        out[name] = {k: float(np.asarray(getattr(data, k)).reshape(())) for k in keys}
    return out
