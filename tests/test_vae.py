"""Causal Oobleck VAE: official key layout, weight-norm folding, checkpoint loading, streaming == offline."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from tolerance import rounding_atol
from torch import nn

from soundreactor.config import paper, tiny
from soundreactor.model.vae import (
    AudioVAE,
    CausalConv1d,
    CausalConvTranspose1d,
    FoldedSnakeBeta,
    SnakeBeta,
    fold_snakes,
    fold_weight_norm,
    vae_state_from_official,
)

HOP = 1600


def depth(module: nn.Module) -> int:
    """Rounding steps a signal passes through: every conv and snake (the depth factor of `rounding_atol`)."""
    kinds = (nn.Conv1d, nn.ConvTranspose1d, SnakeBeta, FoldedSnakeBeta)
    return sum(isinstance(m, kinds) for m in module.modules())


@pytest.fixture(scope="module")
def paper_vae() -> AudioVAE:
    with torch.device("meta"):
        return AudioVAE(paper().vae)


@pytest.fixture(scope="module")
def tiny_vae() -> AudioVAE:
    torch.manual_seed(0)
    vae = AudioVAE(tiny().vae).eval()
    with torch.no_grad():  # non-trivial snake parameters, so a wrong exp/log would show
        for m in vae.modules():
            if isinstance(m, SnakeBeta):
                m.alpha.normal_(0, 0.3)
                m.beta.normal_(0, 0.3)
    return vae


def test_paper_key_layout_matches_official(paper_vae):
    shapes = {k: list(v.shape) for k, v in paper_vae.state_dict().items()}
    # Official keys (SPEC 2.3) with weight_g/weight_v folded into weight.
    assert shapes["decoder.layers.0.weight"] == [2048, 64, 7]
    assert shapes["decoder.layers.1.layers.0.alpha"] == [2048]
    assert shapes["decoder.layers.1.layers.1.weight"] == [2048, 1024, 16]  # ConvTranspose [in, out, 2*8]
    assert shapes["decoder.layers.5.layers.1.weight"] == [128, 128, 4]
    assert shapes["decoder.layers.5.layers.4.layers.1.weight"] == [128, 128, 7]  # dilation-9 unit
    assert shapes["decoder.layers.7.weight"] == [2, 128, 7]
    assert "decoder.layers.7.bias" not in shapes
    assert shapes["encoder.layers.5.layers.4.weight"] == [2048, 1024, 16]  # 1024->2048, stride 8
    assert shapes["encoder.layers.7.weight"] == [128, 2048, 3]  # mean and log-variance
    assert paper_vae.decoder.layers[3].layers[4].layers[1].dilation == (9,)


def test_paper_decoder_size_and_cost(paper_vae):
    # SPEC 2.3: about 75M parameters and 1.95 GMAC per latent frame.
    params = sum(p.numel() for p in paper_vae.decoder.parameters())
    assert 74e6 < params < 76e6, params
    macs, rate = 0, 1  # rate: samples per latent frame at the current depth
    for m in paper_vae.decoder.modules():
        if isinstance(m, nn.Conv1d | nn.ConvTranspose1d):
            macs += rate * m.weight.numel()
        if isinstance(m, CausalConvTranspose1d):
            rate *= m.stride[0]
    assert rate == HOP
    assert abs(macs / 1e9 - 1.95) < 0.01, macs


def test_paper_streaming_state_size(paper_vae):
    decoder = paper_vae.decoder
    assert decoder.state_size() == 173_696  # SPEC 2.3
    shapes = decoder.state_shapes(3)
    assert shapes[0] == (3, 64, 6)  # first conv k7 history
    assert shapes[1] == (3, 1024, 8)  # first transposed conv tail: k - stride = 8
    assert shapes[2] == (3, 1024, 6)  # dilation 1 unit: (7-1)*1
    assert shapes[3] == (3, 1024, 18)
    assert shapes[-1] == (3, 128, 6)
    assert len(shapes) == 22 == decoder.n_states


def test_snake_beta_log_scale(tiny_vae):
    snake = copy.deepcopy(tiny_vae.decoder.layers[6]).double()
    x = torch.randn(2, snake.alpha.numel(), 5, dtype=torch.float64)
    a = snake.alpha.detach().numpy()[:, None]
    b = snake.beta.detach().numpy()[:, None]
    ref = x.numpy() + np.sin(np.exp(a) * x.numpy()) ** 2 / (np.exp(b) + 1e-9)  # SPEC 2.3
    with torch.no_grad():
        np.testing.assert_allclose(snake(x).numpy(), ref, atol=1e-12)


def test_folded_snakes_decode_as_the_reference(tiny_vae):
    """fold_snakes swaps every SnakeBeta for precomputed scales: the streaming decoder's audio stays the same."""
    folded = copy.deepcopy(tiny_vae.decoder)
    fold_snakes(folded)
    snakes = sum(isinstance(m, SnakeBeta) for m in tiny_vae.decoder.modules())
    assert snakes > 0 and sum(isinstance(m, FoldedSnakeBeta) for m in folded.modules()) == snakes
    assert not any(isinstance(m, SnakeBeta) for m in folded.modules())
    torch.manual_seed(5)
    z = torch.randn(2, 64, 6)
    state, folded_state = (d.init_state(2, "cpu", torch.float32) for d in (tiny_vae.decoder, folded))
    with torch.no_grad():
        for i in range(z.shape[-1]):
            audio, state = tiny_vae.decoder.step(z[:, :, i], state)
            folded_audio, folded_state = folded.step(z[:, :, i], folded_state)
            # the same products in fp32; addcmul rounds once where the reference rounds twice, in every layer
            # (measured 1.07e-6 on an AVX2 CPU, under 1e-6 on AVX-512)
            atol = rounding_atol(audio, depth(folded))
            torch.testing.assert_close(folded_audio, audio, atol=atol, rtol=0)
    assert audio.abs().max() > 0.05


def _reference_conv(x, w, b, stride, dilation):
    """Direct definition of the causal conv in loops: inputs before the start are zero."""
    k = w.shape[-1]
    pad = (k - 1) * dilation + 1 - stride
    length = x.shape[-1] // stride
    y = np.zeros((w.shape[0], length))
    for t in range(length):
        for m in range(k):
            src = t * stride - pad + m * dilation
            if src >= 0:  # causal: before the start is zero
                y[:, t] += w[:, :, m] @ x[:, src]
    return y + (b[:, None] if b is not None else 0)


def _reference_conv_transpose(x, w, b, stride):
    """Scatter definition of the transposed conv, keeping the first len*stride samples."""
    k = w.shape[-1]
    y = np.zeros((w.shape[1], x.shape[-1] * stride + k))
    for j in range(x.shape[-1]):
        for m in range(k):
            y[:, j * stride + m] += w[:, :, m].T @ x[:, j]
    return y[:, : x.shape[-1] * stride] + b[:, None]


@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "bias"),
    [(7, 1, 3, True), (7, 1, 1, False), (10, 5, 1, True), (3, 1, 1, True)],
)
def test_causal_conv_against_direct_definition(kernel, stride, dilation, bias):
    torch.manual_seed(1)
    conv = CausalConv1d(3, 4, kernel, stride=stride, dilation=dilation, bias=bias).double()
    x = torch.randn(1, 3, 40, dtype=torch.float64)
    ref = _reference_conv(
        x[0].numpy(),
        conv.weight.detach().numpy(),
        conv.bias.detach().numpy() if bias else None,
        stride,
        dilation,
    )
    np.testing.assert_allclose(conv(x)[0].detach().numpy(), ref, atol=1e-12)


def test_causal_conv_transpose_against_direct_definition():
    torch.manual_seed(2)
    conv = CausalConvTranspose1d(3, 4, 10, 5).double()
    x = torch.randn(1, 3, 9, dtype=torch.float64)
    ref = _reference_conv_transpose(x[0].numpy(), conv.weight.detach().numpy(), conv.bias.detach().numpy(), 5)
    np.testing.assert_allclose(conv(x)[0].detach().numpy(), ref, atol=1e-12)


@pytest.mark.parametrize(
    ("module", "dim"),
    [(nn.Conv1d(6, 5, 7), 0), (nn.ConvTranspose1d(8, 4, 10, stride=5), 0), (nn.Conv1d(6, 5, 3), 1)],
)
def test_fold_weight_norm_matches_torch(module, dim):
    torch.manual_seed(3)
    wn = torch.nn.utils.weight_norm(module, dim=dim)
    state = {k: torch.randn_like(v) for k, v in wn.state_dict().items()}
    state["weight_g"] = state["weight_g"].abs() + 0.1
    wn.load_state_dict(state)
    wn(torch.zeros(1, module.in_channels, 8))  # legacy weight norm recomputes `weight` in a pre-forward hook
    if isinstance(module, nn.ConvTranspose1d):
        assert list(state["weight_g"].shape) == [8, 1, 1]  # dim 0 is the input channel here too
    folded = fold_weight_norm({"conv." + k: v for k, v in state.items()})
    assert sorted(folded) == ["conv.bias", "conv.weight"]
    # g v / ||v|| in another order than torch's: one norm (a sum over the fan-in) and one product apart
    atol = rounding_atol(wn.weight.detach(), depth=2)
    torch.testing.assert_close(folded["conv.weight"], wn.weight.detach(), atol=atol, rtol=0)


def _official_state(vae: AudioVAE, prefix: str, parametrized: bool = False) -> dict:
    """The official layout: every conv under torch's weight norm (legacy, or the parametrized one that replaces it),
    v rescaled (same weight), inside a Lightning-style `state_dict` next to a discriminator."""
    official = copy.deepcopy(vae)
    for m in official.modules():
        if isinstance(m, nn.Conv1d | nn.ConvTranspose1d):
            if parametrized:
                torch.nn.utils.parametrizations.weight_norm(m)
            else:
                torch.nn.utils.weight_norm(m)
    state = official.state_dict()
    for k in state:
        if k.endswith(("weight_v", "original1")):
            state[k] = state[k] * (1 + torch.rand(()))
    return {
        "state_dict": {prefix + k: v for k, v in state.items()} | {"discriminator.conv.weight": torch.ones(2)}
    }


def decodes_as(state: dict, vae: AudioVAE) -> None:
    loaded = AudioVAE(tiny().vae).eval()
    loaded.load_state_dict(state)
    z = torch.randn(1, 64, 3)
    with torch.no_grad():
        reference = vae.decode(z)
        # g v / ||v|| recomputed: one norm and one product apart per conv
        atol = rounding_atol(reference, depth(vae.decoder))
        torch.testing.assert_close(loaded.decode(z), reference, atol=atol, rtol=1e-5)


LEGACY, PARAMETRIZED = (
    "legacy weight norm (weight_g/weight_v)",
    "parametrized weight norm (parametrizations.weight.original0/original1)",
)


@pytest.mark.parametrize("parametrized", [False, True])
@pytest.mark.parametrize(
    "prefix", ["", "autoencoder.", "model.", "module.", "_orig_mod.", "pretransform.model."]
)
def test_official_checkpoint_loads_with_prefix(tiny_vae, prefix, parametrized):
    raw = _official_state(tiny_vae, prefix, parametrized)
    g_key = "parametrizations.weight.original0" if parametrized else "weight_g"
    assert f"{prefix}decoder.layers.1.layers.1.{g_key}" in raw["state_dict"]
    state, layout = vae_state_from_official(raw, tiny().vae)
    assert layout.prefix == prefix and not layout.ema and layout.dropped == 1
    assert layout.weight_norm == ((PARAMETRIZED,) if parametrized else (LEGACY,))
    assert all(v.dtype == torch.float32 for v in state.values())
    decodes_as(state, tiny_vae)


def test_ema_copy_is_chosen_and_the_online_one_on_request(tiny_vae):
    """A stable-audio-tools training checkpoint: online weights, the EMA copy, ema_pytorch's online reference."""
    torch.manual_seed(9)
    ema_vae = AudioVAE(tiny().vae).eval()
    online = _official_state(tiny_vae, "autoencoder.")["state_dict"]
    ema = _official_state(ema_vae, "autoencoder_ema.ema_model.", parametrized=True)["state_dict"]
    reference = {k.replace("autoencoder.", "autoencoder_ema.online_model."): v for k, v in online.items()}
    raw = {"state_dict": online | ema | reference, "epoch": 3}

    state, layout = vae_state_from_official(raw, tiny().vae)
    assert layout.prefix == "autoencoder_ema.ema_model." and layout.ema
    assert set(layout.others) == {"autoencoder.", "autoencoder_ema.online_model."}
    assert "(EMA copy)" in layout.describe() and "--vae-prefix" in layout.describe()
    decodes_as(state, ema_vae)

    state, layout = vae_state_from_official(raw, tiny().vae, weights="online")
    assert layout.prefix == "autoencoder." and not layout.ema and layout.weight_norm == (LEGACY,)
    decodes_as(state, tiny_vae)

    state, layout = vae_state_from_official(raw, tiny().vae, prefix="autoencoder_ema.online_model.")
    decodes_as(state, tiny_vae)
    with pytest.raises(ValueError, match=r"no VAE keys under prefix 'nope\.'.*'autoencoder\.'"):
        vae_state_from_official(raw, tiny().vae, prefix="nope.")
    with pytest.raises(ValueError, match=r"only EMA copies.*--vae-weights ema"):
        vae_state_from_official(ema, tiny().vae, weights="online")
    with pytest.raises(ValueError, match="VAE weights must be one of ema, online"):
        vae_state_from_official(ema, tiny().vae, weights="best")


def test_loader_rejects_bad_checkpoints(tiny_vae):
    cfg = tiny().vae
    good = _official_state(tiny_vae, "autoencoder.")["state_dict"]

    missing = {k: v for k, v in good.items() if not k.startswith("autoencoder.decoder.layers.7.")}
    with pytest.raises(ValueError, match=r"missing: 1 \(decoder\.layers\.7\.weight\)"):
        vae_state_from_official(missing, cfg)

    misshaped = good | {"autoencoder.decoder.layers.0.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"mis-shaped: 1 \(decoder\.layers\.0\.bias \[5\] != \[64\]\)"):
        vae_state_from_official(misshaped, cfg)

    unexpected = good | {"autoencoder.decoder.layers.9.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected: 1 \(decoder\.layers\.9\.weight\)"):
        vae_state_from_official(unexpected, cfg)

    relabelled = good | {"autoencoder.decoder.layers.0.bias": good["autoencoder.decoder.layers.0.bias"].int()}
    with pytest.raises(
        ValueError, match=r"non-float weights: 1 \(decoder\.layers\.0\.bias \(torch\.int32\)\)"
    ):
        vae_state_from_official(relabelled, cfg)

    with pytest.raises(ValueError, match="does not fit"):  # paper shapes against a tiny file
        vae_state_from_official(good, paper().vae)

    two = good | {"other." + k: v for k, v in good.items()}  # two online copies: nothing to prefer
    with pytest.raises(
        ValueError, match=r"several VAE copies .*'autoencoder\.', 'other\.autoencoder\.'.*--vae-prefix"
    ):
        vae_state_from_official(two, cfg)
    assert vae_state_from_official(two, cfg, prefix="other.autoencoder.")[1].prefix == "other.autoencoder."

    with pytest.raises(ValueError, match=r"no `encoder\.layers"):
        vae_state_from_official({"model.weight": torch.zeros(1)}, cfg)

    with pytest.raises(ValueError, match=r"conv\.weight_g \(g\) has no matching weight-norm v"):
        fold_weight_norm({"conv.weight_g": torch.ones(2, 1, 1)})
    with pytest.raises(ValueError, match="does not fit"):
        fold_weight_norm({"conv.weight_g": torch.ones(3, 1, 1), "conv.weight_v": torch.ones(2, 4, 1)})
    with pytest.raises(ValueError, match=r"original1 \(v\) has no matching weight-norm g"):
        fold_weight_norm({"conv.parametrizations.weight.original1": torch.ones(2, 1, 1)})


@torch.no_grad()
def streamed(decoder, z: torch.Tensor) -> torch.Tensor:
    """`z` [B, 64, frames] decoded one frame at a time through `step`, checking that every step leaves the state
    it was given untouched and returns one of the same shapes."""
    state = decoder.init_state(z.shape[0], "cpu", torch.float32)
    assert [tuple(s.shape) for s in state] == decoder.state_shapes(z.shape[0])
    chunks = []
    for i in range(z.shape[-1]):
        before = [s.clone() for s in state]
        audio, new_state = decoder.step(z[:, :, i], state)
        assert all(torch.equal(a, b) for a, b in zip(before, state, strict=True))  # inputs untouched
        assert [s.shape for s in new_state] == [s.shape for s in state]
        chunks.append(audio)
        state = new_state
    return torch.cat(chunks, -1)


def test_streaming_matches_offline_and_is_pure(tiny_vae):
    torch.manual_seed(4)
    frames = 12
    z = torch.randn(2, 64, frames)
    with torch.no_grad():
        offline = tiny_vae.decode(z)
    assert offline.shape == (2, 2, frames * HOP)
    assert offline.abs().max() > 0.05  # a silent decoder would make the comparison vacuous
    # the same convolutions on chunks with carried state: each layer's sums may block differently
    atol = rounding_atol(offline, depth(tiny_vae.decoder))
    torch.testing.assert_close(streamed(tiny_vae.decoder, z), offline, atol=atol, rtol=0)


def test_zero_lookahead(tiny_vae):
    torch.manual_seed(5)
    z = torch.randn(1, 64, 8)
    changed = z.clone()
    changed[:, :, 5:] = torch.randn(1, 64, 3)
    with torch.no_grad():
        a, b = tiny_vae.decode(z), tiny_vae.decode(changed)
    # Frames 0..4 must not see frames 5..7 (rounding only: a conv may block its sums by sequence length);
    # frame 5 itself must change.
    atol = rounding_atol(a[..., : 5 * HOP], depth(tiny_vae.decoder))
    torch.testing.assert_close(a[..., : 5 * HOP], b[..., : 5 * HOP], atol=atol, rtol=0)
    assert (a[..., 5 * HOP : 6 * HOP] - b[..., 5 * HOP : 6 * HOP]).abs().max() > 1e-3


def test_encode_shapes_and_errors(tiny_vae):
    with torch.no_grad():
        latents = tiny_vae.encode(torch.randn(2, 2, 3 * HOP))
    assert latents.shape == (2, 64, 3)
    with pytest.raises(ValueError, match="multiple of 1600"):
        tiny_vae.encode(torch.randn(1, 2, HOP + 1))
    with pytest.raises(ValueError, match=r"\[batch, 2, T\]"):
        tiny_vae.encode(torch.randn(1, 1, HOP))
    with pytest.raises(ValueError, match=r"\[batch, 64, frames\]"):
        tiny_vae.decode(torch.randn(1, 32, 2))
    state = tiny_vae.decoder.init_state(1, "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"\[batch, 64\]"):
        tiny_vae.decoder.step(torch.randn(1, 64, 1), state)
    with pytest.raises(ValueError, match="22 tensors of init_state"):
        tiny_vae.decoder.step(torch.randn(1, 64), state[:-1])


@pytest.fixture(scope="module")
def nearest_vae(tiny_vae) -> AudioVAE:
    """The tiny VAE with nearest-upsample + conv in the decoder (VAEConfig.upsample), non-trivial snakes."""
    torch.manual_seed(1)
    vae = AudioVAE(dataclasses.replace(tiny().vae, upsample="nearest")).eval()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, SnakeBeta):
                m.alpha.normal_(0, 0.3)
                m.beta.normal_(0, 0.3)
    return vae


def test_nearest_upsampling_streams_as_offline_and_keeps_the_key_names(tiny_vae, nearest_vae):
    transposed_keys = {k for k in tiny_vae.state_dict() if ".bias" not in k and "weight" not in k}
    assert transposed_keys <= set(nearest_vae.state_dict())  # snakes and units keep their names
    assert {k for k in nearest_vae.state_dict() if "decoder.layers.1.layers.1." in k} == {
        "decoder.layers.1.layers.1.weight",
        "decoder.layers.1.layers.1.bias",
    }
    torch.manual_seed(6)
    z = torch.randn(1, 64, 8)
    with torch.no_grad():
        offline = nearest_vae.decode(z)
    assert offline.abs().max() > 0.05
    atol = rounding_atol(offline, depth(nearest_vae.decoder))
    torch.testing.assert_close(streamed(nearest_vae.decoder, z), offline, atol=atol, rtol=0)


def test_nearest_upsampling_decodes_a_constant_latent_without_a_frame_rate_pulse(tiny_vae, nearest_vae):
    """A constant latent sequence: nearest + conv gives every output phase the same sum of taps, so once the
    receptive field is inside the sequence the output is constant; the transposed conv's random taps give each
    of its stride's phases its own gain, a pattern that repeats every latent frame. The decoder's receptive
    field is about 21 latent frames (6 at the latent rate, (15 + 78) / 8 in the first block, less later)."""
    z = torch.full((1, 64, 40), 0.3)
    with torch.no_grad():
        nearest, transposed = nearest_vae.decode(z)[..., -HOP:], tiny_vae.decode(z)[..., -HOP:]
    assert nearest.abs().max() > 1e-3 and transposed.abs().max() > 1e-3
    spread = (nearest.amax(-1) - nearest.amin(-1)).max()
    assert spread <= rounding_atol(nearest, depth(nearest_vae.decoder))
    assert (transposed.amax(-1) - transposed.amin(-1)).max() > 0.1 * transposed.abs().max()


@pytest.fixture(scope="module")
def panned_vae(tiny_vae) -> AudioVAE:
    """The tiny VAE made parametric-stereo (VAEConfig.stereo "pan") by panned_copy's surgery: its snakes."""
    from soundreactor.training.vae import panned_copy

    audio = torch.randn(2, 2, 4 * HOP, generator=torch.Generator().manual_seed(1)) * 0.1
    return panned_copy(tiny_vae, audio)[0].eval()


def test_a_panned_decoder_streams_as_offline_with_one_more_state(tiny_vae, panned_vae):
    shapes = panned_vae.decoder.state_shapes(3)
    assert shapes[:-1] == tiny_vae.decoder.state_shapes(3) and shapes[-1] == (3, 1, 1)
    assert panned_vae.state_dict().keys() == tiny_vae.state_dict().keys()  # no weights of its own
    torch.manual_seed(7)
    z = torch.randn(2, 64, 8)
    with torch.no_grad():
        offline = panned_vae.decode(z)
    assert offline.shape == (2, 2, 8 * HOP) and offline.abs().max() > 0.01
    atol = rounding_atol(offline, depth(panned_vae.decoder))
    torch.testing.assert_close(streamed(panned_vae.decoder, z), offline, atol=atol, rtol=0)


def test_a_panned_decoder_places_its_mono_output_by_the_last_latent_channel(panned_vae):
    """Left = mono cos(a), right = mono sin(a), a = pi/4 (1 + tanh(l)), where l goes linearly from the previous
    frame's last latent channel (0 before the first) to this frame's over PAN_RAMP samples, then holds; computed
    here in float64, the mono waveform taken from the layers before the pan."""
    from soundreactor.model.vae import PAN_RAMP

    torch.manual_seed(8)
    z = torch.randn(1, 64, 5)
    with torch.no_grad():
        audio = panned_vae.decode(z).double()
        mono = panned_vae.decoder.layers(z).double()[0, 0]
    logits = z[0, -1].double()
    previous = torch.cat([torch.zeros(1, dtype=torch.float64), logits[:-1]])
    ramp = (torch.arange(1, HOP + 1, dtype=torch.float64) / PAN_RAMP).clamp(max=1)
    per_sample = (previous[:, None] + (logits - previous)[:, None] * ramp).flatten()
    angle = np.pi / 4 * (1 + torch.tanh(per_sample))
    # the mono waveform is the decoder's own float32 output: only the pan's ops round (ramp multiply-add, tanh,
    # the angle's scaling, cos / sin, the product), a handful of float32 roundings of the output's magnitude
    atol = rounding_atol(audio, 8, torch.float32)
    torch.testing.assert_close(audio[0, 0], mono * torch.cos(angle), atol=atol, rtol=0)
    torch.testing.assert_close(audio[0, 1], mono * torch.sin(angle), atol=atol, rtol=0)
    assert (logits.max() - logits.min()) > 0.5  # the frames pan differently: the ramp is exercised
    # equal power: the channels' energies sum to the mono waveform's at every sample
    energy_atol = 2 * atol * float(mono.abs().max())  # d(m^2) = 2 m dm
    torch.testing.assert_close(audio[0].square().sum(0), mono.square(), atol=energy_atol, rtol=0)


def test_the_panned_encoder_s_last_channel_is_each_frame_s_pan(panned_vae):
    """A noise source panned by gains cos(x pi/2), sin(x pi/2) (the synthetic scenes' law) has pan logit
    atanh(2x - 1), whatever its level; a silent frame is centred (0); the channel has no posterior noise."""
    from soundreactor.model.vae import LOGVAR_DETERMINISTIC

    xs = torch.tensor([0.1, 0.3, 0.5, 0.8, 0.95, 0.5])
    levels = torch.tensor([0.3, 0.01, 0.1, 0.5, 0.2, 0.0])  # the last frame silent
    noise = torch.randn(len(xs), HOP, generator=torch.Generator().manual_seed(3))
    mono = (levels[:, None] * noise).flatten()
    gains = torch.stack([torch.cos(xs * np.pi / 2), torch.sin(xs * np.pi / 2)]).repeat_interleave(HOP, dim=1)
    audio = (gains * mono)[None]
    with torch.no_grad():
        out = panned_vae.encoder(audio)
    expected = torch.atanh(2 * xs.double() - 1)
    expected[-1] = 0.0
    # float32 energies summed over 1600 samples (relative error ~1e-5), through asin and atanh (slope up to 5.3
    # at x = 0.95)
    torch.testing.assert_close(out[0, 63].double(), expected, atol=1e-4, rtol=0)
    assert (out[0, 127] == LOGVAR_DETERMINISTIC).all()
    assert out.shape == (1, 128, len(xs)) and out[0, :63].std() > 0  # the learned channels are there too


def test_stereo_must_be_channels_or_pan_with_two_channels():
    with pytest.raises(ValueError, match=r"VAEConfig\.stereo must be one of"):
        dataclasses.replace(tiny().vae, stereo="mid-side")
    with pytest.raises(ValueError, match="pans into 2 channels"):
        dataclasses.replace(tiny().vae, stereo="pan", audio_channels=1)
    with pytest.raises(ValueError, match="at least 2 latent channels"):
        dataclasses.replace(tiny().vae, stereo="pan", latent_dim=1)
