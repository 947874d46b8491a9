"""The per-frame graphs of SPEC 5 as torch modules over explicit state, and their manifest entries.

Batch = stream slots. Every graph takes `active` [B]: inactive slots get their state inputs back unchanged in the
state outputs (and silence from vae_decoder), so a runtime never edits state on the host and a whole frame can
replay from fixed buffers. Positions, the first-frame flag and has-previous-grid all derive from `frame_index`
inside the graphs; the host only counts frames.

One frame, in `manifest.FRAME_ORDER`:
    ar_audio     prev_latent, frame_index, active, k_cache, v_cache -> h_audio, k_cache_out, v_cache_out
    vision       frames, prev_grid, frame_index, active -> vision_token, grid
    ar_vision    vision_token, frame_index, guidance, active, k_cache, v_cache -> h_vision, k_cache_out, v_cache_out
    sampler      h_audio, h_vision, noise, prev_latent, active -> latent
    vae_decoder  latent, active, vae_state_* -> audio, vae_state_*_out
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from soundreactor.export.manifest import GraphSpec, TensorSpec
from soundreactor.model import attention, samplers
from soundreactor.model.soundreactor import SoundReactor
from soundreactor.model.transformer import CausalTransformer, audio_position, kv_heads, vision_position
from soundreactor.model.vae import OobleckDecoder
from soundreactor.model.video_tokens import VisionEncoder

ACTIVE = "slots that advance this frame; inactive slots get their state back unchanged"
FRAME_INDEX = "frames this slot has completed (i); frame i writes positions 2i (audio slot) and 2i+1 (vision)"


def keep_inactive(active: Tensor, new: Tensor, old: Tensor, slot_axis: int = 0) -> Tensor:
    shape = [1] * new.dim()
    shape[slot_axis] = -1
    return torch.where(active.view(shape), new, old)


def write_rows(cache: Tensor, rows: Tensor, pos: Tensor, active: Tensor) -> Tensor:
    """cache [L, B, Hkv, W, D] with rows [L, B, Hkv, D] stored at ring slot `pos mod W` of each active stream.

    Functional: one ScatterND for all layers. ONNX semantics make it copy `cache` into a new output tensor;
    TensorRT can alias the two instead and write in place with its KV-cache update layer (IKVCacheUpdateLayer,
    ONNX TensorScatter at opset 24, which takes [B', Hkv, W, D] caches: fold L into B' and repeat the write
    index per layer). Inactive streams write back the row they already hold.
    """
    layers, slots, heads, window, _ = cache.shape
    index = (
        torch.arange(layers, device=cache.device)[:, None, None],
        torch.arange(slots, device=cache.device)[None, :, None],
        torch.arange(heads, device=cache.device)[None, None, :],
        torch.remainder(pos, window)[None, :, None],
    )
    rows = torch.where(active[None, :, None, None], rows.to(cache.dtype), cache[index])
    return torch.index_put(cache, index, rows)


class TransformerStep(nn.Module):
    """`CausalTransformer.step` with the cache write made functional.

    Every layer attends over the *input* cache: `attention.window_attention` masks ring slot `pos mod W` and
    takes the step's own K/V directly, so reading before the write gives the same result as the in-place
    reference. Query 0's K/V of all layers are then written at once by `write_rows`.
    """

    def __init__(self, transformer: CausalTransformer) -> None:
        super().__init__()
        self.transformer = transformer

    def step(
        self, tokens: Tensor, pos: Tensor, active: Tensor, k_cache: Tensor, v_cache: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        tf = self.transformer
        new_k: list[Tensor] = []
        new_v: list[Tensor] = []
        hidden = tokens
        for i, layer in enumerate(tf.layers):
            attend = partial(
                self._attend, k_cache=k_cache[i], v_cache=v_cache[i], pos=pos, out=(new_k, new_v)
            )
            hidden = layer(hidden, attend)
        k_out = write_rows(k_cache, torch.stack(new_k), pos, active)
        v_out = write_rows(v_cache, torch.stack(new_v), pos, active)
        return tf.norm(hidden), k_out, v_out

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        pos: Tensor,
        out: tuple[list[Tensor], list[Tensor]],
    ) -> Tensor:
        out[0].append(k[:, 0])
        out[1].append(v[:, 0])
        tf = self.transformer
        return attention.window_attention(q, k, v, k_cache, v_cache, pos, tf.rope_cos, tf.rope_sin)


class AudioStepGraph(TransformerStep):
    def forward(
        self, prev_latent: Tensor, frame_index: Tensor, active: Tensor, k_cache: Tensor, v_cache: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        tokens = self.transformer.audio_token(prev_latent, frame_index == 0)[:, None]
        hidden, k_out, v_out = self.step(tokens, audio_position(frame_index), active, k_cache, v_cache)
        return hidden[:, 0], k_out, v_out


class VisionStepGraph(TransformerStep):
    def forward(
        self,
        vision_token: Tensor,
        frame_index: Tensor,
        guidance: Tensor,
        active: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # as CausalTransformer.vision_step: queries [v, null] at one position, only v's K/V written
        null_token = self.transformer.null.expand_as(vision_token)
        tokens = torch.stack((vision_token, null_token), dim=1)
        hidden, k_out, v_out = self.step(tokens, vision_position(frame_index), active, k_cache, v_cache)
        cond, null = hidden[:, 0], hidden[:, 1]
        return null + guidance.to(null.dtype)[:, None] * (cond - null), k_out, v_out


class VisionGraph(nn.Module):
    def __init__(self, vision: VisionEncoder) -> None:
        super().__init__()
        self.vision = vision

    def forward(
        self, frames: Tensor, prev_grid: Tensor, frame_index: Tensor, active: Tensor
    ) -> tuple[Tensor, Tensor]:
        # Resize + normalization stay fp32 in every precision (uint8 0..255 through the resize matrices);
        # the model dtype starts at DINOv2's patch embedding.
        images = self.vision.preprocess(frames).to(prev_grid.dtype)
        grid = self.vision.dinov2(images)
        token = self.vision.tokenizer(grid, prev_grid, frame_index > 0)
        return token, keep_inactive(active, grid, prev_grid)


class SamplerGraph(nn.Module):
    """The sampler's steps unrolled (step times are Python floats), so NFE is fixed per graph."""

    def __init__(self, model: SoundReactor) -> None:
        super().__init__()
        self.head = model.head
        self.sampler_cfg = model.config.sampler

    def forward(
        self, h_audio: Tensor, h_vision: Tensor, noise: Tensor, prev_latent: Tensor, active: Tensor
    ) -> Tensor:
        z = torch.cat((h_audio, h_vision), dim=-1)
        latent = samplers.sample(self.head, z, noise.to(z.dtype), self.sampler_cfg)
        return keep_inactive(active, latent, prev_latent)


class VaeDecoderGraph(nn.Module):
    def __init__(self, decoder: OobleckDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, latent: Tensor, active: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        audio, new_state = self.decoder.step(latent, list(state))
        audio = torch.where(active[:, None, None], audio, torch.zeros_like(audio)).float()
        return audio, *(keep_inactive(active, new, old) for new, old in zip(new_state, state, strict=True))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def frame_graphs(model: SoundReactor, slots: int) -> dict[str, tuple[nn.Module, GraphSpec]]:
    """Each graph's module and manifest entry, in frame order, for `slots` streams; dtype = the model's."""
    cfg = model.config
    tf = cfg.transformer
    dtype = dtype_name(next(model.parameters()).dtype)
    b, d, latent = slots, tf.d_model, cfg.vae.latent_dim
    nfe_draws = model.noise_shape()[0]

    def spec(name: str, shape: tuple[int, ...], meaning: str, kind: str = dtype, axis: int = 0) -> TensorSpec:
        return TensorSpec(name, tuple(shape), kind, meaning, axis)

    cache_shape = (tf.n_layers, b, kv_heads(tf), tf.window, tf.head_dim)
    caches_in = (
        spec("k_cache", cache_shape, "pre-RoPE keys, ring of W: slot a mod W holds position a", axis=1),
        spec("v_cache", cache_shape, "values, same ring layout as k_cache", axis=1),
    )
    caches_out = tuple(
        spec(f"{t.name}_out", t.shape, f"{t.name} with this step's row written at its ring slot", axis=1)
        for t in caches_in
    )
    cache_state = {"k_cache_out": "k_cache", "v_cache_out": "v_cache"}
    frame_index = spec("frame_index", (b,), FRAME_INDEX, "int64")
    active = spec("active", (b,), ACTIVE, "bool")
    prev_latent = spec("prev_latent", (b, latent), "x_(i-1), the latent of the slot's previous frame")
    grid_shape = (b, *cfg.grid_hw, cfg.dinov2.dim)
    frame_h, frame_w = model.input_hw
    vae_shapes = model.vae.decoder.state_shapes(b)
    vae_in = tuple(
        spec(f"vae_state_{k}", shape, "causal conv history / transposed-conv tail of the VAE decoder")
        for k, shape in enumerate(vae_shapes)
    )
    graphs = {
        "ar_audio": (
            AudioStepGraph(model.transformer),
            (prev_latent, frame_index, active, *caches_in),
            (
                spec("h_audio", (b, d), "h_a: transformer output at the audio slot (S when i = 0)"),
                *caches_out,
            ),
            cache_state,
        ),
        "vision": (
            VisionGraph(model.vision),
            (
                spec("frames", (b, frame_h, frame_w, 3), "RGB frames, channels last", "uint8"),
                spec("prev_grid", grid_shape, "DINOv2 patch grid of the slot's previous frame"),
                frame_index,
                active,
            ),
            (
                spec("vision_token", (b, d), "v_i, the frame's vision token"),
                spec("grid", grid_shape, "this frame's DINOv2 patch grid"),
            ),
            {"grid": "prev_grid"},
        ),
        "ar_vision": (
            VisionStepGraph(model.transformer),
            (
                spec("vision_token", (b, d), "v_i from the vision graph"),
                frame_index,
                spec("guidance", (b,), "classifier-free guidance weight w per slot", "float32"),
                active,
                *caches_in,
            ),
            (spec("h_vision", (b, d), "h_v = h_n + w (h_c - h_n)"), *caches_out),
            cache_state,
        ),
        "sampler": (
            SamplerGraph(model),
            (
                spec("h_audio", (b, d), "h_a from ar_audio"),
                spec("h_vision", (b, d), "h_v from ar_vision"),
                spec(
                    "noise", (b, nfe_draws, latent), "standard normal draws, one per sampler step", "float32"
                ),
                prev_latent,
                active,
            ),
            (spec("latent", (b, latent), "x_i, the frame's audio latent"),),
            {"latent": "prev_latent"},
        ),
        "vae_decoder": (
            VaeDecoderGraph(model.vae.decoder),
            (spec("latent", (b, latent), "x_i from the sampler"), active, *vae_in),
            (
                spec("audio", (b, cfg.vae.audio_channels, cfg.samples_per_frame), "48 kHz stereo", "float32"),
                *(spec(f"{t.name}_out", t.shape, f"next {t.name}") for t in vae_in),
            ),
            {f"{t.name}_out": t.name for t in vae_in},
        ),
    }
    return {
        name: (module.eval(), GraphSpec(name, f"{name}.onnx", inputs, outputs, state))
        for name, (module, inputs, outputs, state) in graphs.items()
    }


def example_inputs(spec: GraphSpec, device: torch.device) -> tuple[Tensor, ...]:
    """Zeros of every input's shape and dtype (the graphs have no value-dependent control flow)."""
    return tuple(torch.zeros(t.shape, dtype=getattr(torch, t.dtype), device=device) for t in spec.inputs)
