"""The Triton Python-backend model: one `Streams` backend per model instance, Triton's batch slots as its slots.

Imported by the `1/model.py` that `soundreactor triton-repo` writes; runs only inside Triton's Python backend stub
(`triton_python_backend_utils` exists nowhere else). With the sequence batcher's Direct strategy a request's index
in `execute(requests)` is its batch slot, and empty lower slots carry placeholder requests with READY = 0. So one
`execute` is one `Streams.step(frames, active)`: START -> `reset(slot)` before the step, READY = 0 -> inactive.
Triton frees a sequence idle past `max_sequence_idle_microseconds` without telling the model; the next stream in
that slot starts with START, so it is reset before its first frame.

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

from soundreactor.serving.params import ServingParams, load_streams, reseed

GAUGE_REFRESH_S = 1.0


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.params = ServingParams.from_config(config.get("parameters", {}))
        gpu = args["model_instance_kind"] == "GPU"
        device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        self.streams = load_streams(self.params, device)
        batching = config["sequence_batching"]
        self.idle_s = int(batching["max_sequence_idle_microseconds"]) / 1e6
        self.last_seen = np.full(self.streams.slots, -np.inf)  # per slot: monotonic time of its last request
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
        slots = self.streams.slots
        frames = np.zeros((slots, *self.streams.frame_hw, 3), dtype=np.uint8)
        active = np.zeros(slots, dtype=bool)
        for slot, request in enumerate(requests):
            if not _control(request, "READY"):
                continue  # a placeholder for an empty slot
            if _control(request, "START"):
                if self.params.seed_policy == "sequence":
                    reseed(self.streams, slot, self.params.seed + request.correlation_id())
                else:
                    self.streams.reset(slot)
            frames[slot] = _input(request, "FRAME")[0]
            active[slot] = True
        try:
            audio = self.streams.step(frames, active)
        except Exception as err:  # the backend left every slot as it was; each stream hears why
            error = pb_utils.TritonError(f"{type(err).__name__}: {err}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        now = time.monotonic()
        responses = []
        for slot, request in enumerate(requests):
            if not active[slot]:
                responses.append(pb_utils.InferenceResponse())
                continue
            self.last_seen[slot] = -np.inf if _control(request, "END") else now
            output = dlpack.to_dlpack(torch.from_numpy(audio[slot : slot + 1].copy()))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("AUDIO", output)]))
        self.gauge.set(self._active())
        return responses

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
