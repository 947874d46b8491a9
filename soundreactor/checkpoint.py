"""Checkpoints: our single-file safetensors format, and readers for the official DINOv2 and VAE releases.

Our format: one safetensors file with every tensor of `SoundReactor.state_dict()` and the model config as JSON in
the metadata, so a file is self-describing. Official `.pth`/`.ckpt` files are read with
`torch.load(weights_only=True)`: no pickled code ever runs. safetensors is imported where it is used, so the
model (random weights) runs on machines without it, such as the GPU image.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from soundreactor import files
from soundreactor.config import ModelConfig

FORMAT = "soundreactor/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message says what is wrong and what to do."""


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """Tensors of a `.safetensors`, `.pth` or `.ckpt` file and how they were stored (for reports).

    A torch file's tensors may sit under a `state_dict` entry (PyTorch Lightning checkpoints, stable-audio-tools'
    `export_model`), nested any number of times; entries that are not tensors (optimizer state, epoch) are ignored.
    Raises FileNotFoundError, or CheckpointError for an unreadable file or one that needs pickled code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, "safetensors"  # noqa: SIM118 (no __iter__)
        except SafetensorError as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message advises weights_only=False, i.e. running the file's code: never repeat it
        blocked = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        found = f" (it needs {blocked.group(1)})" if blocked else ""
        raise CheckpointError(
            f"{path} holds pickled Python objects beyond plain tensors{found}; loading it could run arbitrary "
            "code, so it is refused. Convert it safely: on an isolated machine, and only if you trust where the "
            "file came from, load it there and save its tensors with safetensors "
            "(safetensors.torch.save_file(state_dict, 'weights.safetensors')), then pass the .safetensors file."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable torch file: {err}") from err
    container = "torch file"
    while isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
        container += ", under 'state_dict'"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(raw).__name__})")
    return {k: v for k, v in raw.items() if isinstance(v, Tensor)}, container


def read_tensor_file(path: str | Path) -> dict[str, Tensor]:
    """The tensors of `read_weights`."""
    return read_weights(path)[0]


def check_state_dict(expected: dict[str, Tensor], given: dict[str, Tensor], what: str) -> None:
    """Raise one error naming every missing, unexpected, mis-shaped and mis-typed key (dtypes must match exactly:
    a float tensor relabelled int32 would load as garbage)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    common = sorted(set(expected) & set(given))
    misshaped = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(given[k].shape)}"
        for k in common
        if expected[k].shape != given[k].shape
    ]
    mistyped = [
        f"{k}: expected {expected[k].dtype}, got {given[k].dtype}"
        for k in common
        if expected[k].dtype != given[k].dtype
    ]
    if not (missing or unexpected or misshaped or mistyped):
        return
    lines = [f"{what} does not match the model:"]
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
        ("mis-typed", mistyped),
    ):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            lines.append(f"  {title} keys: {shown}")
    raise CheckpointError("\n".join(lines))


# metadata key: the file's float32 tensors were written in this dtype (and are read back as float32)
STORAGE_KEY = "float32_stored_as"
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def save_checkpoint(
    path: str | Path,
    config: ModelConfig,
    state: dict[str, Tensor],
    extra: dict[str, str] | None = None,
    float32_as: str | None = None,
) -> None:
    """Write our format (whole or not at all, mode 0666 & ~umask: see `files`); `extra` adds string metadata (e.g. the training config), which loaders ignore.

    `float32_as` ("float16" or "bfloat16") stores every float32 tensor in that dtype, half the file: the loader
    widens them back exactly, so the loaded model *is* the rounded one (evaluate that one, not the original).
    Raises ValueError for another dtype name.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {**(extra or {}), "format": FORMAT, "config": config.to_json()}
    if float32_as is not None:
        if float32_as not in STORAGE_DTYPES:
            raise ValueError(f"float32_as must be one of {sorted(STORAGE_DTYPES)}, got {float32_as!r}")
        narrow = STORAGE_DTYPES[float32_as]
        tensors = {k: v.to(narrow) if v.dtype == torch.float32 else v for k, v in tensors.items()}
        metadata[STORAGE_KEY] = float32_as
    files.atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and tensors of a checkpoint written by `save_checkpoint` (keys are checked by the model loader)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (make one with `soundreactor init`)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as err:
        raise CheckpointError(f"{path} is not a soundreactor checkpoint (safetensors): {err}") from err
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(
            f"{path} lacks soundreactor metadata (format {metadata.get('format')!r}); "
            f"build a checkpoint with `soundreactor init`"
        )
    try:  # validated before any model is built: the file is untrusted
        config = ModelConfig.from_json(metadata["config"])
    except ValueError as err:
        raise CheckpointError(f"{path} stores an invalid model config: {err}") from None
    stored_as = metadata.get(STORAGE_KEY)
    if stored_as is not None:
        if stored_as not in STORAGE_DTYPES:
            raise CheckpointError(
                f"{path} says its float32 tensors are stored as {stored_as!r}; this version reads "
                f"{sorted(STORAGE_DTYPES)}: upgrade soundreactor or re-save the checkpoint"
            )
        narrow = STORAGE_DTYPES[stored_as]
        tensors = {k: v.float() if v.dtype == narrow else v for k, v in tensors.items()}
    return config, tensors
