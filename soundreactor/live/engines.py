"""The in-process model behind `soundreactor live`: a checkpoint (or the built-in default) on a `Streams` backend
with one slot per concurrent stream."""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

from soundreactor.runtime.session import Streams
from soundreactor.threads import pick_threads

LIVE_BACKENDS = ("torch", "onnxruntime", "cuda-graph")


def default_backend() -> str:
    """The fastest that runs here: CUDA graphs on a GPU, else ONNX Runtime (the default model's frame: ~8 ms on
    2 cores, against ~22 ms in eager torch)."""
    import torch

    return "cuda-graph" if torch.cuda.is_available() else "onnxruntime"


def checkpoint_path(checkpoint: str | None) -> Path:
    """The checkpoint file: `None` or the word `default` name the built-in default model."""
    from soundreactor.default_model import CHECKPOINT

    if checkpoint in (None, "default"):
        return CHECKPOINT
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {checkpoint} (make one with `soundreactor init`, or use --checkpoint default)"
        )
    return path.resolve()


def build_streams(
    checkpoint: Path,
    backend: str,
    slots: int,
    seed: int,
    frame_hw: tuple[int, int] | None,
    threads: int | None,
    resources: ExitStack,
    note=print,
) -> Streams:
    """`slots` streams of `checkpoint` on `backend` for frames of `frame_hw` (default: the model's vision size).

    onnxruntime runs a temporary export (made here, removed when `resources` closes).
    """
    import torch

    from soundreactor.model.soundreactor import SoundReactor

    model = SoundReactor.load(checkpoint, input_hw=frame_hw)
    threads = pick_threads(
        model.config.parameter_estimate(), threads
    )  # --threads, as run and evaluate read it
    if backend == "torch":
        from soundreactor.runtime.torch_backend import TorchStreams

        torch.set_num_threads(threads)
        return TorchStreams(model, slots=slots, seed=seed)
    if backend == "cuda-graph":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--backend cuda-graph: torch {torch.__version__} sees no CUDA device; use onnxruntime"
            )
        from soundreactor.runtime.cuda_graph_backend import GraphStreams

        return GraphStreams(model, slots=slots, seed=seed, device="cuda", dtype=torch.bfloat16,
                            vae_dtype=torch.float32)  # fmt: skip
    if backend != "onnxruntime":
        raise ValueError(f"unknown backend {backend!r}: pick one of {', '.join(LIVE_BACKENDS)}")
    from soundreactor.export.exporter import export_model
    from soundreactor.export.manifest import file_sha256
    from soundreactor.runtime.onnxruntime_backend import OrtStreams, default_options

    folder = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="soundreactor-live-")))
    note(f"exporting {checkpoint.name} for onnxruntime ({slots} slots) into a temporary folder...")
    export_model(model, folder / "export", slots, checkpoint_sha256=file_sha256(checkpoint))
    options = default_options(threads)
    return OrtStreams(folder / "export", seed=seed, checkpoint=checkpoint, options=options)
