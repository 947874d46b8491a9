"""The Triton Python-backend model's `execute`, in this process: `triton_python_backend_utils` (which exists only
inside Triton's stub) is stood in for by the few calls the model makes, and requests are built as the sequence
batcher's Direct strategy hands them over (index = slot, READY = 0 for an empty slot).

Every served row is checked against the same `Streams` backend stepping that slot alone from a fresh state with the
stream's seed. The seed of a string correlation ID is written out here as documented (seed + the first 8 bytes of
its BLAKE2b digest, little-endian), not taken from the code under test.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import types

import numpy as np
import pytest
import torch
from torch.utils import dlpack

from soundreactor.serving.params import ServingParams, load_streams, reseed

HW = (28, 42)
SLOTS = 3
SEED = 5
ATOL = 1e-6  # audio peaks ~0.2: fp32 rounding with room for a different reduction order across batch contents


class FakeTensor:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def to_dlpack(self):
        return dlpack.to_dlpack(torch.from_numpy(np.ascontiguousarray(self.array)))


class Response:
    def __init__(self, output_tensors=None, error=None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


class Output:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    @classmethod
    def from_dlpack(cls, name: str, capsule) -> Output:
        return cls(name, dlpack.from_dlpack(capsule).numpy().copy())


class Metric:
    def __init__(self, labels: dict) -> None:
        self.value = None

    def set(self, value: float) -> None:
        self.value = value


class MetricFamily:
    GAUGE = "gauge"

    def __init__(self, name: str, description: str, kind: str) -> None:
        pass

    def Metric(self, labels: dict) -> Metric:
        return Metric(labels)


class Request:
    def __init__(self, correlation_id, frame=None, start=False, end=False, ready=True) -> None:
        self._id = correlation_id
        self.inputs = {"START": start, "END": end, "READY": ready}
        self.inputs = {k: np.array([[float(v)]], np.float32) for k, v in self.inputs.items()}
        if frame is not None:
            self.inputs["FRAME"] = frame[None]

    def correlation_id(self):
        if isinstance(self._id, Exception):
            raise self._id
        return self._id


def placeholder() -> Request:
    return Request(0, ready=False)


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> ServingParams:
    from soundreactor.model.soundreactor import init_model

    checkpoint = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    init_model("tiny", seed=0, input_hw=HW)[0].save(checkpoint)
    return ServingParams(
        backend="torch", slots=SLOTS, frame_hw=HW, checkpoint=str(checkpoint), nfe=1, seed=SEED
    )


@pytest.fixture
def model(params, monkeypatch):
    utils = types.ModuleType("triton_python_backend_utils")
    utils.TritonError = lambda message: message
    utils.InferenceResponse = Response
    utils.Tensor = Output
    utils.MetricFamily = MetricFamily
    utils.get_input_tensor_by_name = lambda request, name: (
        FakeTensor(request.inputs[name]) if name in request.inputs else None
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    monkeypatch.delitem(sys.modules, "soundreactor.serving.triton_model", raising=False)
    triton_model = importlib.import_module("soundreactor.serving.triton_model")
    config = {
        "parameters": {k: {"string_value": v} for k, v in params.to_config().items()},
        "sequence_batching": {"max_sequence_idle_microseconds": "5000000"},
    }
    instance = triton_model.TritonPythonModel()
    instance.initialize({"model_config": json.dumps(config), "model_instance_kind": "CPU",
                         "model_repository": "/unused", "model_name": "soundreactor",
                         "model_instance_name": "soundreactor_0"})  # fmt: skip
    yield instance
    instance.finalize()
    sys.modules.pop("soundreactor.serving.triton_model", None)  # its pb_utils was the stand-in


@pytest.fixture(scope="module")
def local(params):
    """`reference(slot, seed, frames)` -> audio [n, 2, 1600]: `slot` alone from a fresh state seeded `seed`."""
    streams = load_streams(params)

    def reference(slot: int, seed: int, frames: np.ndarray) -> np.ndarray:
        reseed(streams, slot, seed)
        batch = np.zeros((SLOTS, *HW, 3), np.uint8)
        out = []
        for frame in frames:
            batch[slot] = frame
            out.append(streams.step(batch, np.arange(SLOTS) == slot)[slot])
        return np.stack(out)

    return reference


def clip(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *HW, 3), dtype=np.uint8)


def string_seed(correlation_id: str) -> int:
    digest = hashlib.blake2b(correlation_id.encode(), digest_size=8).digest()
    return SEED + int.from_bytes(digest, "little")


def audio(response: Response) -> np.ndarray:
    assert response.error is None, response.error
    return response.outputs["AUDIO"][0]


def test_string_correlation_ids_start_clean_streams_seeded_by_their_digest(model, local):
    old = clip(1)
    for k, frame in enumerate(old):  # history in slots 0 and 1, from two integer-ID streams
        model.execute([Request(11, frame, start=k == 0), Request(12, frame, start=k == 0)])
    frames = {0: clip(2), 1: clip(3)}
    ids = {0: "camera-7", 1: 2**64 - 1}  # a string, and the largest uint64
    served: dict[int, list] = {0: [], 1: []}
    for k in range(3):
        responses = model.execute([Request(ids[s], frames[s][k], start=k == 0) for s in (0, 1)])
        for slot in (0, 1):
            served[slot].append(audio(responses[slot]))
    seeds = {0: string_seed("camera-7"), 1: (SEED + 2**64 - 1) % 2**64}
    for slot in (0, 1):
        expected = local(slot, seeds[slot], frames[slot])
        np.testing.assert_allclose(np.stack(served[slot]), expected, rtol=0, atol=ATOL)
    assert not np.allclose(np.stack(served[0]), local(0, SEED + 11, frames[0]), atol=1e-3)  # the seed counts


def test_a_request_that_fails_fails_alone_and_its_stream_never_runs_on_old_state(model, local):
    frames = {0: clip(4, n=4), 1: clip(5, n=4), 2: clip(6, n=4)}
    out: dict[int, list] = {0: [], 2: []}
    responses = model.execute([Request(21, frames[0][0], start=True), Request(22, frames[1][0], start=True),
                               Request(23, frames[2][0], start=True)])  # fmt: skip
    out[0].append(audio(responses[0]))
    out[2].append(audio(responses[2]))
    # slot 1: a new stream whose ID cannot be read, beside two streams carrying on
    bad_id = Request(RuntimeError("unreadable ID"), frames[1][1], start=True)
    responses = model.execute([Request(21, frames[0][1]), bad_id, Request(23, frames[2][1])])
    assert "unreadable ID" in responses[1].error and "slot 1" in responses[1].error
    out[0].append(audio(responses[0]))
    out[2].append(audio(responses[2]))
    # its next frame (no START) is refused, not stepped on the state slot 1 had; a missing FRAME fails alone
    responses = model.execute([Request(21, None), Request(24, frames[1][2]), Request(23, frames[2][2])])
    assert "FRAME" in responses[0].error or "NoneType" in responses[0].error
    assert "refused at its start" in responses[1].error and "START" in responses[1].error
    out[2].append(audio(responses[2]))
    # a fresh START in slot 1 serves it from a clean state
    responses = model.execute(
        [Request(21, frames[0][2]), Request(25, frames[1][0], start=True), placeholder()]
    )
    out[0].append(audio(responses[0]))
    assert responses[2].error is None and not responses[2].outputs  # the placeholder's empty answer
    np.testing.assert_allclose(audio(responses[1]), local(1, SEED + 25, frames[1][:1])[0], rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.stack(out[0]), local(0, SEED + 21, frames[0][:3]), rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.stack(out[2]), local(2, SEED + 23, frames[2][:3]), rtol=0, atol=ATOL)


def test_a_step_that_fails_for_one_stream_fails_that_stream_alone(model, local, monkeypatch):
    frames = {slot: clip(10 + slot) for slot in range(SLOTS)}
    poison = np.full((*HW, 3), 7, np.uint8)
    step = model.streams.step

    def failing_step(batch: np.ndarray, active: np.ndarray) -> np.ndarray:  # a fault in slot 1's frame
        if active[1] and np.array_equal(batch[1], poison):
            raise RuntimeError("slot 1's frame broke the step")
        return step(batch, active)

    monkeypatch.setattr(model.streams, "step", failing_step)
    out: dict[int, list] = {slot: [] for slot in range(SLOTS)}
    for k in range(3):
        sent = {slot: frames[slot][k] for slot in range(SLOTS)}
        if k == 1:
            sent[1] = poison
        responses = model.execute([Request(31 + s, sent[s], start=k == 0) for s in range(SLOTS)])
        for slot in range(SLOTS):
            if k == 1 and slot == 1:
                assert "broke the step" in responses[1].error and "slot 1" in responses[1].error
            else:
                out[slot].append(audio(responses[slot]))
    for slot in (0, 2):
        np.testing.assert_allclose(np.stack(out[slot]), local(slot, SEED + 31 + slot, frames[slot]), rtol=0,
                                   atol=ATOL)  # fmt: skip
    # the failed frame left slot 1 as it was: its stream is frames 0 and 2
    np.testing.assert_allclose(np.stack(out[1]), local(1, SEED + 32, frames[1][[0, 2]]), rtol=0, atol=ATOL)


def test_sequence_seed_wraps_and_refuses_what_is_no_id():
    from soundreactor.serving.params import sequence_seed

    assert sequence_seed(-3, 1) == 2**64 - 2  # a negative --seed still gives numpy a valid seed
    assert sequence_seed(0, "") == int.from_bytes(hashlib.blake2b(b"", digest_size=8).digest(), "little")
    with pytest.raises(TypeError, match="int or a str"):
        sequence_seed(0, b"bytes")
