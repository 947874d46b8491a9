"""perf/onset_errors.py: every unpaired detection lands in the class its distance to the true onsets names."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
F = 1 / 30  # one video frame, s


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("onset_errors", ROOT / "perf" / "onset_errors.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "onset_errors", script)
    spec.loader.exec_module(script)
    return script


def test_each_unpaired_detection_gets_its_class(monkeypatch) -> None:
    script = load_script(monkeypatch)
    reference = np.array([1.0, 2.0, 3.0, 5.0])
    detected = np.array(
        [
            0.007,  # start: the detector's second hop
            1.0 - 0.9 * F,  # doubled: 1.0 is paired with the next one, closer
            1.0 + 0.1 * F,  # paired
            2.0 + 1.2 * F,  # mistimed: beyond +-1 frame of 2.0, which nothing pairs with
            3.0 + 0.1 * F,  # paired
            3.0 + 2.5 * F,  # near: 2.5 frames after a paired onset
            4.0,  # isolated: 30 frames from every onset
        ]
    )
    counts, offsets, unheard = script.classify(reference, detected)
    assert dict(counts) == {"start": 1, "doubled": 1, "mistimed": 1, "near": 1, "isolated": 1}
    np.testing.assert_allclose(offsets[1:6], [-0.9, 0.1, 1.2, 0.1, 2.5], atol=1e-9)
    assert unheard == 1  # 5.0: no detection within 4 frames (2.0 has one, 1.2 frames late)
    report = script.breakdown([np.zeros((2, 1600 * 30))], [type("Clip", (), {"events": ()})()])
    assert report["onsets_true"] == 0 and report["onsets_detected"] == 0 and report["precision"] == 0.0
