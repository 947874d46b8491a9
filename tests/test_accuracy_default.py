"""perf/accuracy_default.py end to end on one short scene (tiny preset, random weights, no calibration)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tolerance import module_depth, rounding_atol

from soundreactor.model.soundreactor import init_model
from soundreactor.training.evaluate import COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = {
    "ground truth",
    "torch fp32",
    "graph fp32",
    "graph bf16",
    "graph fp16",
    "graph bf16, fp32 VAE",
    "torch NFE 1",
    "torch NFE 2",
    "random weights",
    "onnxruntime fp32",
}


def load_script(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "perf"))  # the script imports perf/common.py
    spec = importlib.util.spec_from_file_location("accuracy_default", ROOT / "perf" / "accuracy_default.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "accuracy_default", script)
    spec.loader.exec_module(script)
    return script


def test_accuracy_report_on_one_short_scene(tmp_path, monkeypatch):
    script = load_script(monkeypatch)
    model = init_model("tiny", seed=5)[0]
    checkpoint = tmp_path / "tiny.safetensors"
    model.save(checkpoint)
    out = tmp_path / "results"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs; tiny graphs gain nothing from a thread pool on a busy box
    try:
        script.measure(checkpoint, out, scenes=1, frames=8, schemes=())
    finally:
        torch.set_num_threads(threads)

    report = json.loads((out / "default_model_accuracy.json").read_text())
    assert report["config"]["nfe"] == model.config.sampler.nfe and report["calibration"] == {}
    results = report["results"]
    assert set(results) == SYSTEMS
    for name, r in results.items():
        assert set(r["score"]) >= {key for key, _, _ in COLUMNS}, name
        assert (r["vs_reference"] is None) == (name == "ground truth"), name
    assert results["ground truth"]["score"]["onset_f1"] == 1.0  # scored against the clips it streamed

    assert len(results["graph bf16"]["vs_reference"]["per_frame_max_abs_rel_peak"]) == 8
    # fp32 through the CUDA-graph backend's buffers and through ONNX Runtime: the reference up to fp32 rounding,
    # bounded by depth x 16 ulp x peak (tests/tolerance.py; measured 6e-7 and 8e-7 on a peak of 1.1 here)
    reference = results["torch fp32"]["vs_reference"]
    assert reference["max_abs"] == 0.0 and reference["snr_db"] is None  # the reference against itself
    peak = np.array([reference["reference_peak"]])
    assert peak[0] > 0
    bound = rounding_atol(peak, module_depth(model), torch.float32)
    for name in ("graph fp32", "onnxruntime fp32"):
        assert results[name]["vs_reference"]["max_abs"] <= bound, (name, bound)
    # bf16 really ran in bf16 (its 8-bit mantissa leaves more than fp32 rounding), and the NFE changed the audio
    assert results["graph bf16"]["vs_reference"]["max_abs"] > bound
    assert results["torch NFE 1"]["vs_reference"]["max_abs"] > bound

    text = (out / "default_model_accuracy.md").read_text()
    for heading in (
        "## What a listener hears",
        "## Distance from the fp32 torch reference",
        "## Thresholds revisited",
    ):
        assert heading in text
    assert text.count("| graph bf16 |") == 2  # one row in each table
    assert (out / "default_model_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
