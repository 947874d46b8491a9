"""What a served model instance is built from, as Triton model-config parameters, and the `Streams` it builds.

`triton-repo` writes these fields into `config.pbtxt`; the model instance reads them back and calls `load_streams`.
Tests and benchmarks call `load_streams` too, so the in-process reference is the very backend the server runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED_POLICIES = ("sequence", "slot")
TORCH_BACKENDS = ("torch", "cuda-graph")
EXPORT_BACKENDS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class ServingParams:
    """One model instance's backend and sampling settings.

    seed_policy: "sequence" seeds a stream from seed and its correlation ID (`sequence_seed`: the same audio
        wherever Triton places it); "slot" keeps the backend's seed + slot index (the audio depends on the slot the stream landed in).
    threads: torch / ONNX Runtime intra-op threads per instance. 1 by default: on a few cores, more threads fight
        the server's own (a 4-slot tiny step took 50 ms with 1 thread and 0.3-2 s with 2 on 2 cores).
    """

    backend: str
    slots: int
    frame_hw: tuple[int, int]
    # In a repository's config both paths are relative to the model folder (`located_in` makes them absolute).
    checkpoint: str = ""  # torch backends; optional for export backends (checked against the export)
    engines: str = ""  # export backends: the `soundreactor export` folder
    nfe: int = 0  # 0: the checkpoint's or export's own
    guidance: float = 0.0  # 0: the checkpoint's or export's own
    seed: int = 0
    seed_policy: str = "sequence"
    dtype: str = "bf16"  # cuda-graph precision
    vae_dtype: str = "fp32"  # cuda-graph VAE decoder precision
    providers: str = "cpu"  # onnxruntime
    threads: int = 1

    def __post_init__(self) -> None:
        if self.backend not in TORCH_BACKENDS + EXPORT_BACKENDS:
            raise ValueError(
                f"unknown backend {self.backend!r}: use one of {TORCH_BACKENDS + EXPORT_BACKENDS}"
            )
        if self.seed_policy not in SEED_POLICIES:
            raise ValueError(f"unknown seed policy {self.seed_policy!r}: use one of {SEED_POLICIES}")
        if self.slots < 1:
            raise ValueError(f"slots must be at least 1, got {self.slots}")

    def located_in(self, model_dir: str | Path) -> ServingParams:
        """These parameters with relative paths read from `model_dir` (absolute paths stay as they are)."""
        paths = {"checkpoint": self.checkpoint, "engines": self.engines}
        return dataclasses.replace(self, **{k: str(Path(model_dir) / v) for k, v in paths.items() if v})

    def to_config(self) -> dict[str, str]:
        """Triton `parameters` entries (string values only)."""
        fields = dataclasses.asdict(self)
        fields["frame_hw"] = "x".join(map(str, self.frame_hw))
        return {k: str(v) for k, v in fields.items()}

    @classmethod
    def from_config(cls, parameters: dict[str, Any]) -> ServingParams:
        """From the model config's `parameters` as Triton hands them over: {key: {"string_value": str}}."""
        raw = {k: v["string_value"] if isinstance(v, dict) else v for k, v in parameters.items()}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(types)
        if unknown:
            raise ValueError(
                f"unknown model parameters {sorted(unknown)}: regenerate with `soundreactor triton-repo`"
            )
        values: dict[str, Any] = {}
        for key, text in raw.items():
            if key == "frame_hw":
                values[key] = tuple(int(x) for x in text.split("x"))
            elif types[key] in ("int", int):
                values[key] = int(text)
            elif types[key] in ("float", float):
                values[key] = float(text)
            else:
                values[key] = text
        return cls(**values)


def load_streams(params: ServingParams, device: str = "cpu"):
    """The `Streams` backend of `params` on `device` ("cpu", "cuda:N"), with `params.slots` slots."""
    nfe, guidance = params.nfe or None, params.guidance or None
    if params.backend in EXPORT_BACKENDS:
        if not params.engines:
            raise ValueError(f"backend {params.backend} needs an export folder (engines)")
        checkpoint = params.checkpoint or None
        if params.backend == "onnxruntime":
            from soundreactor.runtime.onnxruntime_backend import OrtStreams, default_options

            options = default_options()
            options.intra_op_num_threads = params.threads
            providers = params.providers.split(",")
            streams = OrtStreams(params.engines, params.seed, providers, checkpoint, guidance, options)
        else:
            from soundreactor.runtime.tensorrt_backend import TrtStreams

            index = int(device.split(":")[1]) if ":" in device else 0
            streams = TrtStreams(params.engines, params.seed, checkpoint, guidance, device=index)
        _check_export(streams, params, nfe)
        return streams

    import torch

    from soundreactor.model.soundreactor import SoundReactor

    torch.set_num_threads(params.threads)
    model = SoundReactor.load(params.checkpoint, input_hw=params.frame_hw)
    model.configure_sampling(nfe=nfe, guidance=guidance)
    if params.backend == "torch":
        from soundreactor.runtime.torch_backend import TorchStreams

        return TorchStreams(model, slots=params.slots, seed=params.seed, device=device)
    from soundreactor.runtime.cuda_graph_backend import GraphStreams

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return GraphStreams(
        model,
        slots=params.slots,
        seed=params.seed,
        device=device,
        dtype=dtypes[params.dtype],
        vae_dtype=dtypes[params.vae_dtype],
    )


def _check_export(streams, params: ServingParams, nfe: int | None) -> None:
    """An export fixes the slot count, frame size and NFE: the model config must say the same."""
    manifest = streams.manifest
    wanted = {"slots": params.slots, "frame size": params.frame_hw, "nfe": nfe or manifest.nfe}
    found = {"slots": manifest.slots, "frame size": manifest.frame_hw, "nfe": manifest.nfe}
    if wanted != found:
        raise ValueError(
            f"{params.engines} was exported for {found}, the model config asks for {wanted}: "
            "regenerate the repository with `soundreactor triton-repo` (it reads these from the export)"
        )


def reseed(streams, slot: int, seed: int) -> None:
    """Give `slot` a new noise seed and restart it (the next `step` is its first frame).

    Every backend keeps one `NoiseSource` for its slots: the export backends as `noise`, the torch ones in
    `state.noise`.
    """
    from soundreactor.noise import NoiseSource

    for owner in (streams, getattr(streams, "state", None)):
        noise = getattr(owner, "noise", None)
        if isinstance(noise, NoiseSource):
            break
    else:
        raise TypeError(f"{type(streams).__name__} keeps no NoiseSource where expected")
    noise.seeds[slot] = seed
    streams.reset(slot)


def sequence_seed(seed: int, correlation_id: int | str) -> int:
    """The noise seed of a stream under the "sequence" policy: seed + correlation ID, modulo 2**64.

    Triton correlation IDs are uint64 or strings (tritonclient sends either). A string counts as the first 8 bytes
    of its BLAKE2b digest read little-endian, so it seeds the same stream on every server and run (Python's
    `hash` is salted per process). The modulus keeps every seed a non-negative int, which numpy's generators need.
    """
    if isinstance(correlation_id, str):
        digest = hashlib.blake2b(correlation_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        correlation_id = int.from_bytes(digest, "little")
    elif not isinstance(correlation_id, int) or isinstance(correlation_id, bool):
        raise TypeError(f"a correlation ID is an int or a str, got {type(correlation_id).__name__}")
    return (seed + correlation_id) % 2**64
