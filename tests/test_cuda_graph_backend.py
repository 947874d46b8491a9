"""CUDA-graph backend: its buffer logic runs eagerly on CPU against the torch backend; graphs and Triton on CUDA.

On CPU `GraphStreams` runs the very functions it captures on CUDA, so skips, resets, the ring save/restore and
pipelining are all checked here. The CUDA tests run on a GPU machine through perf/gpu_check.sh, which passes
--noconftest so that the Triton kernels compile for the GPU instead of running in the interpreter.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerance import module_depth, rounding_atol
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from soundreactor.model.soundreactor import init_model
from soundreactor.model.vae import SnakeBeta
from soundreactor.runtime.cuda_graph_backend import SWITCH, GraphStreams, graphs_enabled
from soundreactor.runtime.session import FrameError, Session
from soundreactor.runtime.torch_backend import TorchStreams

ROOT = Path(__file__).resolve().parents[1]
FRAME_HW = (48, 80)
SLOTS = 3
# tiny preset: window 16 tokens = 8 frames, so 22 frames wrap the KV ring more than twice
FRAMES = 22
RESETS = {9: 0, 15: 2}  # frame -> slot reset just before it (slot 2 then skips its first frame back)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run perf/gpu_check.sh)")


def active_mask(i: int) -> np.ndarray:
    return np.array([True, i % 3 != 1, i not in (4, 5, 13, 16)])


def batch(frames: np.ndarray, i: int) -> np.ndarray:
    return np.stack([frames[i % len(frames)], frames[(i + 5) % len(frames)], frames[(i + 11) % len(frames)]])


def run(streams, frames: np.ndarray, n: int = FRAMES, resets: dict[int, int] = RESETS) -> np.ndarray:
    """Audio [n, B, 2, 1600] of a schedule with skips and mid-stream resets."""
    out = []
    for i in range(n):
        if i in resets:
            streams.reset(resets[i])
        out.append(streams.step(batch(frames, i), active_mask(i)))
    return np.stack(out)


@pytest.fixture(scope="module")
def model():
    model, _ = init_model("tiny", seed=3, input_hw=FRAME_HW)
    model.configure_sampling(nfe=2)
    return model


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (24, *FRAME_HW, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def runs(model, frames) -> dict[str, np.ndarray]:
    return {
        "torch": run(TorchStreams(model, slots=SLOTS, seed=10), frames),
        "unpipelined": run(GraphStreams(model, SLOTS, 10, "cpu", pipelined=False), frames),
        "pipelined": run(GraphStreams(model, SLOTS, 10, "cpu", pipelined=True), frames),
    }


@pytest.mark.parametrize("mode", ["unpipelined", "pipelined"])
def test_matches_the_torch_backend_frame_for_frame(runs, mode):
    # fp32, the same kernels in the same order: measured bit-exact on CPU; 1e-5 leaves room for other BLAS
    np.testing.assert_allclose(runs[mode], runs["torch"], atol=1e-5, rtol=0)
    assert np.abs(runs["torch"]).max() > 1e-2  # not trivially silent
    skipped = ~np.stack([active_mask(i) for i in range(FRAMES)])
    assert not runs[mode][skipped].any()


def test_pipelined_equals_unpipelined_exactly(runs):
    np.testing.assert_array_equal(runs["pipelined"], runs["unpipelined"])


def slot_state(streams: GraphStreams, slot: int) -> list[torch.Tensor]:
    s = streams.state
    tensors = [s.cache.k[:, slot], s.cache.v[:, slot], s.prev_grid[slot], s.prev_latent[slot]]
    tensors += [t[slot] for t in s.vae_state] + [s.frame_index[slot], streams.h_audio[slot]]
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("pipelined", [False, True])
def test_skipped_slot_keeps_its_state_exactly(model, frames, pipelined):
    streams = GraphStreams(model, SLOTS, 10, "cpu", pipelined=pipelined)
    run(streams, frames, n=11, resets={})  # past the first wrap of the ring
    before = [slot_state(streams, k) for k in range(SLOTS)]
    audio = streams.step(batch(frames, 11), np.array([True, False, True]))
    after = [slot_state(streams, k) for k in range(SLOTS)]
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1], strict=True))
    assert not audio[1].any()
    advanced = sum(active_mask(i).astype(int) for i in range(11)) + np.array([1, 0, 1])
    assert streams.state.frame_index.tolist() == advanced.tolist()
    assert not torch.equal(before[0][0], after[0][0])  # the active slots did write their ring entries


def test_reset_restarts_one_slot_and_leaves_the_others(model, frames):
    untouched = run(GraphStreams(model, SLOTS, 10, "cpu"), frames, n=14, resets={})
    streams = GraphStreams(model, SLOTS, 10, "cpu")
    reset = run(streams, frames, n=14, resets={6: 1})
    np.testing.assert_array_equal(reset[:, [0, 2]], untouched[:, [0, 2]])
    # slot 1 restarts at frame 0 in the replay of the reset step: it equals a fresh stream fed the same frames
    fresh_run = GraphStreams(model, SLOTS, 10, "cpu")
    fresh = np.stack([fresh_run.step(batch(frames, i), active_mask(i)) for i in range(6, 14)])
    # slot rows are computed independently, in batches of another makeup: GEMMs may block their sums differently,
    # through every layer of the model (measured equal)
    np.testing.assert_allclose(
        reset[6:, 1], fresh[:, 1], atol=rounding_atol(fresh[:, 1], module_depth(model)), rtol=0
    )
    assert not np.array_equal(reset[6:, 1], untouched[6:, 1])


class HostTraffic(TorchDispatchMode):
    """Records every op that reads a host tensor (other than a 0-dim scalar) or writes one: inside a CUDA-graph
    capture each would be a host<->device copy, which breaks or silently freezes the capture."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.is_cpu and t.dim() > 0 for t in inputs) or any(t.is_cpu for t in outputs):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_functions_are_capturable(model, dtype, pipelined):
    """The functions the graphs capture, run on the meta device standing in for CUDA: a host sync (`.item()`,
    a branch on a value), a data-dependent shape (`nonzero`, mask indexing) raises there, and a tensor made on
    the host and copied over shows up as host traffic. The check itself is checked at the end."""
    streams = GraphStreams(model, SLOTS, 0, "meta", dtype, pipelined=pipelined, use_triton=False)
    functions = [streams._reset, streams._frame] + ([streams._prepare] if pipelined else [])
    traffic = HostTraffic()
    with torch.no_grad(), traffic:
        for function in functions:
            function()
    assert traffic.ops == []
    assert streams.state.cache.k.is_meta and streams.audio.buffer.is_meta  # nothing fell back to the host
    with pytest.raises(RuntimeError, match="meta"):
        streams.state.frame_index.sum().item()
    with torch.no_grad(), traffic:
        streams.state.prev_latent.add_(torch.ones(1).to("meta"))  # made on the host, copied over
    assert traffic.ops


def test_session_over_graph_streams(model, frames):
    graph = Session(GraphStreams(model, 1, 4, "cpu"))
    torch_session = Session(TorchStreams(model, seed=4))
    for frame in frames[:10]:
        np.testing.assert_allclose(graph.step(frame), torch_session.step(frame), atol=1e-5, rtol=0)
    with pytest.raises(FrameError, match="does not match"):
        graph.step(frames[0][:-2])


def test_failure_inside_the_frame_rolls_back(model, frames, monkeypatch):
    """An eager failure after the ring was written leaves no trace: the retry equals a clean run."""
    expected = run(GraphStreams(model, SLOTS, 7, "cpu"), frames, n=10, resets={})
    streams = GraphStreams(model, SLOTS, 7, "cpu")
    out = list(run(streams, frames, n=9, resets={}))

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    with monkeypatch.context() as patch:
        patch.setattr(streams.model.vae.decoder, "step", broken)
        with pytest.raises(RuntimeError, match="simulated"):
            streams.step(batch(frames, 9), active_mask(9))
    out.append(streams.step(batch(frames, 9), active_mask(9)))
    np.testing.assert_array_equal(np.stack(out), expected)


def test_inputs_that_do_not_fit_the_buffers_raise(model, frames):
    streams = GraphStreams(model, SLOTS, 0, "cpu")
    good = torch.from_numpy(batch(frames, 0))
    with pytest.raises(ValueError, match=r"shape \(3, 48, 80, 3\) -> \(3, 46, 80, 3\)"):
        streams.step_device(good[:, :-2])
    with pytest.raises(ValueError, match=r"dtype torch\.uint8 -> torch\.float32"):
        streams.step_device(good.float())
    with pytest.raises(ValueError, match=r"shape \(3, 48, 80, 3\) -> \(2, 48, 80, 3\).*new GraphStreams"):
        streams.step_device(good[:2])
    with pytest.raises(FrameError, match="expected frames of shape"):
        streams.step(batch(frames, 0)[:2])
    with pytest.raises(ValueError, match="active must be a bool array"):
        streams.step(batch(frames, 0), np.array([1, 0, 1]))
    with pytest.raises(IndexError):
        streams.reset(SLOTS)
    with pytest.raises(ValueError, match="need a CUDA device"):
        GraphStreams(model, 1, 0, "cpu", graphs=True)
    with pytest.raises(TypeError, match="dtype"):
        GraphStreams(model, 1, 0, "cpu", dtype=torch.float64)
    # nothing above touched the streams: a good step still equals a fresh one
    np.testing.assert_array_equal(
        streams.step_device(good).numpy(), GraphStreams(model, SLOTS, 0, "cpu").step(batch(frames, 0))
    )


@pytest.mark.parametrize(
    ("dtype", "vae_dtype", "tolerance"),
    # max |error| / peak amplitude over 12 frames on the tiny preset, measured: bf16 7.5e-3, bf16 with an fp32
    # VAE 1.3e-3, fp16 1.1e-3 (with random Snake frequencies the VAE amplifies every latent error: bf16 9e-2)
    [(torch.bfloat16, None, 3e-2), (torch.bfloat16, torch.float32, 3e-3), (torch.float16, None, 5e-3)],
)
def test_half_precision_stays_close_to_fp32(model, frames, dtype, vae_dtype, tolerance):
    reference = run(GraphStreams(model, SLOTS, 10, "cpu"), frames, n=12)
    half_streams = GraphStreams(model, SLOTS, 10, "cpu", dtype=dtype, vae_dtype=vae_dtype)
    assert half_streams.model.transformer.rope_cos.dtype == torch.float32  # RoPE tables are kept in fp32
    assert half_streams.state.cache.k.dtype == dtype
    assert {s.dtype for s in half_streams.state.vae_state} == {vae_dtype or dtype}
    half = run(half_streams, frames, n=12)
    error = np.abs(half - reference).max() / np.abs(reference).max()
    assert error < tolerance, error


def test_timings_cover_both_latency_definitions(model, frames):
    streams = GraphStreams(model, SLOTS, 0, "cpu", timing=True)
    run(streams, frames, n=3, resets={})
    t = streams.timings
    stages = ("audio_step", "vision", "vision_step", "sampler", "vae_decode", "commit")
    assert all(t[k] >= 0 for k in stages)
    assert t["token_level"] == pytest.approx(sum(t[k] for k in stages[:4]), abs=1e-6)
    assert t["waveform_level"] == pytest.approx(t["token_level"] + t["vae_decode"] + t["commit"], abs=1e-6)
    # pipelined: the audio step ran after the previous frame, outside frame arrival -> audio
    assert t["frame_arrival"] >= t["waveform_level"] - t["audio_step"]


def test_graph_switch(monkeypatch):
    monkeypatch.delenv(SWITCH, raising=False)
    assert graphs_enabled("cuda") and not graphs_enabled("cpu")
    monkeypatch.setenv(SWITCH, "0")
    assert not graphs_enabled("cuda")


def kernels_interpreted() -> bool:
    pytest.importorskip("triton")
    from soundreactor.triton_kernels import decode_attention

    return type(decode_attention._window_partial_kernel).__name__ == "InterpretedFunction"


def test_triton_kernels_in_the_frame_on_cpu(model, frames):
    if not kernels_interpreted():
        pytest.skip("Triton kernels were defined without TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    # the interpreter costs ~1 s per frame: a few frames, with a reset, are enough to check the wiring
    kernel = run(GraphStreams(model, SLOTS, 10, "cpu", use_triton=True), frames, n=4, resets={2: 1})
    reference = run(GraphStreams(model, SLOTS, 10, "cpu", use_triton=False), frames, n=4, resets={2: 1})
    np.testing.assert_allclose(kernel, reference, atol=1e-5, rtol=0)  # measured 8e-7


def test_frame_ops_counts_every_stage(model, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "perf"))
    frame_ops = pytest.importorskip("frame_ops")
    counts = {
        kernels: frame_ops.count_frame(copy.deepcopy(model), 2, torch.float32, kernels)
        for kernels in ("torch", "triton")
    }
    stages = {"audio_step", "vision", "vision_step", "sampler", "vae_decode", "commit"}
    assert all(set(c["per_stage"]) == stages and min(c["per_stage"].values()) > 0 for c in counts.values())
    # the stand-ins replace the attention of both transformer steps and the VAE's Snakes; nothing else changes
    for stage in stages - {"audio_step", "vision_step", "vae_decode"}:
        assert counts["triton"]["per_stage"][stage] == counts["torch"]["per_stage"][stage]
    layers = model.config.transformer.n_layers
    snakes = sum(isinstance(m, SnakeBeta) for m in model.vae.decoder.modules())
    ops = counts["triton"]["ops"]
    assert ops["triton decode_attention"] == 2 * layers * 2 and ops["triton snake_beta"] == snakes
    for stage in ("audio_step", "vae_decode"):
        assert counts["triton"]["per_stage"][stage] < counts["torch"]["per_stage"][stage]


def test_bench_dry_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "perf"))  # bench_gpu imports perf/common.py
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "perf" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)
    spec.loader.exec_module(bench)
    bench.main(["--dry-run", "--dtype", "fp32", "--nfe", "1", "--slots", "1", "2", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "bench_gpu_cpu-dry-run.json").read_text())
    assert set(results["latency"]) == {"1/graph+triton", "1/graph", "1/eager"}
    run_1 = results["latency"]["1/graph"]
    assert "error" not in run_1 and run_1["latency_ms"]["waveform_level"]["n"] == 4
    assert [p["slots"] for p in results["sweep"]["points"]] == [1, 2]
    assert (tmp_path / "bench_gpu_cpu-dry-run.md").read_text().startswith("# CUDA-graph backend")


# ---- CUDA: graphs and the Triton kernel (perf/gpu_check.sh runs these on the GPU machine) -------------------


@cuda
def test_cuda_graph_replay_equals_eager(model, frames, monkeypatch):
    graph = GraphStreams(model, SLOTS, 10, "cuda", graphs=True, use_triton=False, timing=True)
    assert graph._frame_graph.graph is not None
    replayed = run(graph, frames)
    eager = run(GraphStreams(model, SLOTS, 10, "cuda", graphs=False, use_triton=False), frames)
    # the replay launches the kernels the eager run launched: bit-for-bit expected, 1e-6 allowed for cuBLAS
    np.testing.assert_allclose(replayed, eager, atol=1e-6, rtol=0)
    unpipelined = run(GraphStreams(model, SLOTS, 10, "cuda", pipelined=False, use_triton=False), frames)
    np.testing.assert_allclose(unpipelined, replayed, atol=1e-6, rtol=0)
    # TorchStreams moves its model: give it a copy, the fixture stays on CPU; torch attention, as above
    monkeypatch.setenv("SOUNDREACTOR_TRITON", "0")
    reference = run(TorchStreams(copy.deepcopy(model), slots=SLOTS, seed=10, device="cuda"), frames)
    np.testing.assert_allclose(replayed, reference, atol=1e-5, rtol=0)  # the same kernels, in the same order
    assert 0 < graph.timings["token_level"] < graph.timings["waveform_level"]


@cuda
def test_cuda_step_device_equals_step(model, frames):
    host = GraphStreams(model, SLOTS, 3, "cuda", use_triton=False)
    device = GraphStreams(model, SLOTS, 3, "cuda", use_triton=False)
    for i in range(10):
        expected = host.step(batch(frames, i), active_mask(i))
        audio = device.step_device(torch.from_numpy(batch(frames, i)).cuda(), active_mask(i))
        # two instances replay the same kernels: equal, up to a cuBLAS kernel choice at most
        np.testing.assert_allclose(audio.cpu().numpy(), expected, atol=1e-6, rtol=0)


@cuda
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_triton_kernels_match_the_torch_paths(model, frames, dtype, tolerance):
    if kernels_interpreted():
        pytest.skip("kernels defined under TRITON_INTERPRET=1 cannot be captured: run with --noconftest")
    kernel = run(GraphStreams(model, SLOTS, 10, "cuda", dtype, use_triton=True), frames)
    reference = run(GraphStreams(model, SLOTS, 10, "cuda", dtype, use_triton=False), frames)
    # fp32: the kernel sums in another order (1e-5 per call on its own); bf16: within the bf16 vs fp32 bound
    error = np.abs(kernel - reference).max() / np.abs(reference).max()
    assert error < tolerance, error
