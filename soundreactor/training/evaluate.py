"""`soundreactor evaluate`: how well generated audio follows held-out synthetic scenes, and `evaluate_vae`.

Audio is generated through the streaming runtime (`Session` over `TorchStreams`, one frame at a time), exactly as a
product runs it, and scored against each scene's true impacts and reference audio:
- onsets: precision, recall and F1 of `detect_onsets` against the true impact times, matched one-to-one within
  +-1 video frame (33.3 ms), pooled over scenes (no detections gives precision 0; always read P and R with F1);
- pan: Pearson correlation of the left/right energy balance (E_R - E_L) / (E_R + E_L) in the 50 ms after each
  true impact with the impact's horizontal position x;
- loudness: mean absolute difference in dB of the energy in the 100 ms after each true impact, candidate vs reference;
- log-mel distance: mean absolute difference in dB of 64-band log-mel spectrograms (HTK mel scale), per channel;
- envelope: Pearson correlation of the 10 ms log-energy envelopes, averaged over scenes;
- what a listener hears between impacts: the impact gap, the median energy (dB) of the video frames where impacts
  start minus the median energy of the frames at least GAP_MIN_FRAMES from every impact (pooled over scenes), and
  its ratio to the reference's gap (1 keeps the contrast, 0 is a steady bed);
- silence: the level (dBFS, mean square of both channels; a full-scale square wave is 0 dBFS) of the candidate over
  the frames where the reference is digitally silent (every sample 0).
The same figures for the reference audio itself (ceiling) and for random weights (floor) share the report.
Only argparse is imported at module level: the CLI stays light.
"""

from __future__ import annotations

import argparse
import itertools

from soundreactor.threads import add_threads_argument, set_torch_threads

SAMPLE_RATE = 48000
FPS = 30
TOLERANCE_S = 1 / FPS  # +-1 video frame
EVAL_SEED = 999_983  # training draws SyntheticAV(seed, i) from small seeds: this stream is held out
VALIDATION_SEED = 999_979  # scenes that choose among checkpoints (early stopping): held out, never reported
FLOOR_DB = -100.0  # energies are floored here (1e-10) before taking logs, so silence is finite
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS
GAP_MIN_FRAMES = 4  # "between impacts": frames at least this many frames from every impact's first frame

# Onset detector: band-wise log-energy flux (Klapuri 1999; the lagged maximum of SuperFlux, Boeck & Widmer 2013).
ONSET_N_FFT = 1024  # 21 ms Hann window
ONSET_HOP = 240  # 5 ms
ONSET_BANDS = 24  # log-spaced from 100 Hz to 16 kHz, each at least 2 FFT bins wide
ONSET_LAG = 2  # a band's rise is measured against its maximum over the previous 2 hops
ONSET_THRESHOLD_DB = 3.0  # onset when the mean rise over bands reaches 3 dB ...
ONSET_MIN_GAP_S = 0.025  # ... and is the largest within 25 ms (closer onsets merge: under one video frame)


def _db(energy):
    import numpy as np

    return 10 * np.log10(np.maximum(energy, 10 ** (FLOOR_DB / 10)))


def _band_edges(n_fft: int, bands: int, low_hz: float, high_hz: float) -> list[int]:
    import numpy as np

    hz_per_bin = SAMPLE_RATE / n_fft
    edges = [round(low_hz / hz_per_bin)]
    for e in np.geomspace(low_hz, high_hz, bands + 1)[1:] / hz_per_bin:
        edges.append(max(round(e), edges[-1] + 2))
    return edges


def onset_strength(audio):
    """Band-wise log-energy flux of float audio [2, N] or [N] at 48 kHz -> (flux [F] in dB, frame times [F] s).

    Frame t's window ends at sample (t + 1) * ONSET_HOP, so an onset first enters it in its newest hop; its time is
    that hop's centre. flux[t] = mean over bands of max(0, L[b, t] - max(L[b, t-LAG .. t-1])), L the band energy
    in dB (floored at FLOOR_DB, so silence and dither give no flux).
    """
    import numpy as np

    mono = np.asarray(audio, np.float64)
    mono = mono.mean(0) if mono.ndim == 2 else mono
    padded = np.concatenate([np.zeros(ONSET_N_FFT - ONSET_HOP), mono])
    frames = np.lib.stride_tricks.sliding_window_view(padded, ONSET_N_FFT)[::ONSET_HOP]
    window = np.hanning(ONSET_N_FFT)
    power = (
        np.abs(np.fft.rfft(frames * window, axis=1)) ** 2 / (window.sum() / 2) ** 2
    )  # full-scale sine: 0 dB
    edges = _band_edges(ONSET_N_FFT, ONSET_BANDS, 100.0, 16000.0)
    level = _db(np.stack([power[:, a:b].mean(1) for a, b in itertools.pairwise(edges)], 1))
    previous = np.full_like(level, FLOOR_DB)
    for lag in range(1, ONSET_LAG + 1):
        previous[lag:] = np.maximum(previous[lag:], level[:-lag])
    flux = np.maximum(level - previous, 0).mean(1)
    times = (np.arange(len(flux)) * ONSET_HOP + ONSET_HOP / 2) / SAMPLE_RATE
    return flux, times


def detect_onsets(audio):
    """Onset times in seconds (float64 [K], ascending) of float audio [2, N] or [N] at 48 kHz.

    Peaks of `onset_strength` at least ONSET_THRESHOLD_DB high and the largest within ONSET_MIN_GAP_S; fixed
    parameters, chosen from the detector's physics (window, hop, a 3 dB rise), not fitted to any model's output.
    """
    import numpy as np

    flux, times = onset_strength(audio)
    radius = round(ONSET_MIN_GAP_S * SAMPLE_RATE / ONSET_HOP)
    padded = np.pad(flux, radius)
    local_max = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1).max(1)
    onsets: list[float] = []
    for t in np.flatnonzero((flux >= ONSET_THRESHOLD_DB) & (flux >= local_max)):
        if not onsets or times[t] - onsets[-1] >= ONSET_MIN_GAP_S:  # a plateau peaks once
            onsets.append(float(times[t]))
    return np.array(onsets)


def onset_pairs(reference, estimated, tolerance: float = TOLERANCE_S) -> list[tuple[int, int]]:
    """One-to-one (reference index, estimate index) pairs within `tolerance` seconds, closest pairs first."""
    import numpy as np

    reference, estimated = np.asarray(reference), np.asarray(estimated)
    distance = np.abs(reference[:, None] - estimated[None, :])
    used_r, used_e, pairs = set(), set(), []
    for flat in np.argsort(distance, axis=None, kind="stable"):
        r, e = divmod(int(flat), len(estimated))
        if distance[r, e] > tolerance:
            break
        if r not in used_r and e not in used_e:
            used_r.add(r)
            used_e.add(e)
            pairs.append((r, e))
    return pairs


def match_onsets(reference, estimated, tolerance: float = TOLERANCE_S) -> int:
    """Number of one-to-one pairs (reference, estimate) within `tolerance` seconds, closest pairs first."""
    return len(onset_pairs(reference, estimated, tolerance))


def _mel_filters(n_fft: int, n_mels: int, low_hz: float, high_hz: float):
    """[n_mels, n_fft // 2 + 1] triangular filters on the HTK mel scale, mel = 2595 log10(1 + f / 700)."""
    import numpy as np

    mel = np.linspace(*(2595 * np.log10(1 + np.array([low_hz, high_hz]) / 700)), n_mels + 2)
    hz = 700 * (10 ** (mel / 2595) - 1)
    bins = np.fft.rfftfreq(n_fft, 1 / SAMPLE_RATE)
    rising = (bins[None] - hz[:-2, None]) / (hz[1:-1, None] - hz[:-2, None])
    falling = (hz[2:, None] - bins[None]) / (hz[2:, None] - hz[1:-1, None])
    return np.maximum(0, np.minimum(rising, falling))


def log_mel(audio, n_fft: int = 2048, hop: int = 480, n_mels: int = 64):
    """float audio [C, N] at 48 kHz -> log-mel power in dB [C, n_mels, frames] (40 Hz - 20 kHz, 10 ms hop)."""
    import numpy as np

    audio = np.asarray(audio, np.float64)
    padded = np.pad(audio, ((0, 0), (n_fft // 2, n_fft // 2)))
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=1)[:, ::hop]
    window = np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2 / (window.sum() / 2) ** 2
    return _db(np.einsum("mf,ctf->cmt", _mel_filters(n_fft, n_mels, 40.0, 20000.0), power))


def _pearson(a, b) -> float | None:
    """Pearson correlation, None when either side is constant (undefined) or has fewer than 2 values."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def score(audios, clips) -> dict:
    """Figures (module docstring) of candidate audios [2, T*1600] against the clips' events and audio.

    Returns a JSON-ready dict: onset_precision, onset_recall, onset_f1, onsets_true, onsets_detected,
    pan_corr, loudness_error_db, logmel_distance_db, envelope_corr, impact_gap_db, gap_ratio, silence_dbfs (None
    where undefined, e.g. envelope_corr for silence or silence_dbfs where the reference is never silent).
    """
    import numpy as np

    pan_window, loud_window = SAMPLE_RATE // 20, SAMPLE_RATE // 10
    n_true = n_detected = matched = 0
    balance, xs, loud_errors, mel_distances, envelope_corrs = [], [], [], [], []
    at_impact, between, ref_at_impact, ref_between, silent_energy = [], [], [], [], []
    for audio, clip in zip(audios, clips, strict=True):
        audio = np.asarray(audio, np.float64)
        if audio.shape != clip.audio.shape:
            raise ValueError(
                f"candidate audio {list(audio.shape)} must match the clip's {list(clip.audio.shape)}"
            )
        # Simultaneous impacts (a shape hitting a corner, say) are one onset.
        reference = np.unique([e.sample for e in clip.events]) / SAMPLE_RATE
        detected = detect_onsets(audio)
        n_true, n_detected = n_true + len(reference), n_detected + len(detected)
        matched += match_onsets(reference, detected)
        for e in clip.events:
            left, right = (audio[:, e.sample : e.sample + pan_window] ** 2).sum(1)
            balance.append((right - left) / (right + left) if right + left > 0 else 0.0)
            xs.append(e.x)
            level = _db((audio[:, e.sample : e.sample + loud_window] ** 2).sum(0).mean())
            ref_level = _db(
                (clip.audio[:, e.sample : e.sample + loud_window].astype(np.float64) ** 2).sum(0).mean()
            )
            loud_errors.append(abs(level - ref_level))
        mel_distances.append(float(np.abs(log_mel(audio) - log_mel(clip.audio)).mean()))
        envelope_corrs.append(_pearson(_envelope_db(audio), _envelope_db(clip.audio)))
        impacts, quiet = impact_frames(clip)
        energy, ref_energy = frame_energy(audio), frame_energy(clip.audio)
        at_impact.append(energy[impacts])
        between.append(energy[quiet])
        ref_at_impact.append(ref_energy[impacts])
        ref_between.append(ref_energy[quiet])
        silent_energy.append(energy[digitally_silent(clip.audio)])
    gap, ref_gap = impact_gap_db(at_impact, between), impact_gap_db(ref_at_impact, ref_between)
    silent = np.concatenate(silent_energy)
    precision = matched / n_detected if n_detected else 0.0
    recall = matched / n_true if n_true else 0.0
    defined = [c for c in envelope_corrs if c is not None]
    return {
        "onset_precision": precision,
        "onset_recall": recall,
        "onset_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "onsets_true": n_true,
        "onsets_detected": n_detected,
        "pan_corr": _pearson(balance, xs),
        "loudness_error_db": float(np.mean(loud_errors)) if loud_errors else None,
        "logmel_distance_db": float(np.mean(mel_distances)),
        "envelope_corr": float(np.mean(defined)) if defined else None,
        "impact_gap_db": gap,
        "gap_ratio": gap / ref_gap if gap is not None and ref_gap is not None and ref_gap > 0 else None,
        "silence_dbfs": float(_db(silent.mean())) if len(silent) else None,
    }


def frame_energy(audio):
    """Mean square of both channels per video frame (1600 samples): float64 [T]."""
    import numpy as np

    audio = np.asarray(audio, np.float64)
    frames = audio.shape[1] // SAMPLES_PER_FRAME
    return (audio[:, : frames * SAMPLES_PER_FRAME] ** 2).reshape(audio.shape[0], frames, -1).mean((0, 2))


def impact_frames(clip):
    """(frames where an impact starts, frames at least GAP_MIN_FRAMES from every one): int arrays."""
    import numpy as np

    frames = len(clip.audio[0]) // SAMPLES_PER_FRAME
    impacts = np.unique([e.sample // SAMPLES_PER_FRAME for e in clip.events]).astype(int)
    if not len(impacts):
        return impacts, np.arange(frames)
    distance = np.abs(np.arange(frames)[:, None] - impacts[None, :]).min(1)
    return impacts, np.flatnonzero(distance >= GAP_MIN_FRAMES)


def digitally_silent(audio):
    """Frames of `audio` [C, N] in which every sample is exactly 0: bool [T]."""
    import numpy as np

    audio = np.asarray(audio)
    frames = audio.shape[1] // SAMPLES_PER_FRAME
    return ~(audio[:, : frames * SAMPLES_PER_FRAME] != 0).reshape(audio.shape[0], frames, -1).any((0, 2))


def impact_gap_db(at_impact, between) -> float | None:
    """Median dB energy of impact frames minus that of between-impact frames, both pooled over scenes (lists of
    energy arrays); None where either set is empty."""
    import numpy as np

    at_impact, between = np.concatenate(at_impact), np.concatenate(between)
    if not len(at_impact) or not len(between):
        return None
    return float(np.median(_db(at_impact)) - np.median(_db(between)))


def _envelope_db(audio, hop: int = 480):
    """Energy of both channels in consecutive 10 ms blocks, in dB: float [N // hop]."""
    import numpy as np

    audio = np.asarray(audio, np.float64)
    blocks = audio[:, : audio.shape[1] // hop * hop].reshape(audio.shape[0], -1, hop)
    return _db((blocks**2).sum(0).mean(1))


def held_out_clips(
    scenes: int, n_frames: int, seed: int = EVAL_SEED, hw: tuple[int, int] = (56, 112)
) -> list:
    """The evaluation scenes: SyntheticAV(seed) items 0 .. scenes-1."""
    from soundreactor.training.synthetic import SyntheticAV

    data = SyntheticAV(seed, scenes, n_frames, hw)
    return [data[i] for i in range(scenes)]


def stream_audio(model, frames, seed: int = 0):
    """Audio float32 [2, T*1600] of a SoundReactor through Session + TorchStreams, one frame at a time."""
    import numpy as np

    from soundreactor.runtime.session import Session
    from soundreactor.runtime.torch_backend import TorchStreams

    session = Session(TorchStreams(model, seed=seed))
    return np.concatenate([session.step(frame) for frame in frames], axis=1)


def reconstruct(vae, audio):
    """encode + decode float audio [2, N] (N a multiple of the hop) with an AudioVAE -> float32 [2, N]."""
    import torch

    param = next(vae.parameters())
    with torch.no_grad():
        x = torch.as_tensor(audio, dtype=param.dtype, device=param.device)[None]
        return vae.decode(vae.encode(x))[0].float().cpu().numpy()


def evaluate_vae(vae, clips=None, scenes: int = 4, n_frames: int = 90, seed: int = EVAL_SEED) -> dict:
    """Onset and envelope figures of an AudioVAE's reconstructions of held-out synthetic clips.

    A VAE is judged by what it keeps, not by its loss (a collapsed VAE can reach a low STFT loss). Returns
    {"reconstruction": score(...), "ground_truth": score(...)}; clips default to `held_out_clips`.
    """
    from tqdm import tqdm

    clips = clips if clips is not None else held_out_clips(scenes, n_frames, seed)
    was_training = vae.training
    vae.eval()
    try:
        recon = [reconstruct(vae, c.audio) for c in tqdm(clips, desc="VAE reconstructions", leave=False)]
    finally:
        vae.train(was_training)
    return {"reconstruction": score(recon, clips), "ground_truth": score([c.audio for c in clips], clips)}


COLUMNS = (
    ("onset_f1", "onset F1", "{:.3f}"),
    ("onset_precision", "precision", "{:.3f}"),
    ("onset_recall", "recall", "{:.3f}"),
    ("onsets_detected", "detected", "{}"),
    ("pan_corr", "pan corr", "{:.3f}"),
    ("loudness_error_db", "loudness err (dB)", "{:.2f}"),
    ("logmel_distance_db", "log-mel dist (dB)", "{:.2f}"),
    ("envelope_corr", "envelope corr", "{:.3f}"),
    ("impact_gap_db", "impact gap (dB)", "{:.1f}"),
    ("gap_ratio", "gap / truth's", "{:.2f}"),
    ("silence_dbfs", "in silence (dBFS)", "{:.1f}"),
)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else spec.format(value)


def silence_summary(figures: dict, truth: dict) -> str:
    """One line on what a listener hears between impacts and in silence, `figures` against the truth's `score`."""
    return (
        f"between impacts: impacts stand {_fmt(figures['impact_gap_db'], '{:.1f}')} dB above the rest "
        f"(the scene's own audio: {_fmt(truth['impact_gap_db'], '{:.1f}')} dB, ratio "
        f"{_fmt(figures['gap_ratio'], '{:.2f}')}); where the scene is silent: "
        f"{_fmt(figures['silence_dbfs'], '{:.1f}')} dBFS"
    )


def markdown(report: dict) -> str:
    """The report's results as a markdown table, one row per system."""
    cfg = report["config"]
    lines = [
        f"# Evaluation: {cfg['scenes']} held-out synthetic scenes x {cfg['frames']} frames (seed {cfg['seed']})",
        "",
        f"Model: {cfg['model']}; {report['results']['ground_truth']['onsets_true']} true onsets; onsets match "
        "within +-1 frame (33 ms). Impact gap: median frame energy at impacts minus between them (frames "
        f">= {GAP_MIN_FRAMES} from an impact); in silence: the level where the ground truth is digitally silent.",
        "",
        "| system | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for name, figures in report["results"].items():
        cells = ["n/a" if figures.get(k) is None else fmt.format(figures[k]) for k, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path, clip, audios: dict) -> None:
    """PNG: a log-mel spectrogram per system for one clip, true impacts as dashed lines, detections as ticks."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(audios), 1, figsize=(10, 2.2 * len(audios)), sharex=True, squeeze=False)
    seconds = clip.audio.shape[1] / SAMPLE_RATE
    for ax, (name, audio) in zip(axes[:, 0], audios.items(), strict=True):
        mel = log_mel(audio).mean(0)
        ax.imshow(mel, origin="lower", aspect="auto", extent=(0, seconds, 0, mel.shape[0]), vmin=-100, vmax=0)
        for e in clip.events:
            ax.axvline(e.sample / SAMPLE_RATE, color="white", linestyle="--", linewidth=0.8)
        onsets = detect_onsets(audio)
        ax.plot(onsets, np.full(len(onsets), mel.shape[0] - 2), "rv", markersize=5)
        ax.set_ylabel(f"{name}\nmel band")
    axes[0, 0].set_title("log-mel (dB); dashed: true impacts; red: detected onsets")
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_evaluation(
    model,
    random_model,
    clips,
    out_dir,
    seed: int = 0,
    description: str = "",
) -> dict:
    """Score `model` (None for none), ground truth, the model's VAE on ground truth and `random_model`; write
    evaluation.json, evaluation.md and evaluation.png under out_dir. Returns the report dict."""
    import json
    from pathlib import Path

    from tqdm import tqdm

    from soundreactor import files

    audios = {"ground_truth": [c.audio for c in clips]}
    systems = {"model": model, "random": random_model}
    for name, m in systems.items():
        if m is not None:
            audios[name] = [
                stream_audio(m, c.frames, seed + i)
                for i, c in enumerate(tqdm(clips, desc=f"streaming {name}"))
            ]
    if model is not None:
        audios["vae_reconstruction"] = [reconstruct(model.vae, c.audio) for c in clips]
    first = model if model is not None else random_model
    report = {
        "config": {
            "scenes": len(clips),
            "frames": len(clips[0].frames),
            "seed": seed,
            "model": description,
            "nfe": first.config.sampler.nfe,
            "guidance": first.config.sampler.guidance,
            "tolerance_s": TOLERANCE_S,
        },
        "results": {name: score(a, clips) for name, a in audios.items()},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(out / "evaluation.json", json.dumps(report, indent=2) + "\n")
    files.write_text(out / "evaluation.md", markdown(report))
    plot(out / "evaluation.png", clips[0], {name: a[0] for name, a in audios.items()})
    return report


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch

    from soundreactor.model.soundreactor import SoundReactor, init_model

    if args.scenes < 1 or args.frames < 1:
        raise ValueError(f"--scenes and --frames must be at least 1, got {args.scenes} and {args.frames}")
    clips = held_out_clips(args.scenes, args.frames, args.seed, args.hw)
    if args.checkpoint:
        model = SoundReactor.load(args.checkpoint, input_hw=args.hw)
        description = f"checkpoint {args.checkpoint}"
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            random_model = SoundReactor(model.config, args.hw).eval()
    else:
        model, description = None, f"random weights, {args.preset} preset"
        random_model = init_model(args.preset, seed=args.seed, input_hw=args.hw)[0]
    for m in (model, random_model):
        if m is not None:
            m.configure_sampling(nfe=args.nfe, guidance=args.guidance)
    set_torch_threads(random_model.config.parameter_estimate(), args.threads)
    report = run_evaluation(model, random_model, clips, args.out, args.seed, description)
    print(markdown(report))
    print(f"wrote {Path(args.out) / 'evaluation.json'}, evaluation.md and evaluation.png")


def add_evaluate_command(sub) -> None:
    """Register `soundreactor evaluate` on an argparse subparsers object."""
    from soundreactor.export.commands import frame_size  # numpy only, as the CLI already loads

    p = sub.add_parser(
        "evaluate",
        help="score a checkpoint on held-out synthetic scenes through the streaming runtime",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--checkpoint", help="our safetensors checkpoint to evaluate, or `default` for the shipped model"
    )
    which.add_argument("--random", action="store_true", help="no checkpoint: ground truth vs random weights")
    p.add_argument(
        "--preset", default="tiny", help="preset of the random weights with --random (default tiny)"
    )
    p.add_argument("--scenes", type=int, default=8, help="held-out scenes (default 8)")
    p.add_argument("--frames", type=int, default=150, help="frames per scene at 30 fps (default 150)")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help=f"scene seed (default {EVAL_SEED}, held out)")
    p.add_argument("--hw", type=frame_size, default=(56, 112), help="scene frame size HxW (default 56x112)")
    p.add_argument("--nfe", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance weight (default: the checkpoint's)")
    p.add_argument("--out", default="evaluation", help="output folder (default ./evaluation)")
    add_threads_argument(p)
    p.set_defaults(func=cmd_evaluate)
