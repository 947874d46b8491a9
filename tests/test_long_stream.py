"""Hour-long streams: output depends on the window, never on how long the stream has run, and memory stays flat.

An hour at 30 fps is 108,000 frames. The KV ring holds pre-RoPE keys and RoPE is applied with window-relative
positions, so a stream an hour in must produce exactly what a stream a few seconds in produces from the same
window contents. Jumping the frame counter by a whole number of ring turns checks that without running an hour.
"""

from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
import torch

from soundreactor.model.soundreactor import init_model
from soundreactor.runtime.cuda_graph_backend import GraphStreams
from soundreactor.runtime.torch_backend import TorchStreams

FRAME_HW = (48, 80)
HOUR = 108_000  # frames at 30 fps


@pytest.fixture(scope="module")
def model():
    model, _ = init_model("tiny", seed=11, input_hw=FRAME_HW)
    model.configure_sampling(nfe=2)
    return model


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, (40, *FRAME_HW, 3), dtype=np.uint8)


def make_streams(kind: str, model) -> TorchStreams | GraphStreams:
    if kind == "torch":
        return TorchStreams(copy.deepcopy(model), slots=2, seed=5)
    return GraphStreams(model, 2, 5, "cpu")


def frames_at(video: np.ndarray, i: int) -> np.ndarray:
    return np.stack([video[i % len(video)], video[(i + 7) % len(video)]])


@pytest.mark.parametrize("kind", ["torch", "graph"])
def test_an_hour_in_equals_seconds_in_with_the_same_window(model, video, kind):
    window_frames = model.config.transformer.window // 2  # two tokens per frame
    assert HOUR % window_frames == 0  # a whole number of ring turns: every ring slot keeps its meaning
    early, late = make_streams(kind, model), make_streams(kind, model)
    for i in range(window_frames + 4):  # past the first wrap: every ring slot is written and visible
        early.step(frames_at(video, i))
        late.step(frames_at(video, i))
    late.state.frame_index += HOUR
    for i in range(window_frames + 4, 3 * window_frames):
        expected = early.step(frames_at(video, i))
        np.testing.assert_array_equal(late.step(frames_at(video, i)), expected)
    assert np.abs(expected).max() > 1e-2  # not trivially silent
    assert late.state.frame_index.tolist() == (early.state.frame_index + HOUR).tolist()


def live_tensors() -> int:
    gc.collect()
    return sum(issubclass(type(obj), torch.Tensor) for obj in gc.get_objects())  # type(): no proxy lookups


def state_bytes(streams: TorchStreams) -> int:
    state = streams.state
    tensors = [state.cache.k, state.cache.v, state.prev_grid, state.prev_latent, state.frame_index]
    return sum(t.numel() * t.element_size() for t in tensors + state.vae_state)


@pytest.mark.parametrize("kind", ["torch", "graph"])
def test_memory_stays_flat_over_a_long_stream(model, video, kind):
    streams = make_streams(kind, model)
    for i in range(20):
        streams.step(frames_at(video, i))
    tensors, nbytes = live_tensors(), state_bytes(streams)
    for i in range(20, 260):  # 15 ring turns
        streams.step(frames_at(video, i))
    assert state_bytes(streams) == nbytes
    assert live_tensors() == tensors  # nothing accumulates per frame
