"""Model configs are validated before any model is built: a stored config is untrusted input."""

import json
import math
import time

import pytest
from safetensors.torch import save_file

from soundreactor.checkpoint import CheckpointError
from soundreactor.cli import main
from soundreactor.config import MAX_PARAMETERS, ModelConfig, check_guidance, paper, tiny
from soundreactor.demo_video import make_demo_video
from soundreactor.model.soundreactor import SoundReactor, init_model


def stored(changes: dict) -> str:
    """tiny()'s JSON with nested changes, e.g. {"transformer": {"n_layers": 1e9}}."""
    data = json.loads(tiny().to_json())
    for part, values in changes.items():
        if isinstance(values, dict):
            data[part].update(values)
        else:
            data[part] = values
    return json.dumps(data)


BAD = [
    (
        {"transformer": {"n_layers": 1e9}},
        r"TransformerConfig\.n_layers must be an integer in \[1, 512\], got 1000000000\.0",
    ),
    ({"transformer": {"n_layers": 10**9}}, r"TransformerConfig\.n_layers .* got 1000000000"),
    (
        {"transformer": {"norm_eps": -1}},
        r"TransformerConfig\.norm_eps must be a finite number in \(0\.0, 1\.0\]",
    ),
    ({"transformer": {"norm_eps": math.nan}}, r"TransformerConfig\.norm_eps .* got nan"),
    ({"sampler": {"guidance": math.inf}}, r"SamplerConfig\.guidance must be a finite number .* got inf"),
    (
        {"transformer": {"d_model": 0}},
        r"TransformerConfig\.d_model must be an integer in \[1, 65536\], got 0",
    ),
    ({"head": {"width": -64}}, r"HeadConfig\.width .* got -64"),
    ({"vae": {"channels": 0}}, r"VAEConfig\.channels .* got 0"),
    ({"vae": {"strides": [2, 0, 5, 5, 8]}}, r"VAEConfig\.strides entries must be integers in \[1, 64\]"),
    ({"vae": {"strides": [2, 4]}}, r"VAEConfig\.channel_mults \(5\) and strides \(2\) must be as long"),
    ({"transformer": {"n_heads": 3}}, r"TransformerConfig\.n_heads \(3\) must divide d_model \(64\)"),
    ({"transformer": {"n_kv_heads": 3}}, r"TransformerConfig\.n_kv_heads \(3\) must divide n_heads \(4\)"),
    ({"dinov2": {"heads": 5}}, r"DinoConfig\.heads \(5\) must divide dim \(32\)"),
    ({"video": {"heads": 3}}, r"VideoTokenConfig\.heads \(3\) must divide width \(32\)"),
    ({"transformer": {"window": 0}}, r"TransformerConfig\.window .* got 0"),
    ({"transformer": {"rope_base": -2.0}}, r"TransformerConfig\.rope_base"),
    ({"head": {"freq_dim": 33}}, r"HeadConfig\.freq_dim must be even"),
    ({"dinov2": {"eps": 0.0}}, r"DinoConfig\.eps must be a finite number in \(0\.0"),
    ({"video": {"depth": "2"}}, r"VideoTokenConfig\.depth must be an integer .* got '2'"),
    ({"sampler": {"nfe": True}}, r"SamplerConfig\.nfe must be an integer"),
    ({"sampler": {"t_min": 0}}, r"SamplerConfig\.t_min"),
    ({"sampler": {"consistency_steps": {"4": [80.0, 0.9, 5.84, 24.4]}}}, r"consistency_steps\[4\] must be 4"),
    (
        {"vision_hw": [56, -112]},
        r"ModelConfig\.vision_hw \(56, -112\) must be multiples of the patch size 14",
    ),
    ({"fps": 0}, r"ModelConfig\.fps .* got 0"),
    # each size within its bound, together terabytes: 512 layers of width 65536
    (
        {"transformer": {"d_model": 65536, "n_layers": 512, "ffn_hidden": 262144}},
        r"about 3\.52e\+13 parameters",
    ),
    ({"transformer": 5}, r"config TransformerConfig must be an object, got int"),
    ({"transformer": {"depth": 2}}, r"unknown TransformerConfig fields \['depth'\]"),
]


@pytest.mark.parametrize(("changes", "message"), BAD)
def test_absurd_stored_configs_are_refused_naming_the_field(changes, message):
    start = time.monotonic()
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_json(stored(changes))
    assert time.monotonic() - start < 5  # refused before anything is built (1e9 layers used to hang)


def test_malformed_json_and_shapes():
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json("{")
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        ModelConfig.from_json("[]")
    with pytest.raises(ValueError, match=r"missing fields \['head'\]"):
        ModelConfig.from_dict({k: v for k, v in json.loads(tiny().to_json()).items() if k != "head"})


def test_presets_are_valid_and_far_inside_the_bound():
    for config in (paper(), tiny()):
        assert ModelConfig.from_json(config.to_json()) == config
    assert paper().parameter_estimate() < MAX_PARAMETERS / 4


def test_checkpoint_with_absurd_config_is_refused_before_building(tmp_path):
    path = tmp_path / "absurd.safetensors"
    config = stored({"transformer": {"n_layers": 1e9}})
    save_file({}, str(path), metadata={"format": "soundreactor/1", "config": config})
    with pytest.raises(
        CheckpointError, match=r"absurd\.safetensors stores an invalid model config: .*n_layers"
    ):
        SoundReactor.load(path)


def test_run_refuses_an_absurd_guidance_weight(tmp_path, capsys):
    """`--guidance inf` made all-NaN audio with exit 0; it is refused before any frame, naming the field."""
    init_model("tiny")[0].save(tmp_path / "tiny.safetensors")
    video = make_demo_video(tmp_path / "clip.mp4", seconds=0.1, size=(48, 80))
    out = tmp_path / "out.wav"
    argv = [
        "run",
        "--checkpoint",
        str(tmp_path / "tiny.safetensors"),
        "--video",
        str(video),
        "--out",
        str(out),
    ]
    assert main([*argv, "--guidance", "inf"]) == 2
    assert "error: SamplerConfig.guidance must be a finite number" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match=r"SamplerConfig\.guidance .* got nan"):
        check_guidance(math.nan)
