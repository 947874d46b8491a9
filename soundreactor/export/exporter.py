"""Export a SoundReactor model to the per-frame ONNX graphs plus `manifest.json` (torch.onnx dynamo exporter).

Weights go to external data files (4 KiB aligned, so ONNX Runtime and TensorRT can map them); ar_audio and
ar_vision share one `transformer.weights`, so the largest component is stored once. An export is written into a
temporary folder beside its destination and moved into place when complete, so a folder never holds a mix of two
exports, even when two run at once.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import onnx
import torch
from onnx import external_data_helper

from soundreactor.export.graphs import example_inputs, frame_graphs
from soundreactor.export.manifest import FRAME_ORDER, MANIFEST_NAME, GraphSpec, Manifest, file_sha256
from soundreactor.model import attention
from soundreactor.model.soundreactor import SoundReactor
from soundreactor.model.vae import SnakeBeta

# 23: RMSNormalization, Attention (with softmax_precision) and Gelu as single ops. TensorRT 10.15+ imports
# opsets 9-24; ONNX Runtime runs 23 from 1.23.
OPSET = 23
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXTERNAL_MIN_BYTES = 1024  # smaller initializers stay inside the graph
ALIGN = 4096
WEIGHT_FILES = {"ar_audio": "transformer.weights", "ar_vision": "transformer.weights"}


def cast_model(model: SoundReactor, precision: str) -> SoundReactor:
    """The model in `precision`, keeping fp32 where half precision would lose what the graph needs.

    Kept fp32: the RoPE cos/sin tables (`.half()` would round the angles' cosines to 1e-3; `apply_rope` computes
    in fp32 anyway), the frame resize matrices and normalization (they see 0..255 pixel values), and the VAE's
    SnakeBeta log-scale parameters (exp(b) + 1e-9 underflows in fp16; the module casts exp(a), 1/exp(b) to the
    activation dtype). RMSNorm and LayerNorm export as RMSNormalization and LayerNormalization with fp32
    statistics (stash_type 1); the modules keep the transformer's attention scores and softmax
    (`window_attention`) and the head's sinusoidal angles in fp32, and `set_softmax_precision` makes the vision
    Attention ops' softmax fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype == torch.float32:
        return model
    cast = copy.deepcopy(model).to(dtype)
    tf = cast.transformer
    tables = attention.rope_tables(tf.cfg.head_dim, tf.cfg.window, tf.cfg.effective_rope_base)
    tf.rope_cos, tf.rope_sin = (t.to(tf.rope_cos.device) for t in tables)
    cast.vision.preprocess.float()
    for module in cast.vae.modules():
        if isinstance(module, SnakeBeta):
            module.float()
    return cast


def set_softmax_precision(proto: onnx.ModelProto) -> None:
    """Attention ops of fp16/bf16 graphs compute their softmax in fp32 (ONNX Attention-23 softmax_precision)."""
    for node in proto.graph.node:
        if node.op_type == "Attention":
            for attr in list(node.attribute):
                if attr.name == "softmax_precision":
                    node.attribute.remove(attr)
            node.attribute.append(onnx.helper.make_attribute("softmax_precision", onnx.TensorProto.FLOAT))


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes about optional torchvision ops it skips and torch-internal deprecations."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def strip_node_metadata(proto: onnx.ModelProto) -> None:
    """Keep each node's module path (`namespace`, shown by Netron and profilers); drop the exporter's stack
    traces and FX dumps, which hold local file paths and make up most of a small graph's size."""
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if p.key == "namespace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)


def to_onnx(module: torch.nn.Module, spec: GraphSpec) -> onnx.ModelProto:
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module,
            example_inputs(spec, next(module.parameters()).device),
            dynamo=True,
            opset_version=OPSET,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            verbose=False,
        )
    proto = program.model_proto
    proto.graph.name = spec.name
    strip_node_metadata(proto)
    return proto


class GraphWriter:
    """Writes `<name>.onnx` files with their initializers of >= 1 KiB in weight files, 4 KiB aligned; a tensor
    already in the graph's weight file (same bytes) is referenced, not stored again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: list[str] = []  # every file written, in order
        self._stored: dict[tuple[str, bytes], tuple[int, int]] = {}

    def write(self, name: str, proto: onnx.ModelProto) -> None:
        weight_file = WEIGHT_FILES.get(name, f"{name}.weights")
        with open(self.directory / weight_file, "ab" if weight_file in self.files else "wb") as f:
            for tensor in proto.graph.initializer:
                if len(tensor.raw_data) < EXTERNAL_MIN_BYTES:
                    continue
                key = (weight_file, hashlib.sha256(tensor.raw_data).digest())
                if key not in self._stored:
                    padding = -f.tell() % ALIGN
                    f.write(b"\0" * padding)
                    self._stored[key] = (f.tell(), len(tensor.raw_data))
                    f.write(tensor.raw_data)
                offset, length = self._stored[key]
                external_data_helper.set_external_data(tensor, weight_file, offset, length)
                tensor.ClearField("raw_data")
        if weight_file not in self.files:
            self.files.append(weight_file)
        onnx.save(proto, self.directory / f"{name}.onnx")
        self.files.append(f"{name}.onnx")


def installed_version(*distributions: str) -> str:
    for name in distributions:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return "not installed"


def tool_versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": installed_version("onnxruntime", "onnxruntime-gpu"),
        "onnxscript": installed_version("onnxscript"),
    }


def check_replaceable(directory: Path) -> None:
    """Raise ValueError unless `directory` may be replaced by an export: absent, empty, or an export itself."""
    # One system call decides: another export may move the folder away between two separate checks.
    try:
        names = os.listdir(directory)  # one listing, so a folder replaced meanwhile is judged as one version
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise ValueError(f"{directory} is a file, not a folder: choose a folder for the export") from None
    if names and MANIFEST_NAME not in names:
        raise ValueError(
            f"{directory} holds files but no {MANIFEST_NAME}, so it is not an export and is not replaced: "
            "choose a new or empty folder"
        )


def publish(staging: Path, directory: Path) -> bool:
    """Move the complete export in `staging` to `directory` (same parent), replacing an export there.

    Each rename is atomic, so readers see the old export or the new one, never a mix. When another export is
    published between our two renames, the loop moves that one aside too: the last publisher wins. Returns
    whether an existing export was replaced.
    """
    replaced = False
    for _ in range(100):
        try:
            os.rename(staging, directory)  # succeeds onto a missing or empty folder
            return replaced
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            check_replaceable(directory)
            os.rename(directory, old)
        except FileNotFoundError:  # another publisher moved it first
            continue
        replaced = True
        shutil.rmtree(old, ignore_errors=True)
    raise RuntimeError(f"could not move the export into {directory}: other exports kept replacing it")


def export_model(
    model: SoundReactor,
    directory: str | Path,
    slots: int = 1,
    precision: str = "fp32",
    checkpoint_sha256: str | None = None,
    on_replace: Callable[[Path], None] | None = None,
) -> Manifest:
    """Export every per-frame graph of `model` for `slots` streams at its input size, NFE and guidance.

    The graphs are written to a temporary folder beside `directory` and moved into place when all are written
    and checked (see `publish`); an existing export there is replaced and `on_replace(directory)` called. A
    folder that is not an export (files but no manifest.json) is refused with ValueError before any work.
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    directory = Path(directory)
    check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.partial-"))
    try:
        manifest = _export_into(model, staging, slots, precision, checkpoint_sha256)
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700; a published folder gets the usual mode
        if publish(staging, directory) and on_replace is not None:
            on_replace(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _export_into(
    model: SoundReactor, directory: Path, slots: int, precision: str, checkpoint_sha256: str | None
) -> Manifest:
    cast = cast_model(model.eval(), precision)
    graphs = frame_graphs(cast, slots)
    writer = GraphWriter(directory)
    for name in FRAME_ORDER:
        module, spec = graphs[name]
        proto = to_onnx(module, spec)
        if precision != "fp32":
            set_softmax_precision(proto)
        writer.write(name, proto)
        del proto  # one graph in memory at a time: the paper transformer's is 1.2 GB
    for name in FRAME_ORDER:
        onnx.checker.check_model(str(directory / f"{name}.onnx"), full_check=True)
    cfg = model.config
    manifest = Manifest(
        preset=cfg.preset,
        config=cfg.to_dict(),
        checkpoint_sha256=checkpoint_sha256,
        nfe=cfg.sampler.nfe,
        guidance=cfg.sampler.guidance,
        frame_hw=model.input_hw,
        slots=slots,
        precision=precision,
        opset=OPSET,
        tools=tool_versions(),
        graphs=tuple(graphs[name][1] for name in FRAME_ORDER),
        files={name: file_sha256(directory / name) for name in writer.files},
    )
    manifest.save(directory)
    return manifest
