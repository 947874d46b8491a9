"""Accuracy of a quantized export directory against its fp32 source on the same frames and noise.

Per component: the quantized graph is fed the fp32 pipeline's inputs of each frame, so its own error shows alone.
End to end: the quantized graphs run as a pipeline with their own state (KV caches, grids, VAE states and the
latents fed back), so errors compound as they would in deployment. Every number comes from running the graphs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from soundreactor import files
from soundreactor.calibration import metrics
from soundreactor.calibration.calibrate import RECORD_NAME
from soundreactor.calibration.chain import FrameSource, GraphChain

# Thresholds a quantized variant must meet to be called acceptable (every one, end to end and per component).
# Cosine 0.99 is the usual "same embedding" bar; it allows an error vector of sqrt(2 (1 - 0.99)) = 14% of the
# token's length (17 dB), in line with the latent bar below. Vision tokens and the hidden states h_a, h_v that
# condition the head are held to it.
TOKEN_COSINE_MIN = 0.99
HIDDEN_COSINE_MIN = 0.99
# 20 dB: the latent error's RMS is at most 10% of the latents'. The decoder is smooth in its input, so the
# waveform error starts near that level; 10% leaves room for the decoder's own error under the waveform bar.
LATENT_SNR_MIN_DB = 20.0
# 15 dB: error RMS at most 18% of the waveform's, after five chained graphs and the latent feedback. Generated
# audio need not match sample for sample; this bar only rules out a different waveform, the log-mel bar below
# judges the sound.
WAVEFORM_SNR_MIN_DB = 15.0
# 1 dB mean log-mel difference (over bins within 60 dB of the peak): about the just-noticeable change in level.
LOG_MEL_MAX_DB = 1.0


def finite_or_none(value: float) -> float | None:
    return value if np.isfinite(value) else None


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    threshold: float
    higher_is_better: bool

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def describe(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        return (
            f"{self.name} {self.value:.4g} ({sign} {self.threshold:g}: {'pass' if self.passed else 'FAIL'})"
        )


def cosine_metric(name: str, values: list[float], threshold: float) -> Metric:
    return Metric(name, float(np.mean(values)), threshold, True)


@dataclass
class Accumulator:
    """Per-frame values of one comparison: cosines, or SNR energies; pooled at the end."""

    cosines: list[float] = field(default_factory=list)
    signal: list[float] = field(default_factory=list)
    error: list[float] = field(default_factory=list)

    def add_cosine(self, reference: np.ndarray, test: np.ndarray) -> None:
        self.cosines.append(float(metrics.cosine_rows(reference, test).mean()))

    def add_energy(self, reference: np.ndarray, test: np.ndarray) -> None:
        signal, error = metrics.energies(reference, test)
        self.signal.append(signal)
        self.error.append(error)

    def snr_db(self) -> float:
        return metrics.snr_db(sum(self.signal), sum(self.error))

    def per_frame_snr_db(self) -> list[float]:
        return [metrics.snr_db(s, e) for s, e in zip(self.signal, self.error, strict=True)]


# graph -> the output its own error is measured on; the hidden outputs by cosine, latent and audio by SNR
COMPONENT_OUTPUTS = {
    "vision": "vision_token",
    "ar_audio": "h_audio",
    "ar_vision": "h_vision",
    "sampler": "latent",
    "vae_decoder": "audio",
}
COSINE_MIN = {"vision_token": TOKEN_COSINE_MIN, "h_audio": HIDDEN_COSINE_MIN, "h_vision": HIDDEN_COSINE_MIN}


@dataclass(frozen=True)
class AccuracyReport:
    scheme: str
    quantized: dict[str, str]  # graph -> scheme, for the quantized graphs
    calibration_data: dict[str, object]
    evaluation_data: dict[str, object]
    components: dict[str, list[Metric]]
    end_to_end: list[Metric]
    per_frame: dict[str, list[float]]  # token_cosine, latent_snr_db, waveform_snr_db
    # end to end again on ORT's fused integer kernels (this CPU's instruction set): informational, never judged
    ort_kernels: list[Metric] | None = None

    @property
    def acceptable(self) -> bool:
        return all(m.passed for ms in (self.end_to_end, *self.components.values()) for m in ms)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON values; an exact match's infinite SNR becomes null."""

        def metric(m: Metric) -> dict[str, object]:
            return {**asdict(m), "value": finite_or_none(m.value), "passed": m.passed}

        return {
            "scheme": self.scheme,
            "quantized": self.quantized,
            "acceptable": self.acceptable,
            "thresholds": {
                "token_cosine_min": TOKEN_COSINE_MIN,
                "hidden_cosine_min": HIDDEN_COSINE_MIN,
                "latent_snr_min_db": LATENT_SNR_MIN_DB,
                "waveform_snr_min_db": WAVEFORM_SNR_MIN_DB,
                "log_mel_max_db": LOG_MEL_MAX_DB,
            },
            "calibration_data": self.calibration_data,
            "evaluation_data": self.evaluation_data,
            "end_to_end": [metric(m) for m in self.end_to_end],
            "components": {name: [metric(m) for m in ms] for name, ms in self.components.items()},
            "per_frame": {k: [finite_or_none(v) for v in vs] for k, vs in self.per_frame.items()},
            "ort_kernels_not_judged": None
            if self.ort_kernels is None
            else [metric(m) for m in self.ort_kernels],
        }

    def to_markdown(self) -> str:
        verdict = "acceptable" if self.acceptable else "NOT acceptable"
        graphs = ", ".join(f"{name} ({s})" for name, s in self.quantized.items())
        data = self.evaluation_data
        lines = [
            f"# Calibration report: {self.scheme}",
            "",
            f"**Verdict: {verdict}** (every metric below must pass its threshold).",
            "",
            f"Quantized graphs: {graphs}; the others stay as exported.",
            f"Evaluated on {data['frames']} frames ({data.get('video') or 'demo scene'}), noise seed "
            f"{data['noise_seed']}, against the fp32 graphs on the same frames and noise.",
            "",
            "Every judged number runs the graphs' own arithmetic (ONNX Runtime with graph optimizations off: "
            "quantize, dequantize, then float math), so it is the same on every CPU.",
            "",
            "## End to end (the quantized graphs as a pipeline, own state)",
            "",
            "| metric | value | threshold | |",
            "|---|---|---|---|",
            *self._rows(self.end_to_end),
            "",
            "## Per component (the quantized graph on the fp32 pipeline's inputs)",
            "",
            "| component | metric | value | threshold | |",
            "|---|---|---|---|---|",
        ]
        for name, ms in self.components.items():
            lines += [f"| {name} {row}" for row in self._rows(ms)]
        if self.ort_kernels is not None:
            lines += [
                "",
                "## Not judged: end to end on ONNX Runtime's fused integer kernels, this CPU",
                "",
                "ORT's default optimizations fold Q/DQ into integer kernels whose results depend on the "
                "instruction set (the u8s8 path saturates without VNNI). The verdict above uses the graphs' own "
                "arithmetic (quantize, dequantize, float math), the same on every CPU and what TensorRT runs.",
                "",
                "| metric | value | threshold | |",
                "|---|---|---|---|",
                *self._rows(self.ort_kernels),
            ]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _rows(ms: list[Metric]) -> list[str]:
        return [
            f"| {m.name} | {m.value:.4g} | {'>=' if m.higher_is_better else '<='} {m.threshold:g} | "
            f"{'pass' if m.passed else 'FAIL'} |"
            for m in ms
        ]

    def save(self, directory: str | Path, stem: str = "calibration_report") -> list[Path]:
        """Write `<stem>.json`, `<stem>.md` and `<stem>.png` into `directory`; returns the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / f"{stem}.{ext}" for ext in ("json", "md", "png")]
        files.write_text(paths[0], json.dumps(self.to_dict(), indent=1, allow_nan=False))
        files.write_text(paths[1], self.to_markdown())
        self.plot(paths[2])
        return paths

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (frames_ax, bars_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
        frame = np.arange(len(self.per_frame["waveform_snr_db"]))
        for key, label in (("waveform_snr_db", "waveform SNR"), ("latent_snr_db", "latent SNR")):
            values = np.asarray(self.per_frame[key])  # exact frames (infinite SNR) are left out
            frames_ax.plot(frame, np.where(np.isfinite(values), values, np.nan), label=label)
        frames_ax.axhline(WAVEFORM_SNR_MIN_DB, color="C0", ls=":", lw=1)
        frames_ax.axhline(LATENT_SNR_MIN_DB, color="C1", ls=":", lw=1)
        frames_ax.set(
            xlabel="frame", ylabel="dB", title=f"{self.scheme} end to end, per frame (dotted: thresholds)"
        )
        frames_ax.legend()

        bars = [(f"e2e {m.name}", m) for m in self.end_to_end]
        bars += [(f"{name} {m.name}", m) for name, ms in self.components.items() for m in ms]
        margins = [self._margin(m) for _, m in bars]
        labels = [label if np.isfinite(m.value) else f"{label} (exact)" for label, m in bars]
        colors = ["tab:green" if m.passed else "tab:red" for _, m in bars]
        bars_ax.barh(labels, np.where(np.isfinite(margins), margins, 0.0), color=colors)
        bars_ax.axvline(0, color="k", lw=1)
        bars_ax.invert_yaxis()
        bars_ax.set(
            xlabel="margin over threshold (dB; cosines: 100 x difference)", title="metrics, green: pass"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    @staticmethod
    def _margin(m: Metric) -> float:
        margin = m.value - m.threshold if m.higher_is_better else m.threshold - m.value
        return 100 * margin if "cosine" in m.name else margin


def log_mel_metric(reference: list[np.ndarray], test: list[np.ndarray], sample_rate: int) -> Metric:
    """Log-mel distance of two clips given as per-frame chunks [B, 2, hop]."""
    ref, out = np.concatenate(reference, axis=-1), np.concatenate(test, axis=-1)
    return Metric(
        "log-mel distance dB", metrics.log_mel_distance_db(ref, out, sample_rate), LOG_MEL_MAX_DB, False
    )


def evaluate(
    reference: str | Path,
    quantized: str | Path,
    source: FrameSource,
    seed: int = 0,
    ort_kernels: bool = False,
) -> AccuracyReport:
    """Run the fp32 export `reference` and its quantized copy `quantized` over `source`'s frames.

    Every judged metric runs the graphs' own arithmetic (ORT graph optimizations off: quantize, dequantize, then
    float math; see `chain.open_session`), so the verdict is the same on every CPU. With `ort_kernels`, the end
    to end metrics are measured a second time with ORT's default optimizations, which fold Q/DQ into integer
    kernels: an informational figure for ORT CPU deployment on this machine's instruction set, never judged.
    """
    quantized = Path(quantized)
    fp32, quant = GraphChain(reference, seed), GraphChain(quantized, seed)  # every listed file hash-checked
    if fp32.manifest.graphs != quant.manifest.graphs:
        raise ValueError(
            f"{quantized} was not made from {reference}: their graphs' inputs and outputs differ"
        )
    if RECORD_NAME not in quant.manifest.files:
        raise ValueError(
            f"{quantized} lists no {RECORD_NAME} in its manifest: is it a `soundreactor calibrate` output?"
        )
    record = json.loads((quantized / RECORD_NAME).read_text())
    graphs = {
        name: g["scheme"] for name, g in record["graphs"].items() if g["scheme"] != record["source_precision"]
    }
    rate = fp32.manifest.config["vae"]["sample_rate"]
    own = {name: Accumulator() for name in graphs}
    end_to_end, per_frame, own_audio = run_pipelines(fp32, quant, source, rate, own)
    components = {}
    for name, acc in own.items():
        output = COMPONENT_OUTPUTS[name]
        if output in COSINE_MIN:
            components[name] = [cosine_metric(f"{output} cosine", acc.cosines, COSINE_MIN[output])]
        elif output == "latent":
            components[name] = [Metric("latent SNR dB", acc.snr_db(), LATENT_SNR_MIN_DB, True)]
        else:
            components[name] = [
                Metric("waveform SNR dB", acc.snr_db(), WAVEFORM_SNR_MIN_DB, True),
                log_mel_metric(own_audio[0], own_audio[1], rate),
            ]
    fused = None
    if ort_kernels:
        fused_pair = GraphChain(reference, seed, fused=True), GraphChain(quantized, seed, fused=True)
        fused = run_pipelines(*fused_pair, source, rate, {})[0]
    return AccuracyReport(
        scheme=record["scheme"],
        quantized=graphs,
        calibration_data=record["calibration_data"],
        evaluation_data={**source.description, "noise_seed": seed},
        components=components,
        end_to_end=end_to_end,
        per_frame=per_frame,
        ort_kernels=fused,
    )


def run_pipelines(
    fp32: GraphChain, quant: GraphChain, source: FrameSource, rate: int, own: dict[str, Accumulator]
) -> tuple[list[Metric], dict[str, list[float]], tuple[list[np.ndarray], list[np.ndarray]]]:
    """Both chains over the frames: end to end metrics, per-frame values, and (in `own`) each quantized graph's
    error alone on the fp32 pipeline's inputs; returns (end to end, per frame, (fp32 audio, `vae_decoder` alone
    audio))."""
    token, latent, audio = Accumulator(), Accumulator(), Accumulator()
    ref_audio, test_audio, own_audio = [], [], []
    for frame in source.frames:
        ref, test = fp32.step(frame), quant.step(frame)
        token.add_cosine(ref["vision"].outputs["vision_token"], test["vision"].outputs["vision_token"])
        latent.add_energy(ref["sampler"].outputs["latent"], test["sampler"].outputs["latent"])
        audio.add_energy(ref["vae_decoder"].outputs["audio"], test["vae_decoder"].outputs["audio"])
        ref_audio.append(ref["vae_decoder"].outputs["audio"])
        test_audio.append(test["vae_decoder"].outputs["audio"])
        for name, acc in own.items():
            output = COMPONENT_OUTPUTS[name]
            alone = quant.run(name, ref[name].inputs)[output]
            if output in COSINE_MIN:
                acc.add_cosine(ref[name].outputs[output], alone)
            else:
                acc.add_energy(ref[name].outputs[output], alone)
            if output == "audio":
                own_audio.append(alone)
    end_to_end = [
        cosine_metric("vision token cosine", token.cosines, TOKEN_COSINE_MIN),
        Metric("latent SNR dB", latent.snr_db(), LATENT_SNR_MIN_DB, True),
        Metric("waveform SNR dB", audio.snr_db(), WAVEFORM_SNR_MIN_DB, True),
        log_mel_metric(ref_audio, test_audio, rate),
    ]
    per_frame = {
        "token_cosine": token.cosines,
        "latent_snr_db": latent.per_frame_snr_db(),
        "waveform_snr_db": audio.per_frame_snr_db(),
    }
    return end_to_end, per_frame, (ref_audio, own_audio)
