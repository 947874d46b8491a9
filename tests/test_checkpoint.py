"""Our checkpoint format, official-weight readers, and the errors a user sees for wrong files."""

import pytest
import torch
from safetensors.torch import save_file

from soundreactor.checkpoint import STORAGE_KEY, CheckpointError, read_tensor_file, save_checkpoint
from soundreactor.cli import main
from soundreactor.config import ModelConfig, paper, preset, tiny
from soundreactor.model.dinov2 import DinoV2
from soundreactor.model.soundreactor import SoundReactor, init_model
from soundreactor.model.vae import AudioVAE


@pytest.mark.parametrize("make", [paper, tiny])
def test_config_json_round_trip(make):
    config = make().replace(sampler={"nfe": 2, "guidance": 1.5})
    assert ModelConfig.from_json(config.to_json()) == config


def test_unknown_preset_and_bad_sampler():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="no consistency step times for nfe=3"):
        tiny().replace(sampler={"nfe": 3})


def test_checkpoint_round_trip(tmp_path):
    model, _ = init_model("tiny", seed=1)
    model.configure_sampling(nfe=2)
    path = tmp_path / "tiny.safetensors"
    model.save(path)
    loaded = SoundReactor.load(path)
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # computed buffers (resize matrices, RoPE tables, interpolated position embedding) are rebuilt identically
    frame = torch.randint(0, 256, (1, *model.input_hw, 3), dtype=torch.uint8)
    grid = torch.zeros(1, *model.config.grid_hw, model.config.dinov2.dim)
    with torch.no_grad():
        assert torch.equal(
            model.vision(frame, grid, torch.tensor([False]))[0],
            loaded.vision(frame, grid, torch.tensor([False]))[0],
        )


@pytest.mark.parametrize("narrow", ["float16", "bfloat16"])
def test_float32_stored_narrow_loads_as_the_rounded_float32(tmp_path, narrow):
    model, _ = init_model("tiny", seed=1)
    path = tmp_path / "half.safetensors"
    save_checkpoint(path, model.config, model.state_dict(), float32_as=narrow)
    loaded = SoundReactor.load(path)
    dtype = getattr(torch, narrow)
    for key, value in model.state_dict().items():
        want = value.to(dtype).float() if value.dtype == torch.float32 else value
        assert loaded.state_dict()[key].dtype == value.dtype and torch.equal(
            loaded.state_dict()[key], want
        ), key
    with pytest.raises(ValueError, match="float32_as must be one of"):
        save_checkpoint(path, model.config, model.state_dict(), float32_as="int8")


def test_unknown_storage_dtype_is_refused(tmp_path):
    model, _ = init_model("tiny", seed=1)
    path = tmp_path / "odd.safetensors"
    metadata = {"format": "soundreactor/1", "config": model.config.to_json(), STORAGE_KEY: "float8"}
    save_file(dict(model.state_dict()), str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"stored as 'float8'.*upgrade soundreactor"):
        SoundReactor.load(path)


def test_checkpoint_key_errors_name_every_problem(tmp_path):
    model, _ = init_model("tiny", seed=1)
    state = dict(model.state_dict())
    del state["head.input_proj.weight"]
    state["transformer.norm.weight"] = torch.zeros(3)
    state["transformer.extra"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path), metadata={"format": "soundreactor/1", "config": model.config.to_json()})
    with pytest.raises(CheckpointError) as err:
        SoundReactor.load(path)
    message = str(err.value)
    assert "missing keys: head.input_proj.weight" in message
    assert "unexpected keys: transformer.extra" in message
    assert "transformer.norm.weight: expected (64,), got (3,)" in message


def test_float_tensors_relabelled_as_int32_are_refused(tmp_path):
    """The same bytes read as int32 would load into float parameters as garbage (all-NaN audio)."""
    model, _ = init_model("tiny", seed=1)
    state = {k: v.view(torch.int32) if v.dtype == torch.float32 else v for k, v in model.state_dict().items()}
    path = tmp_path / "relabelled.safetensors"
    save_file(state, str(path), metadata={"format": "soundreactor/1", "config": model.config.to_json()})
    with pytest.raises(CheckpointError, match=r"mis-typed keys: .*expected torch\.float32, got torch\.int32"):
        SoundReactor.load(path)


def test_foreign_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="soundreactor init"):
        SoundReactor.load(tmp_path / "nope.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="lacks soundreactor metadata"):
        SoundReactor.load(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a soundreactor checkpoint"):
        SoundReactor.load(garbage)


class Payload:
    """Stands for any pickled object whose loading would run code."""


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "meta": Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        read_tensor_file(path)
    message = str(err.value)
    assert "could run arbitrary code, so it is refused" in message and "test_checkpoint.Payload" in message
    assert "safetensors.torch.save_file" in message  # how to convert it safely
    assert "weights_only" not in message and err.value.__cause__ is None  # never torch's advice to run it


def test_official_dinov2_file_loads_unchanged(tmp_path):
    """A .pth with exactly the official 176 keys loads into the paper preset through `init`."""
    with torch.random.fork_rng():
        torch.manual_seed(11)
        official = DinoV2(paper().dinov2, (37, 37)).state_dict()
    assert len(official) == 176
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official, path)
    model, notes = init_model("paper", dinov2=path)
    loaded = model.vision.dinov2.state_dict()
    assert all(torch.equal(loaded[k], official[k]) for k in official)
    assert any("DINOv2: 176 tensors" in line for line in notes)


def test_dinov2_file_for_another_size_is_refused(tmp_path):
    path = tmp_path / "dino.pth"
    torch.save(DinoV2(paper().dinov2, (37, 37)).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: blocks\.0\.attn\.proj\.bias"):
        init_model("tiny", dinov2=path)


def test_official_vae_checkpoint_with_prefix_and_weight_norm(tmp_path):
    """Legacy weight-norm keys under `autoencoder.` inside `state_dict`, as the released .ckpt stores them."""
    cfg = tiny().vae
    reference = AudioVAE(cfg)
    raw = {}
    for name, module in reference.named_modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            plain = (
                torch.nn.ConvTranspose1d if isinstance(module, torch.nn.ConvTranspose1d) else torch.nn.Conv1d
            )
            legacy = torch.nn.utils.weight_norm(
                plain(
                    module.in_channels,
                    module.out_channels,
                    module.kernel_size[0],
                    bias=module.bias is not None,
                )
            )
            raw[f"autoencoder.{name}.weight_g"] = legacy.weight_g.detach()
            raw[f"autoencoder.{name}.weight_v"] = legacy.weight_v.detach()
            if module.bias is not None:
                raw[f"autoencoder.{name}.bias"] = legacy.bias.detach()
    for name, tensor in reference.state_dict().items():
        if name.endswith(("alpha", "beta")):
            raw[f"autoencoder.{name}"] = torch.randn_like(tensor)
    path = tmp_path / "sr_causal_ds_1600_dim_64.ckpt"
    torch.save({"state_dict": raw}, path)
    model, notes = init_model("tiny", vae=path)
    assert any(
        "torch file, under 'state_dict'; key prefix 'autoencoder.'; legacy weight norm" in line
        for line in notes
    )
    v = raw["autoencoder.decoder.layers.0.weight_v"]
    g = raw["autoencoder.decoder.layers.0.weight_g"]
    folded = g * v / v.norm(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(model.vae.decoder.layers[0].weight, folded)


def test_init_cli_reaches_every_vae_loader_choice(tmp_path, capsys):
    """A training checkpoint with online and EMA copies (parametrized weight norm, as current PyTorch writes it)."""
    torch.manual_seed(2)
    online, ema = AudioVAE(tiny().vae), AudioVAE(tiny().vae)
    raw = {f"autoencoder.{k}": v for k, v in online.state_dict().items()}
    raw |= {f"autoencoder_ema.ema_model.{k}": v for k, v in ema.state_dict().items()}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": raw, "global_step": 10}, path)
    chosen = {}
    for flags in ([], ["--vae-weights", "online"], ["--vae-prefix", "autoencoder."]):
        out = tmp_path / f"{len(chosen)}.safetensors"
        assert main(["init", "--preset", "tiny", "--vae", str(path), *flags, "--out", str(out)]) == 0
        chosen[" ".join(flags)] = SoundReactor.load(out).vae.decoder.layers[0].weight
    printed = capsys.readouterr().out
    assert "key prefix 'autoencoder_ema.ema_model.' (EMA copy); plain weights" in printed
    assert torch.equal(chosen[""], ema.decoder.layers[0].weight)
    assert torch.equal(chosen["--vae-weights online"], online.decoder.layers[0].weight)
    assert torch.equal(chosen["--vae-prefix autoencoder."], online.decoder.layers[0].weight)
    assert (
        main(
            [
                "init",
                "--preset",
                "tiny",
                "--vae",
                str(path),
                "--vae-prefix",
                "x.",
                "--out",
                str(out),
                "--force",
            ]
        )
        == 2
    )
    assert "error: no VAE keys under prefix 'x.'" in capsys.readouterr().err


def _onnx_model(path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [x.__class__(name="y")])
    graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]))
    onnx.save(helper.make_model(graph, producer_name="pytorch"), str(path))


def test_weights_files_are_told_apart_by_content_not_name(tmp_path):
    """A file given to `init` that is not weights is named for what it is; only real pickles are called risky."""
    import numpy as np

    cases = {
        "model.onnx": "an ONNX model",
        "notes.pth": "a text file (it starts 'these are not weights')",
        "lfs.ckpt": "a Git LFS pointer",
        "page.pth": "an HTML page",
        "arrays.pth": "a zip archive that is not a PyTorch file",
        "empty.pth": "an empty file",
    }
    _onnx_model(tmp_path / "model.onnx")
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    (tmp_path / "lfs.ckpt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    (tmp_path / "page.pth").write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    np.savez(tmp_path / "arrays.npz", a=np.zeros(2))
    (tmp_path / "arrays.npz").rename(tmp_path / "arrays.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    for name, kind in cases.items():
        with pytest.raises(CheckpointError) as err:
            read_tensor_file(tmp_path / name)
        message = str(err.value)
        assert kind in message and "not weights: give a .safetensors file or a PyTorch" in message, message
        assert "pickle" not in message and "arbitrary code" not in message, message
    # the content decides, not the suffix: safetensors named .pth and a torch file named .safetensors both load
    save_file({"w": torch.ones(2)}, str(tmp_path / "really_safetensors.pth"))
    torch.save({"w": torch.ones(2)}, tmp_path / "really_torch.safetensors")
    for name in ("really_safetensors.pth", "really_torch.safetensors"):
        assert torch.equal(read_tensor_file(tmp_path / name)["w"], torch.ones(2))
    with pytest.raises(
        CheckpointError, match=r"not a soundreactor checkpoint \(safetensors\): it is an ONNX model"
    ):
        SoundReactor.load(tmp_path / "model.onnx")


def test_non_finite_weights_are_refused_where_they_enter(tmp_path):
    model = SoundReactor(tiny())
    state = model.state_dict()
    state["head.out.weight" if "head.out.weight" in state else next(iter(state))][0] = float("nan")
    bad = next(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    path = tmp_path / "nan.safetensors"
    save_checkpoint(path, tiny(), state)
    with pytest.raises(
        CheckpointError, match=rf"holds NaN or infinite values in {bad}: these weights are broken"
    ):
        SoundReactor.load(path)
    dino = DinoV2(tiny().dinov2, (37, 37)).state_dict()
    dino["cls_token"] = torch.full_like(dino["cls_token"], float("inf"))
    torch.save(dino, tmp_path / "dino.pth")
    with pytest.raises(
        CheckpointError, match=r"DINOv2 weights .*dino\.pth holds NaN or infinite values in cls_token"
    ):
        init_model("tiny", dinov2=tmp_path / "dino.pth")
    assert (
        main(
            ["init", "--preset", "tiny", "--dinov2", str(tmp_path / "dino.pth"), "--out", str(tmp_path / "o")]
        )
        == 2
    )


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"someone's work")
    assert main(["init", "--preset", "tiny", "--out", str(out)]) == 2
    assert f"error: --out {out} exists; give --force to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"someone's work"
    assert main(["init", "--preset", "tiny", "--out", str(out), "--force"]) == 0
    assert SoundReactor.load(out).config == tiny()


def test_a_checkpoint_written_before_the_upsample_field_loads_as_transposed(tmp_path):
    """Configs stored before VAEConfig.upsample existed lack the key: they load as the transposed-conv decoder
    they were, with the same weights and the same audio, and the field is then written out."""
    import json

    from safetensors import safe_open

    model = init_model("tiny", seed=2)[0]
    path = tmp_path / "new.safetensors"
    model.save(path)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    config = json.loads(metadata["config"])
    assert config["vae"].pop("upsample") == "transposed"
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**metadata, "config": json.dumps(config)})
    loaded = SoundReactor.load(old)
    assert loaded.config == model.config and loaded.config.vae.upsample == "transposed"
    latents = torch.randn(1, model.config.vae.latent_dim, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.vae.decode(latents), model.vae.decode(latents), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"VAEConfig\.upsample must be one of"):
        preset("tiny").replace(vae={"upsample": "linear"})
