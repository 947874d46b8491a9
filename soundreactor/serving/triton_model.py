"""The Triton Python-backend model: one `Streams` backend per model instance, Triton's batch slots as its slots.

Imported by the `1/model.py` that `soundreactor triton-repo` writes; runs only inside Triton's Python backend stub
(`triton_python_backend_utils` exists nowhere else). With the sequence batcher's Direct strategy a request's index
in `execute(requests)` is its batch slot, and empty lower slots carry placeholder requests with READY = 0. So one
`execute` is one `Streams.step(frames, active)`: START -> `reset(slot)` before the step, READY = 0 -> inactive.
Triton frees a sequence idle past `max_sequence_idle_microseconds` without telling the model; the next stream in
that slot starts with START, so it is reset before its first frame. Correlation IDs come as int (uint64) or str;
both seed a stream (`sequence_seed`). A request that fails gets its own error response; the other slots step.

Tensors cross into and out of the stub through DLPack (torch): the 2.51 stub's numpy path (`as_numpy`,
`Tensor(name, array)`) was built against numpy 1 and reads wrong sizes and values under numpy 2.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack

from soundreactor.serving.params import ServingParams, load_streams, reseed, sequence_seed

GAUGE_REFRESH_S = 1.0


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = ServingParams.from_config(config.get("parameters", {}))
        self.params = parameters.located_in(args["model_repository"])  # the model folder
        gpu = args["model_instance_kind"] == "GPU"
        device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        self.streams = load_streams(self.params, device)
        batching = config["sequence_batching"]
        self.idle_s = int(batching["max_sequence_idle_microseconds"]) / 1e6
        self.last_seen = np.full(self.streams.slots, -np.inf)  # per slot: monotonic time of its last request
        self.refused = [""] * self.streams.slots  # per slot: why its stream was refused at START ("" if not)
        self.family = family = pb_utils.MetricFamily(  # must outlive its metric
            name="soundreactor_active_streams",
            description="streams holding a batch slot of this model instance (seen within the idle timeout)",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.gauge = family.Metric(
            labels={"model": args["model_name"], "instance": args["model_instance_name"]}
        )
        self.stopped = threading.Event()
        self.refresher = threading.Thread(target=self._refresh_gauge, daemon=True)
        self.refresher.start()

    def execute(self, requests: list) -> list:
        """One step of every slot holding a frame. A request that cannot be read fails alone: its response carries
        the error, every other slot steps as if it were not there."""
        slots = self.streams.slots
        frames = np.zeros((slots, *self.streams.frame_hw, 3), dtype=np.uint8)
        active = np.zeros(slots, dtype=bool)
        errors: dict[int, str] = {}
        now = time.monotonic()
        for slot, request in enumerate(requests):
            try:
                if not _control(request, "READY"):
                    continue  # a placeholder for an empty slot
                self.last_seen[slot] = -np.inf if _control(request, "END") else now
                if _control(request, "START"):
                    self._start(slot, request)
                elif self.refused[slot]:
                    errors[slot] = self.refused[slot]
                    continue
                frames[slot] = _input(request, "FRAME")[0]
                active[slot] = True
            except Exception as err:
                errors[slot] = f"stream {_correlation_id(request)} (slot {slot}): {type(err).__name__}: {err}"
        try:
            audio = self.streams.step(frames, active)
        except Exception:  # the backend left every slot as it was: find the slot that fails
            audio = self._step_apart(requests, frames, active, errors)
        responses = []
        for slot in range(len(requests)):
            if slot in errors:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[slot])))
            elif not active[slot]:
                responses.append(pb_utils.InferenceResponse())
            else:
                output = dlpack.to_dlpack(torch.from_numpy(audio[slot : slot + 1].copy()))
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("AUDIO", output)]))
        self.gauge.set(self._active())
        return responses

    def _step_apart(self, requests: list, frames: np.ndarray, active: np.ndarray, errors: dict[int, str]):
        """Step each active slot on its own (rows never depend on other slots), so a step that fails for one stream
        fails that stream alone; `active` and `errors` are updated in place. Only after a failed batch step."""
        audio = None
        for slot in np.flatnonzero(active):
            try:
                row = self.streams.step(frames, np.arange(len(active)) == slot)[slot]
            except Exception as err:
                stream = _correlation_id(requests[slot])
                errors[int(slot)] = f"stream {stream} (slot {slot}): {type(err).__name__}: {err}"
                active[slot] = False
                continue
            audio = np.zeros((len(active), *row.shape), row.dtype) if audio is None else audio
            audio[slot] = row
        return audio

    def _start(self, slot: int, request) -> None:
        """A new stream in `slot`: reset first, so that whatever fails next, nothing of the slot's previous stream
        carries over; a stream whose start fails is refused until it starts again."""
        self.streams.reset(slot)
        self.refused[slot] = ""
        try:
            if self.params.seed_policy == "sequence":
                reseed(self.streams, slot, sequence_seed(self.params.seed, request.correlation_id()))
        except Exception as err:
            self.refused[slot] = (
                f"stream {_correlation_id(request)} (slot {slot}) was refused at its start "
                f"({type(err).__name__}: {err}): start it again (a request with START)"
            )
            raise

    def _active(self) -> int:
        return int((time.monotonic() - self.last_seen < self.idle_s).sum())

    def _refresh_gauge(self) -> None:
        """Idle streams leave without a request: recount now and then, not only in `execute`."""
        while not self.stopped.wait(GAUGE_REFRESH_S):
            self.gauge.set(self._active())

    def finalize(self) -> None:
        self.stopped.set()
        self.refresher.join()
        del self.gauge, self.family  # the metric before its family, as Triton requires


def _input(request, name: str) -> np.ndarray:
    return dlpack.from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack()).numpy()


def _control(request, name: str) -> bool:
    return bool(_input(request, name).ravel()[0])


def _correlation_id(request) -> str:
    """The request's correlation ID for a message (uint64 or str; never raises)."""
    try:
        return repr(request.correlation_id())
    except Exception:
        return "?"
