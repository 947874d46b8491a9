"""perf/vision_probe.py: its labels and its rank-sum AUC."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_labels_and_auc(monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("vision_probe", ROOT / "perf" / "vision_probe.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "vision_probe", script)
    spec.loader.exec_module(script)
    clip = SimpleNamespace(events=[SimpleNamespace(frame=f) for f in (5, 6, 40, 64)])
    y = script.labels(clip).numpy()  # frames 2 .. 63
    assert len(y) == script.FRAMES - 2
    impact = {i + 2 for i in np.flatnonzero(y == script.IMPACT)}
    before = {i + 2 for i in np.flatnonzero(y == script.BEFORE)}
    # frame 5 shows an impact (not "before" 6's); frame 64 is past the clip, its frame before (63) is in it
    assert impact == {5, 6, 40} and before == {4, 39, 63}
    positive = np.array([True, False, True, False])
    assert script.auc(positive, np.array([0.9, 0.1, 0.8, 0.2])) == 1.0
    assert script.auc(positive, np.array([0.1, 0.9, 0.2, 0.8])) == 0.0
    assert (
        script.auc(positive, np.array([0.9, 0.5, 0.1, 0.6])) == 0.5
    )  # pairs won: (0.9 > both), (0.1 > none)
