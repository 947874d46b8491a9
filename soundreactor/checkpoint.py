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


WEIGHTS_FORMATS = "a .safetensors file or a PyTorch .pth/.ckpt file"
# tags of the ModelProto fields that follow ir_version (tag 0x08) in an ONNX file
ONNX_FIELDS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42}


def file_kind(path: str | Path) -> str:
    """What a file holds, judged by its content (a name can lie): 'safetensors', 'torch' (PyTorch's zip),
    'pickle' (PyTorch's legacy format), or, for files that hold no weights we read, a short description."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(256)
    size = path.stat().st_size
    if not head:
        return "an empty file"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                torch_zip = any(name.endswith("/data.pkl") for name in archive.namelist())
        except zipfile.BadZipFile:
            return "a damaged zip archive"
        return (
            "torch" if torch_zip else "a zip archive that is not a PyTorch file (a NumPy .npz, a .keras ...)"
        )
    if len(head) > 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "an HDF5 file (Keras or TensorFlow weights)"
    if head.startswith(b"GGUF"):
        return "a GGUF file (llama.cpp weights)"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    if len(head) > 2 and head[0] == 0x08 and head[1] < 0x80 and head[2] in ONNX_FIELDS:
        return "an ONNX model (a graph for a runtime, not a checkpoint)"
    try:
        text = head.decode("utf-8").lstrip()
    except UnicodeDecodeError:
        return "not a weights format soundreactor knows"
    if text.startswith("version https://git-lfs"):
        return "a Git LFS pointer, not the file itself (fetch it with `git lfs pull`)"
    if text[:15].lower().startswith(("<!doctype html", "<html")):
        return "an HTML page (a download that returned a web page instead of the file)"
    return f"a text file (it starts {text.splitlines()[0][:40]!r})" if text else "a text file"


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """Tensors of a `.safetensors`, `.pth` or `.ckpt` file and how they were stored (for reports).

    The format is read from the content, whatever the name (`file_kind`). A torch file's tensors may sit under a
    `state_dict` entry (PyTorch Lightning checkpoints, stable-audio-tools' `export_model`), nested any number of
    times; entries that are not tensors (optimizer state, epoch) are ignored.
    Raises FileNotFoundError, or CheckpointError for an unreadable file or one that needs pickled code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    kind = file_kind(path)
    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, "safetensors"  # noqa: SIM118 (no __iter__)
        except SafetensorError as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    if kind not in ("torch", "pickle"):
        raise CheckpointError(f"{path} is {kind}, not weights: give {WEIGHTS_FORMATS}")
    try:
        with open(path, "rb") as f:  # a file object: torch.load would pick a reader by the name's suffix
            raw = torch.load(f, map_location="cpu", weights_only=True)
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


def check_finite(tensors: dict[str, Tensor], what: str) -> None:
    """Raise CheckpointError naming the tensors that hold NaN or infinity: such weights give NaN audio (or NaN
    training) and are refused where they enter, never loaded."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        shown = ", ".join(bad[:8]) + (f", ... ({len(bad)} in all)" if len(bad) > 8 else "")
        raise CheckpointError(
            f"{what} holds NaN or infinite values in {shown}: these weights are broken (a diverged training run "
            "or a damaged file); use an earlier checkpoint or the original file"
        )


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
    """Write our format, whole or not at all, with the umask's mode (`files.atomic_write`); `extra` adds string
    metadata (e.g. the training config), which loaders ignore.

    `float32_as` ("float16" or "bfloat16") stores every float32 tensor in that dtype, half the file: the loader
    widens them back exactly, so the loaded model *is* the rounded one (evaluate that one, not the original).
    Raises ValueError for another dtype name.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {**(extra or {}), "format": FORMAT, "config": config.to_json()}
    if float32_as is not None:
        if float32_as not in STORAGE_DTYPES:
            raise ValueError(f"float32_as must be one of {sorted(STORAGE_DTYPES)}, got {float32_as!r}")
        narrow = STORAGE_DTYPES[float32_as]
        tensors = {k: v.to(narrow) if v.dtype == torch.float32 else v for k, v in tensors.items()}
        metadata[STORAGE_KEY] = float32_as
    try:
        files.atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))
    except SafetensorError as err:  # the OS refused the file (read-only or virtual file system, full disk)
        raise OSError(f"cannot write the checkpoint {path}: {err}") from None


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and tensors of a checkpoint written by `save_checkpoint` (keys are checked by the model loader)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint: give a checkpoint file in it (a training run writes "
            "model.safetensors and best.safetensors)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (make one with `soundreactor init`)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as err:
        kind = file_kind(path)
        what = "a damaged safetensors file" if kind == "safetensors" else kind
        what = "a PyTorch file" if kind in ("torch", "pickle") else what
        raise CheckpointError(
            f"{path} is not a soundreactor checkpoint (safetensors): it is {what} ({err}); "
            "make a checkpoint with `soundreactor init`"
        ) from err
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
    check_finite(tensors, f"checkpoint {path}")
    return config, tensors
