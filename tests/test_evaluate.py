"""Evaluation: the onset detector and scores separate ground truth from silence, noise and constant firing."""

import argparse
import json

import numpy as np
import pytest
import torch

from soundreactor.training.evaluate import (
    FLOOR_DB,
    SAMPLE_RATE,
    add_evaluate_command,
    detect_onsets,
    evaluate_vae,
    held_out_clips,
    match_onsets,
    score,
)


@pytest.fixture(scope="module")
def clips():
    return held_out_clips(scenes=4, n_frames=90)


def test_detector_finds_tone_bursts_and_ignores_silence():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    audio = np.zeros(SAMPLE_RATE)
    starts = [0.2, 0.5, 0.8]
    for start in starts:  # decaying 440 Hz tones without a click: the rise is tonal only
        on = t >= start
        audio[on] += 0.3 * np.sin(2 * np.pi * 440 * (t[on] - start)) * np.exp(-(t[on] - start) / 0.03)
    found = detect_onsets(audio)
    assert len(found) == 3
    # One hop (5 ms) of time resolution.
    np.testing.assert_allclose(found, starts, atol=0.005)
    assert len(detect_onsets(np.zeros(SAMPLE_RATE))) == 0


def test_match_is_one_to_one_within_tolerance():
    assert match_onsets([1.0], [0.99, 1.01]) == 1
    assert match_onsets([1.0, 1.03], [1.01, 1.02]) == 2
    assert match_onsets([1.0], [1.04]) == 0
    assert match_onsets([], [1.0]) == 0


def test_ground_truth_scores_high(clips):
    figures = score([c.audio for c in clips], clips)
    assert figures["onsets_true"] >= 20
    assert figures["onset_precision"] > 0.9 and figures["onset_recall"] > 0.9
    assert figures["pan_corr"] > 0.8
    assert figures["loudness_error_db"] == 0 and figures["logmel_distance_db"] == 0


def test_silence_and_steady_noise_score_low(clips):
    silent = score([np.zeros_like(c.audio) for c in clips], clips)
    assert silent["onsets_detected"] == 0
    assert silent["onset_precision"] == silent["onset_recall"] == silent["onset_f1"] == 0
    assert silent["pan_corr"] is None and silent["envelope_corr"] is None
    rng = np.random.default_rng(0)
    noise = score([0.1 * rng.standard_normal(c.audio.shape) for c in clips], clips)
    assert noise["onset_recall"] < 0.2 and noise["onset_f1"] < 0.2
    assert noise["onsets_detected"] < noise["onsets_true"] / 2
    assert abs(noise["pan_corr"]) < 0.5


def test_output_firing_every_frame_does_not_score_high_precision(clips):
    clicks = []
    for c in clips:
        audio = np.zeros_like(c.audio)
        audio[:, ::1600] = 0.5  # a click at every video frame
        clicks.append(audio)
    figures = score(clicks, clips)
    assert figures["onset_recall"] > 0.9  # every impact has a click within a frame ...
    assert figures["onset_precision"] < 0.4 and figures["onset_f1"] < 0.5  # ... but most clicks are false


class _Codec(torch.nn.Module):
    """A stand-in VAE with the AudioVAE interface: identity (keeps everything) or silent (keeps nothing)."""

    def __init__(self, silent: bool):
        super().__init__()
        self.silent = silent
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def encode(self, audio):
        return audio

    def decode(self, latents):
        return latents * 0 if self.silent else latents


def test_evaluate_vae_scores_what_the_codec_keeps(clips):
    kept = evaluate_vae(_Codec(silent=False), clips)
    assert kept["reconstruction"] == kept["ground_truth"]
    lost = evaluate_vae(_Codec(silent=True), clips)
    assert lost["reconstruction"]["onset_f1"] == 0 and lost["reconstruction"]["envelope_corr"] is None

    from soundreactor.config import preset
    from soundreactor.model.vae import AudioVAE

    torch.manual_seed(0)
    vae = AudioVAE(preset("tiny").vae).train()
    figures = evaluate_vae(vae, clips[:1])["reconstruction"]
    assert vae.training  # the caller's mode is restored
    assert 0 <= figures["onset_f1"] <= 1 and figures["onsets_true"] == len(
        {e.sample for e in clips[0].events}
    )


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_evaluate_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["evaluate", *argv])


def test_evaluate_command_writes_json_markdown_and_png(tmp_path):
    from soundreactor.model.soundreactor import init_model

    checkpoint = tmp_path / "tiny.safetensors"
    init_model("tiny", seed=5)[0].save(checkpoint)
    args = _parse(["--checkpoint", str(checkpoint), "--scenes", "2", "--frames", "12", "--nfe", "1"])
    args.out = str(tmp_path / "eval")
    args.func(args)
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert set(report["results"]) == {"ground_truth", "model", "random", "vae_reconstruction"}
    assert report["config"]["nfe"] == 1 and report["config"]["scenes"] == 2
    assert report["results"]["ground_truth"]["onset_f1"] == 1.0
    assert "| ground_truth |" in (tmp_path / "eval" / "evaluation.md").read_text()
    assert (tmp_path / "eval" / "evaluation.png").read_bytes()[:4] == b"\x89PNG"

    args = _parse(["--random", "--scenes", "1", "--frames", "8", "--out", str(tmp_path / "rand")])
    args.func(args)
    report = json.loads((tmp_path / "rand" / "evaluation.json").read_text())
    assert set(report["results"]) == {"ground_truth", "random"}


def test_evaluate_command_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        _parse(["--scenes", "2"])  # neither --checkpoint nor --random
    with pytest.raises(SystemExit):
        _parse(["--random", "--hw", "56by112"])
    args = _parse(["--random", "--scenes", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--scenes and --frames must be at least 1"):
        args.func(args)
    args = _parse(["--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError):
        args.func(args)


def _hand_made(levels: dict[int, float], frames: int, impacts: list[int]):
    """A Clip whose frame k holds a constant `levels[k]` (0 elsewhere) on both channels, impacts at `impacts`."""
    from soundreactor.training.synthetic import Clip, Event

    audio = np.zeros((2, frames * 1600), np.float32)
    for k, level in levels.items():
        audio[:, k * 1600 : (k + 1) * 1600] = level
    events = tuple(Event(f, f * 1600, 0.5, 0.5, "wall", 0.1, 1.0, "wood") for f in impacts)
    return Clip(np.zeros((frames, 16, 16, 3), np.uint8), audio, events)


def test_impact_gap_and_silence_level_on_hand_made_signals():
    from soundreactor.training.evaluate import score

    impacts = [2, 12]  # frames 6-8 and 16-19 are >= 4 from both; 0, 18 and 19 stay digitally silent
    truth_levels = {
        2: 0.1,
        12: 0.1,
        **{k: 0.01 for k in (1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17)},
    }
    truth = _hand_made(truth_levels, 20, impacts)
    # between-impact frames 6, 7, 8, 16, 17 at 0.01 (-40 dB), 18, 19 at 0: median -40 dB; impacts at -20 dB
    same = score([truth.audio], [truth])
    assert same["impact_gap_db"] == pytest.approx(20.0)
    assert same["gap_ratio"] == pytest.approx(1.0)
    assert same["silence_dbfs"] == FLOOR_DB  # silent where the truth is silent: the floor
    # a candidate whose bed sits at 0.0316 (-30 dB) keeps half the contrast, with 1e-4 (-80 dBFS) in the silence
    bed = {k: 10**-1.5 for k in truth_levels if k not in impacts}
    candidate = _hand_made({**bed, 2: 0.1, 12: 0.1, 0: 1e-4, 18: 1e-4, 19: 1e-4}, 20, impacts)
    figures = score([candidate.audio], [truth])
    assert figures["impact_gap_db"] == pytest.approx(10.0, abs=1e-4)
    assert figures["gap_ratio"] == pytest.approx(0.5, abs=1e-5)
    assert figures["silence_dbfs"] == pytest.approx(-80.0, abs=1e-4)
    # a steady bed as loud as the impacts has no gap at all
    steady = _hand_made({k: 0.1 for k in range(20)}, 20, impacts)
    assert score([steady.audio], [truth])["gap_ratio"] == pytest.approx(0.0, abs=1e-9)
    assert score([steady.audio], [truth])["silence_dbfs"] == pytest.approx(-20.0, abs=1e-4)
