"""A Triton model repository for one checkpoint or export: `config.pbtxt` (sequence batcher) and `1/model.py`.

Layout (https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/user_guide/model_repository.html):

    REPO/NAME/config.pbtxt                 FRAME uint8 [H, W, 3] -> AUDIO float32 [2, 1600], max_batch_size = slots
    REPO/NAME/1/model.py                   imports soundreactor.serving.triton_model
    REPO/NAME/1/checkpoint.safetensors     the checkpoint, if any
    REPO/NAME/1/engines/                   the export, if any

The repository holds what it serves (hard links where the file system allows, else copies), its config names
these files relative to REPO/NAME, and `model.py` imports the soundreactor package that `serve` runs (or the
installed one): it holds no absolute path, so it can be moved, copied to another machine or mounted in a container.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from soundreactor.serving.params import ServingParams

AUDIO_CHANNELS = 2
SAMPLES_PER_FRAME = 1600

PACKAGE_ROOT_ENV = "SOUNDREACTOR_PACKAGE_ROOT"  # set by `soundreactor serve` for the model's imports

MODEL_PY = f'''"""Written by `soundreactor triton-repo`: the model is soundreactor.serving.triton_model."""

import os
import sys

# `soundreactor serve` names the folder of the soundreactor package it runs (Triton's Python stub ignores
# PYTHONPATH); a tritonserver started otherwise imports the installed package.
PACKAGE_ROOT = os.environ.get("{PACKAGE_ROOT_ENV}", "")
if PACKAGE_ROOT and PACKAGE_ROOT not in sys.path:
    sys.path.insert(0, PACKAGE_ROOT)

try:
    from soundreactor.serving.triton_model import TritonPythonModel
except ModuleNotFoundError as err:
    raise ModuleNotFoundError(
        f"{{err}}: install soundreactor into the Python that runs Triton's Python backend, "
        "or start the server with `soundreactor serve`"
    ) from err

__all__ = ["TritonPythonModel"]
'''


def config_pbtxt(
    name: str,
    params: ServingParams,
    gpus: list[int] | None = None,
    idle_timeout_s: float = 5.0,
    queue_delay_us: int = 0,
) -> str:
    """The model config in protobuf text format.

    gpus: one instance per listed GPU, each with its own `params.slots` slots; None: one CPU instance.
    idle_timeout_s: a stream that sends nothing for this long loses its slot (a dropped client's slot comes back).
    queue_delay_us: how long the Direct strategy may hold a slot's frame while it waits for every other slot's
        (minimum_slot_utilization 1.0): one step for streams whose frames arrive a little apart, instead of one
        step each. 0: step as soon as any frame arrives.
    """
    h, w = params.frame_hw
    controls = "\n".join(
        f'    {{ name: "{n}" control [ {{ kind: CONTROL_SEQUENCE_{n} fp32_false_true: [ 0, 1 ] }} ] }},'
        for n in ("START", "END", "READY")
    ).rstrip(",")
    if gpus:
        instances = ",\n".join(f"  {{ kind: KIND_GPU count: 1 gpus: [ {g} ] }}" for g in gpus)
    else:
        instances = "  { kind: KIND_CPU count: 1 }"
    parameters = ",\n".join(  # json.dumps quotes and escapes as protobuf text format reads it
        f'  {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}'
        for k, v in params.to_config().items()
    )
    return f"""name: "{name}"
backend: "python"
max_batch_size: {params.slots}
input [ {{ name: "FRAME" data_type: TYPE_UINT8 dims: [ {h}, {w}, 3 ] }} ]
output [ {{ name: "AUDIO" data_type: TYPE_FP32 dims: [ {AUDIO_CHANNELS}, {SAMPLES_PER_FRAME} ] }} ]
sequence_batching {{
  max_sequence_idle_microseconds: {round(idle_timeout_s * 1e6)}
  direct {{ max_queue_delay_microseconds: {queue_delay_us} minimum_slot_utilization: {1.0 if queue_delay_us else 0.0} }}
  control_input [
{controls}
  ]
}}
instance_group [
{instances}
]
parameters [
{parameters}
]
"""


def write_repository(
    repo: str | Path,
    params: ServingParams,
    name: str = "soundreactor",
    gpus: list[int] | None = None,
    idle_timeout_s: float = 5.0,
    queue_delay_us: int = 0,
) -> Path:
    """Write REPO/NAME/{config.pbtxt, 1/model.py}, with the checkpoint and export of `params` stored in NAME/1/,
    and return the model folder."""
    model_dir = Path(repo) / name
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    stored = {}
    if params.checkpoint:
        source = Path(params.checkpoint)
        _store_file(source, version / f"checkpoint{source.suffix}")
        stored["checkpoint"] = f"1/checkpoint{source.suffix}"
    if params.engines:
        _store_folder(Path(params.engines), version / "engines")
        stored["engines"] = "1/engines"
    unused = [p for p in (*version.glob("checkpoint.*"), version / "engines")
              if p.exists() and p.relative_to(model_dir).as_posix() not in stored.values()]  # fmt: skip
    for path in unused:  # stored by an earlier write
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    config = config_pbtxt(name, dataclasses.replace(params, **stored), gpus, idle_timeout_s, queue_delay_us)
    (model_dir / "config.pbtxt").write_text(config)
    (model_dir / "1" / "model.py").write_text(MODEL_PY)
    return model_dir


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    """A hard link (instant, no space) where the file system allows one, else a copy."""
    try:
        os.link(os.path.realpath(source), target)  # Linux's link(2) would link a symlink itself
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(source, target)


def _store_file(source: Path, target: Path) -> None:
    """`source` at `target`, replaced whole (a rewrite may be given the stored file itself as its source)."""
    if target.exists() and source.resolve() == target.resolve():
        return
    scratch = target.with_name(f".{target.name}.partial")
    scratch.unlink(missing_ok=True)
    _link_or_copy(source, scratch)
    os.replace(scratch, target)


def _store_folder(source: Path, target: Path) -> None:
    """The folder `source` (links inside it followed) at `target`, replaced whole."""
    if target.exists() and source.resolve() == target.resolve():
        return
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copytree(source, scratch, copy_function=_link_or_copy, dirs_exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
