"""Diffusion head (network, EDM preconditioning, init) and the consistency / Heun samplers."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from tolerance import module_depth, rounding_atol
from torch import Tensor

from soundreactor.config import HeadConfig, SamplerConfig, tiny
from soundreactor.model.head import DiffusionHead
from soundreactor.model.samplers import (
    consistency_sample,
    heun_sample,
    karras_times,
    noise_shape,
    sample,
)
from soundreactor.noise import NoiseSource

LATENT, COND = 8, 128  # tiny preset: cond = 2 * d_model


def make_head(seed: int = 0, **changes: float) -> DiffusionHead:
    torch.manual_seed(seed)
    return DiffusionHead(dataclasses.replace(tiny().head, **changes), LATENT, COND).eval()


def reference_network(head: DiffusionHead, x_in: Tensor, c_noise: Tensor, z: Tensor) -> Tensor:
    """The MAR adaLN MLP written out from the state dict, independently of the module code."""
    sd, cfg = head.state_dict(), head.cfg

    def linear(x: Tensor, name: str) -> Tensor:
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def adaln(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return F.layer_norm(x, (cfg.width,), eps=1e-6) * (1 + scale) + shift

    half = cfg.freq_dim // 2
    angles = c_noise[:, None] * 10_000.0 ** (-torch.arange(half) / half)
    time = linear(F.silu(linear(torch.cat((angles.cos(), angles.sin()), -1), "time_mlp.0")), "time_mlp.2")
    cond = linear(z, "cond_proj") + time
    x = linear(x_in, "input_proj")
    for i in range(cfg.depth):
        shift, scale, gate = linear(F.silu(cond), f"blocks.{i}.ada.1").chunk(3, -1)
        x = x + gate * linear(
            F.silu(linear(adaln(x, shift, scale), f"blocks.{i}.mlp.0")), f"blocks.{i}.mlp.2"
        )
    shift, scale = linear(F.silu(cond), "final.ada.1").chunk(2, -1)
    return linear(adaln(x, shift, scale), "final.linear")


@torch.no_grad()
def test_network_matches_written_out_reference() -> None:
    head = make_head()
    x, c_noise, z = torch.randn(3, LATENT), torch.tensor([-1.5, 0.0, 1.1]), torch.randn(3, COND)
    torch.testing.assert_close(
        head(x, c_noise, z), reference_network(head, x, c_noise, z), atol=1e-5, rtol=1e-5
    )


@torch.no_grad()
def test_edm_preconditioning() -> None:
    head = make_head(sigma_data=0.7)
    x, z = torch.randn(3, LATENT), torch.randn(3, COND)
    t = torch.tensor([0.002, 0.9, 80.0])
    expected = []
    for b, tb in enumerate(t.tolist()):  # EDM table 1, per row in float64 scalars
        c_skip = 0.7**2 / (tb**2 + 0.7**2)
        c_out = tb * 0.7 / math.sqrt(tb**2 + 0.7**2)
        c_in = 1 / math.sqrt(tb**2 + 0.7**2)
        f = head(c_in * x[b : b + 1], torch.tensor([math.log(tb) / 4]), z[b : b + 1])
        expected.append(c_skip * x[b] + c_out * f[0])
    torch.testing.assert_close(head.denoise(x, t, z), torch.stack(expected), atol=1e-5, rtol=1e-5)
    # a Python float t (what the samplers pass: scalings in float64 on the host) against the same table
    for b, tb in enumerate(t.tolist()):
        denoised = head.denoise(x[b : b + 1], tb, z[b : b + 1])[0]
        torch.testing.assert_close(denoised, expected[b], atol=1e-5, rtol=1e-5)
    # the scalings in float64 on the host against float32 on the tensor: one rounding per layer apart
    reference = head.denoise(x, torch.full((3,), 0.9), z)
    atol = rounding_atol(reference, module_depth(head))
    torch.testing.assert_close(head.denoise(x, 0.9, z), reference, atol=atol, rtol=0)


@torch.no_grad()
def test_random_head_is_not_degenerate_and_seeded() -> None:
    head = make_head()
    x, z = torch.randn(4, LATENT), torch.randn(4, COND)
    c_skip_only = 0.25 / (1.0 + 0.25) * x  # D at t = 1 if F were zero
    assert (head.denoise(x, 1.0, z) - c_skip_only).abs().mean() > 0.05
    assert (head(x, torch.zeros(4), z) - head(x, torch.zeros(4), torch.randn(4, COND))).abs().mean() > 1e-3
    assert (head(x, torch.zeros(4), z) - head(x, torch.ones(4), z)).abs().mean() > 1e-3
    same, other = make_head(seed=0).state_dict(), make_head(seed=1).state_dict()
    assert all(torch.equal(v, same[k]) for k, v in head.state_dict().items())
    assert not torch.equal(other["final.linear.weight"], same["final.linear.weight"])


def test_head_rejects_wrong_shapes() -> None:
    head = make_head()
    with pytest.raises(ValueError, match=r"expected x \[B, 8\]"):
        head.denoise(torch.randn(2, LATENT + 1), 1.0, torch.randn(2, COND))


@pytest.mark.parametrize("nfe", [1, 2, 4])
@torch.no_grad()
def test_consistency_sampler_matches_hand_unrolled(nfe: int) -> None:
    head = make_head(latent_scale=0.7)
    cfg = SamplerConfig(nfe=nfe)
    z = torch.randn(2, COND)
    noise = torch.randn(2, *noise_shape(cfg, LATENT))
    assert noise.shape == (2, nfe, LATENT)
    d, e = head.denoise, noise.unbind(1)
    if nfe == 1:
        x0 = d(80.0 * e[0], 80.0, z)
    elif nfe == 2:
        x0 = d(d(80.0 * e[0], 80.0, z) + 0.821 * e[1], 0.821, z)
    else:
        x0 = d(80.0 * e[0], 80.0, z)
        x0 = d(x0 + 24.4 * e[1], 24.4, z)
        x0 = d(x0 + 5.84 * e[2], 5.84, z)
        x0 = d(x0 + 0.9 * e[3], 0.9, z)
    expected = 0.7 * x0
    torch.testing.assert_close(
        consistency_sample(head, z, noise, cfg.consistency_steps[nfe]), expected, atol=0, rtol=0
    )
    torch.testing.assert_close(sample(head, z, noise, cfg), expected, atol=0, rtol=0)


def test_karras_times() -> None:
    times = karras_times(18, 0.002, 80.0, 7.0)
    assert len(times) == 19 and times[-1] == 0.0
    assert times[0] == pytest.approx(80.0, rel=1e-12) and times[-2] == pytest.approx(0.002, rel=1e-12)
    assert all(a > b for a, b in itertools.pairwise(times))
    # EDM eq. 5 at i = 9
    assert times[9] == pytest.approx(
        (80.0 ** (1 / 7) + 9 / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7, rel=1e-12
    )
    assert karras_times(1, 0.002, 80.0, 7.0) == (80.0, 0.0)
    with pytest.raises(ValueError, match="t_min"):
        karras_times(4, 0.0, 80.0, 7.0)


class FixedTargetHead:
    """D(x, t) = x0 for every input: the probability-flow ODE is a straight line from x_T to x0."""

    def __init__(self, x0: Tensor, latent_scale: float = 1.0) -> None:
        self.x0, self.cfg = x0, HeadConfig(latent_scale=latent_scale)

    def denoise(self, x: Tensor, t: float | Tensor, z: Tensor) -> Tensor:
        return self.x0.expand_as(x)


class GaussianHead:
    """Exact denoiser for data ~ N(0, std^2): D(x, t) = x std^2 / (std^2 + t^2).

    Its ODE solution from x_T at t_max is x(t) = x_T sqrt((std^2 + t^2) / (std^2 + t_max^2)).
    """

    def __init__(self, std: Tensor) -> None:
        self.std, self.cfg = std, HeadConfig()

    def denoise(self, x: Tensor, t: float | Tensor, z: Tensor) -> Tensor:
        return x * self.std**2 / (self.std**2 + t**2)


@torch.no_grad()
def test_heun_lands_on_fixed_target() -> None:
    torch.manual_seed(0)
    x0 = torch.randn(1, LATENT)
    head = FixedTargetHead(x0, latent_scale=2.0)
    noise = torch.randn(3, 1, LATENT)
    out = heun_sample(head, torch.zeros(3, COND), noise, SamplerConfig(kind="heun", heun_steps=6))
    torch.testing.assert_close(out, 2.0 * x0.expand(3, -1), atol=1e-5, rtol=0)


@torch.no_grad()
def test_heun_second_order_on_gaussian_data() -> None:
    std = torch.linspace(0.2, 1.5, LATENT, dtype=torch.float64)
    head = GaussianHead(std)
    torch.manual_seed(0)
    noise = torch.randn(4, 1, LATENT, dtype=torch.float64)
    exact = 80.0 * noise[:, 0] * std / torch.sqrt(std**2 + 80.0**2)  # x(0) of the exact ODE solution
    z = torch.zeros(4, COND)
    errors = []
    for steps in (32, 64):
        cfg = SamplerConfig(kind="heun", heun_steps=steps)
        errors.append(((heun_sample(head, z, noise, cfg) - exact) / exact).abs().max().item())
    assert errors[0] < 0.03  # measured 2.1% relative at 32 steps (the ODE bends sharply near t ~ std)
    assert errors[0] / errors[1] > 3.0  # halving the step roughly quarters the error: second order (4.3x)


def test_sampler_dispatch_and_noise_shapes() -> None:
    head = make_head()
    z = torch.randn(2, COND)
    heun = SamplerConfig(kind="heun", heun_steps=3)
    assert noise_shape(heun, LATENT) == (1, LATENT)
    noise = torch.randn(2, 1, LATENT)
    with torch.no_grad():
        torch.testing.assert_close(
            sample(head, z, noise, heun), heun_sample(head, z, noise, heun), atol=0, rtol=0
        )
    with pytest.raises(ValueError, match=r"noise must be \[B, 4, latent\]"):
        sample(head, z, torch.randn(2, 2, LATENT), SamplerConfig(nfe=4))
    with pytest.raises(ValueError, match=r"consistency_steps\[3\] must be 3 finite positive"):
        noise_shape(SamplerConfig(nfe=3, consistency_steps={3: (80.0, 1.0)}), LATENT)


def test_noise_is_reproducible_per_stream() -> None:
    cfg = SamplerConfig(nfe=2)

    def draw(seeds: list[int]) -> Tensor:
        return torch.from_numpy(NoiseSource(seeds, noise_shape(cfg, LATENT)).draw())

    first, again, other = draw([7, 8]), draw([7, 8]), draw([9, 8])
    assert first.shape == (2, 2, LATENT)
    assert torch.equal(first, again)
    assert torch.equal(first[1], other[1]) and not torch.equal(first[0], other[0])  # streams are independent
    head, z = make_head(), torch.randn(2, COND)
    with torch.no_grad():
        assert torch.equal(sample(head, z, first, cfg), sample(head, z, again, cfg))
