"""Training stages on the tiny preset: losses, resume, DDP, checkpoints that every backend loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from soundreactor.checkpoint import load_checkpoint
from soundreactor.model.soundreactor import SoundReactor, init_model
from soundreactor.model.vae import AudioVAE, vae_state_from_official
from soundreactor.training import loop, stages
from soundreactor.training.data import clip_grids
from soundreactor.training.train_config import TrainConfig
from soundreactor.training.vae import folded_state, with_weight_norm

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"batch_size": 2, "dataset_size": 6, "clip_frames": 4, "checkpoint_every": 2, "lr": 1e-3}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> SoundReactor:
    return init_model("tiny", seed=seed)[0]


def make_task(stage: str, **options) -> loop.Task:
    cfg = TrainConfig(stage=stage, **{**SMALL, **options})
    torch.manual_seed(cfg.seed)
    if stage == "vae":
        return stages.vae_task(tiny_model(), cfg)
    return stages.ar_task(tiny_model(), cfg, torch.device("cpu"))


ADVERSARIAL = {"adv_weight": 0.1, "fm_weight": 5.0, "disc_filters": 8}


VARIANTS = {
    "vae-adversarial": ADVERSARIAL,
    "vae-decoder-only": {**ADVERSARIAL, "freeze_encoder": True},
    # the stereo balance loss alone: a step on it lowers it
    "vae-balance": {
        "l1_weight": 0.0,
        "stft_weight": 0.0,
        "envelope_weight": 0.0,
        "kl_weight": 0.0,
        "balance_weight": 1.0,
        "clip_frames": 16,  # 4-frame clips start silent: the batch needs sound for the balance to weigh
    },
}
# parametric stereo (VAEConfig.stereo), made from the two-channel VAE by vae.panned_copy
VARIANTS["vae-pan"] = {**ADVERSARIAL, "vae_stereo": "pan"}
# pretraining with DINOv2 trained too: its grids computed from the frames inside the step
VARIANTS["pretrain-dinov2"] = {"train_dinov2": True}


@pytest.mark.parametrize("stage", ["vae", *VARIANTS, "pretrain", "ect"])
def test_one_gradient_step_lowers_the_loss_on_a_fixed_batch(stage: str) -> None:
    options = VARIANTS.get(stage, {})
    stage = stage.split("-")[0]
    task = make_task(stage, kl_warmup=0, **options)  # the VAE with posterior noise and KL from the start
    batch = task.batch(0, slice(0, SMALL["batch_size"]))
    critic = {id(p) for p in task.critic.module.parameters()} if task.critic else set()
    params = [p for p in task.module.parameters() if p.requires_grad and id(p) not in critic]
    loss, metrics = task.module(**batch)
    assert torch.isfinite(loss) and all(torch.isfinite(m) for m in metrics.values())
    if options.get("adv_weight"):  # the generator's adversarial terms are in the loss
        assert metrics["adv"] > 0 and metrics["fm"] > 0
    if options.get("balance_weight"):
        assert metrics["balance"] > 0
    grads = torch.autograd.grad(loss, params)
    norm2 = sum(g.square().sum() for g in grads)
    # a step predicted (to first order) to remove 1% of the loss: small enough for curvature not to matter
    lr = 0.01 * loss.detach().abs() / norm2
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p -= lr * g
    after, _ = task.module(**batch)
    assert after < loss, f"{stage}: {loss.item()} -> {after.item()}"


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("options", [{}, {"train_dinov2": True}], ids=["", "train-dinov2"])
def test_resume_equals_an_uninterrupted_run(tmp_path: Path, options: dict) -> None:
    steps = 5
    cfg = TrainConfig("pretrain", steps=steps, **SMALL, **options)
    whole = loop.train(make_task("pretrain", steps=steps, **options), cfg, tmp_path / "a")

    task = make_task("pretrain", steps=steps, **options)
    batch = task.batch

    def crashing(step: int, part: slice):
        if step == 3:  # after the checkpoint of step 2, with step 3 logged: a crash between checkpoints
            raise Crash
        return batch(step, part)

    task.batch = crashing
    with pytest.raises(Crash):
        loop.train(task, cfg, tmp_path / "b")
    resumed = loop.train(make_task("pretrain", steps=steps, **options), cfg, tmp_path / "b")

    # same process, same ops in the same order: bit-identical weights and logged losses
    _, expected = load_checkpoint(whole)
    _, got = load_checkpoint(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0, msg=key)
    logs = [
        [json.loads(ln) for ln in (d / loop.LOG).read_text().splitlines()]
        for d in (tmp_path / "a", tmp_path / "b")
    ]
    assert [r["step"] for r in logs[1]] == list(range(1, steps + 1))
    assert [r["loss"] for r in logs[1]] == [r["loss"] for r in logs[0]]
    assert (tmp_path / "b" / loop.PLOT).read_bytes()[:4] == b"\x89PNG"


def test_resume_refuses_other_options(tmp_path: Path) -> None:
    loop.train(make_task("pretrain", steps=2), TrainConfig("pretrain", steps=2, **SMALL), tmp_path)
    cfg = TrainConfig("pretrain", steps=4, **{**SMALL, "lr": 5e-4})
    with pytest.raises(ValueError, match="lr differ"):
        loop.train(make_task("pretrain"), cfg, tmp_path)


def _cli(args: list[str], torchrun: int = 0) -> None:
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(torchrun)] if torchrun else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *launcher, "-m", "soundreactor", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


def test_torchrun_two_processes_equal_one_process(tmp_path: Path) -> None:
    """Gloo DDP over two ranks of one global batch computes what one process computes on the whole batch."""
    options = ["train", "--stage", "pretrain", "--preset", "tiny", "--steps", "3", "--batch-size", "4"]
    options += ["--dataset-size", "6", "--clip-frames", "4", "--lr", "1e-3", "--device", "cpu"]
    _cli([*options, "--out-dir", str(tmp_path / "one")])
    _cli([*options, "--out-dir", str(tmp_path / "two")], torchrun=2)
    _, one = load_checkpoint(tmp_path / "one" / loop.MODEL)
    _, two = load_checkpoint(tmp_path / "two" / loop.MODEL)
    moved = 0
    base = tiny_model().state_dict()
    for key in one:
        # gradients summed in another order: fp32 rounding (~1e-7), far below the 3 Adam steps of 1e-3
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=0, msg=key)
        moved += not torch.equal(one[key], base[key])
    assert moved > 10  # the weights did train
    losses = [
        [json.loads(ln)["loss"] for ln in (tmp_path / d / loop.LOG).read_text().splitlines()]
        for d in ("one", "two")
    ]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(pretrained, ECT-tuned) checkpoints of a few tiny steps, through the CLI."""
    base = tmp_path_factory.mktemp("train")
    common = ["--dataset-size", "4", "--batch-size", "2", "--clip-frames", "4", "--steps", "2"]
    _cli(["train", "--stage", "pretrain", "--preset", "tiny", "--out-dir", str(base / "pre"), *common])
    pre = base / "pre" / loop.MODEL
    _cli(["train", "--stage", "ect", "--init", str(pre), "--out-dir", str(base / "ect"), *common])
    return pre, base / "ect" / loop.MODEL


def test_checkpoints_carry_their_configs(trained) -> None:
    pre, tuned = trained
    config, _ = load_checkpoint(pre)
    assert config.sampler.kind == "heun"
    model = tiny_model()  # the seeded weights `--preset tiny` started from: the VAE is frozen, so unchanged
    cfg = TrainConfig("pretrain", dataset_size=4, clip_frames=4)
    clips = stages.dataset(cfg, model, 4)
    with torch.no_grad():
        latents = torch.stack([model.vae.encode(torch.from_numpy(clips[i].audio)[None])[0] for i in range(4)])
    np.testing.assert_allclose(config.head.latent_scale, latents.std().item() / 0.5, rtol=1e-5)

    tuned_config, _ = load_checkpoint(tuned)
    assert tuned_config.sampler.kind == "consistency"
    assert tuned_config.sampler.consistency_steps == TrainConfig("ect").consistency_steps
    assert tuned_config.head.latent_scale == config.head.latent_scale
    with safe_open(str(tuned), framework="pt") as f:
        training = TrainConfig.from_json(f.metadata()["training"])
    assert training.stage == "ect" and training.steps == 2


def test_trained_checkpoint_runs_in_torch_and_onnxruntime(trained, tmp_path: Path) -> None:
    from soundreactor.demo_video import demo_frames
    from soundreactor.runtime.onnxruntime_backend import ort_session_from_dir
    from soundreactor.runtime.session import Session
    from soundreactor.runtime.torch_backend import TorchStreams

    tuned = trained[1]
    hw = (48, 80)
    _cli(
        ["export", "--checkpoint", str(tuned), "--out", str(tmp_path), "--nfe", "2", "--frame-size", "48x80"]
    )
    model = SoundReactor.load(tuned, input_hw=hw)
    model.configure_sampling(nfe=2)
    torch_session = Session(TorchStreams(model, seed=5))
    ort_session = ort_session_from_dir(tmp_path, 5, ["cpu"], str(tuned), 2, None)
    for frame in demo_frames(10, size=hw, seed=2):
        want = torch_session.step(frame)
        # fp32 graphs of the same weights and noise: rounding only (the export tests measure ~1e-6)
        np.testing.assert_allclose(ort_session.step(frame), want, atol=1e-4, rtol=0)


def test_vae_weight_norm_is_the_official_layout() -> None:
    """The trained VAE's weight-norm tensors, renamed to the official legacy keys, load through the official
    loader into encoder and decoder alike, and equal the folded export."""
    torch.manual_seed(0)
    trained = with_weight_norm(AudioVAE(tiny_model().config.vae))
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(1 + 0.1 * torch.rand_like(p))  # g no longer equal to ||v||: folding must matter
    official = {}
    for key, value in trained.state_dict().items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        key = key.replace(".parametrizations.weight.original1", ".weight_v")
        official["autoencoder." + key] = value
    assert any(k.startswith("autoencoder.encoder.layers.1.layers.0.layers.1.weight_g") for k in official)
    loaded, layout = vae_state_from_official(official, trained.cfg)
    assert layout.prefix == "autoencoder."
    folded = folded_state(trained)
    assert loaded.keys() == folded.keys()
    for key in folded:
        torch.testing.assert_close(loaded[key], folded[key], atol=1e-6, rtol=1e-5, msg=key)
    plain = AudioVAE(trained.cfg)
    plain.load_state_dict(folded)
    audio = torch.randn(1, 2, 3 * 1600) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(plain.encode(audio), trained.encode(audio), atol=1e-5, rtol=1e-4)


def test_grid_cache_gives_the_computed_grids(tmp_path: Path) -> None:
    cfg = TrainConfig("pretrain", **SMALL)
    torch.manual_seed(0)
    cached = stages.ar_task(tiny_model(), cfg, torch.device("cpu"), grid_cache=tmp_path)
    plain = make_task("pretrain")
    first = cached.batch(0, slice(0, 2))
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == len(set(torch.randint(6, (2,), generator=loop.step_generator(0, 0)).tolist()))
    again = cached.batch(0, slice(0, 2))
    assert sorted(tmp_path.rglob("*.safetensors")) == files  # read back, nothing recomputed
    torch.testing.assert_close(again["vision"], first["vision"], atol=0, rtol=0)
    want = plain.batch(0, slice(0, 2))["vision"]
    # stored as float16: relative rounding 2^-11 of LayerNorm outputs of magnitude ~1-10
    torch.testing.assert_close(first["vision"], want, atol=1e-2, rtol=1e-3)


def test_train_dinov2_trains_the_grids_streaming_computes(tmp_path: Path) -> None:
    start = tiny_model().vision.dinov2.state_dict()
    cfg = TrainConfig("pretrain", steps=2, **SMALL, train_dinov2=True)
    task = make_task("pretrain", steps=2, train_dinov2=True)
    vision = task.batch(0, slice(0, 2))["vision"]
    assert vision.dtype == torch.uint8 and vision.shape[-1] == 3  # frames: DINOv2 runs inside the step
    model = tiny_model()
    with torch.no_grad():
        want = torch.stack([clip_grids(model, clip) for clip in vision])
        # the same preprocessing and DINOv2 ops as streaming, in another batch grouping: float32 rounding
        torch.testing.assert_close(task.module.grids(vision), want, atol=1e-4, rtol=1e-4)
    trained = SoundReactor.load(loop.train(task, cfg, tmp_path))
    moved = [k for k, v in trained.vision.dinov2.state_dict().items() if not torch.equal(v, start[k])]
    # every DINOv2 tensor trained but two the forward does not reach: the masked-patch objective's token and the
    # position embedding (read through its resize to the patch grid, a buffer)
    assert sorted(set(start) - set(moved)) == ["mask_token", "pos_embed"]
    frozen = SoundReactor.load(
        loop.train(make_task("pretrain", steps=2), TrainConfig("pretrain", steps=2, **SMALL), tmp_path / "f")
    )
    for key, value in frozen.vision.dinov2.state_dict().items():
        assert torch.equal(value, start[key]), key


def test_cli_names_a_missing_start(tmp_path: Path, capsys) -> None:
    from soundreactor.cli import main

    assert main(["train", "--stage", "ect", "--preset", "tiny", "--out-dir", str(tmp_path)]) == 2
    assert "--stage ect starts from a pretrained checkpoint: give --init" in capsys.readouterr().err
    untrained = tmp_path / "untrained.safetensors"
    tiny_model().save(untrained)
    assert main(["train", "--stage", "ect", "--init", str(untrained), "--out-dir", str(tmp_path)]) == 2
    assert f"{untrained} samples with 'consistency'" in capsys.readouterr().err
    assert main(["train-vae", "--out-dir", str(tmp_path)]) == 2
    assert "give --init CHECKPOINT" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--stage",
                "pretrain",
                "--preset",
                "tiny",
                "--data",
                str(tmp_path / "none"),
                "--out-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "video folder not found" in capsys.readouterr().err


def test_pretraining_takes_the_vae_from_vae_and_the_rest_from_init(tmp_path: Path, capsys) -> None:
    """`train --stage pretrain --init MODEL --vae VAE`: the run starts from MODEL's transformer and head on VAE's
    latents (the VAE is frozen in pretraining, so the written checkpoint holds VAE's exactly), VAE's inner layout
    included (here a panned decoder, VAEConfig.stereo, under a two-channel model)."""
    from soundreactor.cli import main
    from soundreactor.model.soundreactor import SoundReactor

    model, vae = tmp_path / "model.safetensors", tmp_path / "vae.safetensors"
    tiny_model(seed=0).save(model)
    torch.manual_seed(1)
    SoundReactor(tiny_model(seed=0).config.replace(vae={"stereo": "pan"})).save(vae)
    run = ["train", "--stage", "pretrain", "--init", str(model), "--vae", str(vae), "--steps", "1"]
    options = ["--batch-size", "2", "--dataset-size", "2", "--clip-frames", "4", "--checkpoint-every", "1"]
    assert main([*run, *options, "--out-dir", str(tmp_path / "run")]) == 0
    written_config, written = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert written_config.vae.stereo == "pan"
    _, start = load_checkpoint(model)
    _, source = load_checkpoint(vae)
    vae_keys = [k for k in written if k.startswith("vae.")]
    assert vae_keys and all(torch.equal(written[k], source[k]) for k in vae_keys)
    assert not torch.equal(start["vae.decoder.layers.0.weight"], source["vae.decoder.layers.0.weight"])
    # one step from the start: the transformer moved by about lr per weight, not to another seed's weights
    name = next(k for k in written if k.startswith("transformer.") and k.endswith("weight"))
    assert (written[name] - start[name]).abs().max() < 0.01
    # a resumed run must name the same VAE (another one, or none, is a changed option)
    capsys.readouterr()
    other = ["train", "--stage", "pretrain", "--init", str(model), "--vae", str(model), "--steps", "2"]
    assert main([*other, *options, "--out-dir", str(tmp_path / "run")]) == 2
    assert "vae differ" in capsys.readouterr().err
    small = tmp_path / "small.safetensors"
    init_model("small", seed=0)[0].save(small)
    refusals = {
        "ect": (["--stage", "ect", "--init", str(model), "--vae", str(vae)], "ECT must run on the VAE"),
        "no init": (["--stage", "pretrain", "--preset", "tiny", "--vae", str(vae)], "--vae needs --init"),
        "missing": (
            ["--stage", "pretrain", "--init", str(model), "--vae", str(tmp_path / "no")],
            "not found: give",
        ),
        "layout": (
            ["--stage", "pretrain", "--init", str(model), "--vae", str(small)],
            "does not fit the --init model (latent_dim 16 vs 64)",
        ),
        "stereo in pretraining": (
            ["--stage", "pretrain", "--init", str(model), "--vae-stereo", "pan"],
            "--vae-stereo converts a VAE in train-vae",
        ),
        "dinov2 in ECT": (
            ["--stage", "ect", "--init", str(model), "--train-dinov2"],
            "--train-dinov2 trains DINOv2 in pretraining",
        ),
    }
    for case, (args, message) in refusals.items():
        assert main(["train", *args, "--out-dir", str(tmp_path / case)]) == 2, case
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (case, err)


def test_ect_gap_anneals_by_q_per_stage() -> None:
    from soundreactor.training.ect import ect_r

    t = torch.tensor([1e-3, 0.1, 1.0, 10.0, 80.0])
    gaps = [t - ect_r(t, stage, q=4.0, k=8.0, b=1.0) for stage in range(4)]
    for stage, gap in enumerate(gaps):
        r = t - gap
        assert (r >= 0).all() and (r < t).all()
        if stage:
            # where r > 0 the gap is t q^-(stage+1) (1 + k sigmoid(-b t)): a factor q smaller per stage
            positive = ect_r(t, stage - 1, 4.0, 8.0, 1.0) > 0
            torch.testing.assert_close(gap[positive] * 4, gaps[stage - 1][positive], rtol=1e-5, atol=0)
    # large t: sigmoid(-b t) vanishes and r -> t (1 - q^-(stage+1))
    torch.testing.assert_close(ect_r(torch.tensor([80.0]), 0, 4.0, 8.0, 1.0), torch.tensor([60.0]))


def test_vae_warm_up_starts_as_a_plain_autoencoder() -> None:
    from soundreactor.training.vae import warmup

    cfg = TrainConfig("vae", kl_warmup=100)
    assert [warmup(cfg, s) for s in (0, 50)] == [0.0, 0.0]
    assert warmup(cfg, 75) == pytest.approx(0.5)
    assert warmup(cfg, 100) == warmup(cfg, 10_000) == 1.0
    task = make_task("vae", kl_warmup=100)
    batch = task.batch(0, slice(0, 2))
    assert batch["warmup"] == 0  # no posterior noise: the reconstruction of the mean, twice
    first, second = (
        task.module(**batch)[0],
        task.module(**{**batch, "eps": torch.randn_like(batch["eps"])})[0],
    )
    assert first == second


def test_vae_run_reports_onsets_at_every_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig("vae", steps=2, **SMALL)
    loop.train(make_task("vae", steps=2), cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / loop.EVAL).read_text().splitlines()]
    assert [r["step"] for r in rows] == [2]
    assert set(rows[0]) == {"step", "quality", *stages.VAE_EVAL_FIGURES}
    assert 0.0 <= rows[0]["onset_f1"] <= 1.0
    assert rows[0]["quality"] == stages.vae_quality(rows[0])


def test_vae_quality_is_zero_for_a_silent_or_steady_decoder_and_one_for_the_truth() -> None:
    from soundreactor.training.evaluate import held_out_clips, score

    clips = held_out_clips(scenes=2, n_frames=60)
    assert stages.vae_quality(score([c.audio for c in clips], clips)) == pytest.approx(1.0)
    assert stages.vae_quality(score([np.zeros_like(c.audio) for c in clips], clips)) == 0.0
    steady = [np.full_like(c.audio, 0.01) for c in clips]  # a constant bed: no onsets, no gap
    assert stages.vae_quality(score(steady, clips)) == 0.0
    # every part counts: perfect onsets and envelope with no gap between impacts score 0
    assert stages.vae_quality({"onset_f1": 1.0, "envelope_corr": 1.0, "gap_ratio": 0.0}) == 0.0
    assert stages.vae_quality({"onset_f1": 0.5, "envelope_corr": 0.5, "gap_ratio": 2.0}) == pytest.approx(
        0.25 ** (1 / 3)
    )


@pytest.mark.parametrize("stereo", ["", "pan"])
def test_adversarial_vae_resume_equals_an_uninterrupted_run(tmp_path: Path, stereo: str) -> None:
    """With the discriminator switched on at step 1 and silence batches: the discriminator's weights and its
    optimizer come back from the checkpoint's state.pt, so a crash between checkpoints resumes to the same bits.
    With vae_stereo "pan" the start is made panned again on resuming, then overwritten by the checkpoint's."""
    options = {**ADVERSARIAL, "adv_start": 1, "silence_share": 0.3, "vae_stereo": stereo}
    steps = 5

    def task():
        t = make_task("vae", steps=steps, **options)
        t.evaluate = None  # the figures have their own tests; the resume is the point here
        return t

    cfg = TrainConfig("vae", steps=steps, **SMALL, **options)
    loop.train(task(), cfg, tmp_path / "a")
    crashing = task()
    batch = crashing.batch

    def crash_at_3(step: int, part: slice):
        if step == 3:
            raise Crash
        return batch(step, part)

    crashing.batch = crash_at_3
    with pytest.raises(Crash):
        loop.train(crashing, cfg, tmp_path / "b")
    loop.train(task(), cfg, tmp_path / "b")
    whole, resumed = (
        torch.load(loop.checkpoint_dir(d, steps) / loop.STATE, weights_only=True)
        for d in (tmp_path / "a", tmp_path / "b")
    )
    disc = [k for k in whole["module"] if k.startswith("discriminator.")]
    assert disc and whole["critic_optimizer"]["state"]
    for key in whole["module"]:
        torch.testing.assert_close(resumed["module"][key], whole["module"][key], atol=0, rtol=0, msg=key)
    for i, state in whole["critic_optimizer"]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(resumed["critic_optimizer"]["state"][i][name], value, atol=0, rtol=0)
    logs = [[json.loads(ln) for ln in (tmp_path / d / loop.LOG).read_text().splitlines()] for d in "ab"]
    assert logs[1] == [{**r, "time": logs[1][i]["time"]} for i, r in enumerate(logs[0])]
    assert logs[0][0]["disc"] == 0.0 and all(r["disc"] > 0 for r in logs[0][1:])  # on from step 1


def test_discriminator_learns_to_tell_audio_from_reconstructions() -> None:
    """A few discriminator steps on one (audio, reconstruction) pair lower its hinge loss from about 2 (logits
    near 0 at init) and open a gap between its mean logits on the audio and on the reconstruction."""
    task = make_task("vae", **ADVERSARIAL)
    batch = task.batch(0, slice(0, 2))
    trainee = task.module

    def margin() -> float:
        with torch.no_grad():
            recon = trainee.vae.decode(trainee.vae.encode(batch["audio"]))
            real, fake = trainee.discriminator(batch["audio"]), trainee.discriminator(recon)
        return sum(r.mean().item() - f.mean().item() for (r, _), (f, _) in zip(real, fake, strict=True))

    before = margin()
    optimizer = torch.optim.AdamW(task.critic.module.parameters(), lr=1e-3, betas=(0.8, 0.99))
    losses = []
    for _ in range(6):
        trainee(**batch)
        loss = task.critic.loss()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0]
    assert margin() > max(before, 0.0)


def test_silence_batches_are_muted_at_the_configured_share() -> None:
    task = make_task("vae", silence_share=0.1, hum=True)  # the hum: no clip is silent by itself
    muted = [not task.batch(step, slice(0, 2))["audio"].any() for step in range(100)]
    # 100 draws at p = 0.1: 10 +- 3 (binomial); [3, 20] is beyond 2.3 standard deviations either side
    assert 3 <= sum(muted) <= 20
    everything = make_task("vae", silence_share=1.0, hum=True)
    assert not everything.batch(0, slice(0, 2))["audio"].any()
    # the draw comes after the clips' and noise's: a run without silence batches draws what it drew before
    plain, with_share = make_task("vae", hum=True).batch(7, slice(0, 2)), task.batch(7, slice(0, 2))
    if with_share["audio"].any():
        torch.testing.assert_close(with_share["audio"], plain["audio"], atol=0, rtol=0)
    torch.testing.assert_close(with_share["eps"], plain["eps"], atol=0, rtol=0)


def test_crops_are_windows_of_the_clips_at_frame_boundaries() -> None:
    task = make_task("vae", clip_frames=8, crop_frames=3, dataset_size=2, batch_size=4, hum=True)
    clips = stages.SyntheticAV(0, 2, 8, hum=True)
    whole = [clips[i].audio for i in range(2)]
    audio = task.batch(0, slice(0, 4))["audio"]
    assert audio.shape == (4, 2, 3 * 1600)
    for window in audio.numpy():
        starts = [
            f
            for c in range(2)
            for f in range(6)
            if np.array_equal(whole[c][:, f * 1600 : (f + 3) * 1600], window)
        ]
        assert starts
    with pytest.raises(ValueError, match="crop_frames 9 must not exceed the clips' 8 frames"):
        make_task("vae", clip_frames=8, crop_frames=9)


def test_the_stft_loss_sees_a_minus_70_dbfs_bed_over_silence() -> None:
    """auraloss's power floor (stft_eps) decides what its log-magnitude term can see: at 1e-8 a -70 dBFS noise
    bed (independent per channel) over digital silence costs at least ln(11) per bin (the 32-point FFT's bed
    magnitude, rms * sqrt(3 * 32 / 8), over the floor's sqrt(1e-8)); at 1e-2 the floor hides it."""
    from soundreactor.training.vae import VAETrainee

    vae = tiny_model().vae
    bed = torch.randn(1, 2, 9600, generator=torch.Generator().manual_seed(0)) * 10 ** (-70 / 20)
    silence = torch.zeros_like(bed)
    seen = VAETrainee(vae, TrainConfig("vae")).stft(bed, silence)
    hidden = VAETrainee(vae, TrainConfig("vae", stft_eps=1e-2)).stft(bed, silence)
    assert seen > 1.0
    assert hidden < 1e-3


def test_panned_copy_gives_up_the_least_varying_channel_and_keeps_every_other_weight() -> None:
    """panned_copy: the channel whose means vary least on the audio gives way, the last channel moves into its
    place and the last becomes the pan. Every weight is kept but for that: the encoder's last conv rows, the
    decoder's first conv columns (the pan's zero), its last conv the left channel's times sqrt(2). So with the pan
    at 0 (the centre) and the given-up channel at 0 the left output is the two-channel decoder's."""
    from soundreactor.training.vae import panned_copy

    vae = tiny_model(0).vae.eval()
    latent = vae.cfg.latent_dim
    encoder_last = f"encoder.layers.{len(vae.encoder.layers) - 1}"
    quiet = 5
    with torch.no_grad():  # channel 5's mean: a constant, so it varies least
        for name in ("weight", "bias"):
            getattr(vae.encoder.layers[-1], name)[quiet].zero_()
    audio = torch.randn(2, 2, 4 * 1600, generator=torch.Generator().manual_seed(0)) * 0.1
    panned, dropped = panned_copy(vae, audio)
    assert dropped == quiet and panned.cfg.stereo == "pan" and not panned.training
    order = [*range(quiet), latent - 1, *range(quiet + 1, latent - 1)]
    before, after = vae.state_dict(), panned.state_dict()
    decoder_last = f"decoder.layers.{len(vae.decoder.layers) - 1}.weight"
    for key, value in before.items():
        if key.startswith(encoder_last):
            value = value[order + [latent + c for c in order]]
        elif key == decoder_last:
            value = value[:1] * 2**0.5
        elif key == "decoder.layers.0.weight":
            value = torch.cat([value[:, order], torch.zeros_like(value[:, :1])], dim=1)
        torch.testing.assert_close(after[key], value, atol=0, rtol=0, msg=key)
    with torch.no_grad():
        latents = panned.encode(audio)
        torch.testing.assert_close(latents[:, :-1], vae.encode(audio)[:, order], atol=0, rtol=0)
        z = torch.randn(1, latent, 3, generator=torch.Generator().manual_seed(0))
        z[:, quiet] = 0
        two = vae.decode(z)
        mine = z[:, [*order, quiet]]  # the pan (last) at 0
        one = panned.decode(mine)
    torch.testing.assert_close(one[:, 0], two[:, 0], atol=1e-6 * two.abs().max().item(), rtol=0)
    torch.testing.assert_close(one[:, 1], one[:, 0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="this one is 'pan'"):
        panned_copy(panned, audio)
    with pytest.raises(ValueError, match=r"vae_stereo must be 'pan' .* not turned back into two channels"):
        TrainConfig("vae", vae_stereo="channels")


def test_balance_loss_is_the_energy_weighted_error_of_each_window_s_stereo_balance() -> None:
    """b = (E_R - E_L) / (E_R + E_L) lies in [-1, 1]: a hard-left reference decoded hard right errs by 2, decoded
    mono by 1, in every window; windows where the reference is silent weigh nothing."""
    from soundreactor.training.vae import ENVELOPE_HOP, balance_loss

    noise = torch.randn(1, 1, 16 * ENVELOPE_HOP, generator=torch.Generator().manual_seed(0)) * 0.1
    silent = torch.zeros_like(noise)
    left, right = torch.cat([noise, silent], 1), torch.cat([silent, noise], 1)
    mono = torch.cat([noise, noise], 1) / 2**0.5
    assert balance_loss(left, left) == 0
    assert balance_loss(right, left) == pytest.approx(2.0, abs=1e-4)
    assert balance_loss(mono, left) == pytest.approx(1.0, abs=1e-4)
    # the reference sounds in the first half only: errors in the second half cost nothing
    half = left.clone()
    half[..., 8 * ENVELOPE_HOP :] = 0
    wrong_where_silent = left.clone()
    wrong_where_silent[..., 8 * ENVELOPE_HOP :] = right[..., 8 * ENVELOPE_HOP :]
    assert balance_loss(wrong_where_silent, half) == 0
    # a silent reference (a muted batch): 0 and a finite gradient at any loss weight, not 0/0 or 0 * inf
    recon = right.clone().requires_grad_()
    loss = balance_loss(recon, torch.zeros_like(left))
    (1e3 * loss).backward()
    assert loss == 0 and torch.isfinite(recon.grad).all()
    with pytest.raises(ValueError, match=r"loss weights must be >= 0 .*: balance_weight"):
        TrainConfig("vae", balance_weight=-1.0)


def test_resume_with_other_options_names_them_but_not_steps(tmp_path: Path) -> None:
    loop.train(make_task("pretrain", steps=2), TrainConfig("pretrain", steps=2, **SMALL), tmp_path)
    changed = TrainConfig("pretrain", steps=4, **{**SMALL, "lr": 5e-4})
    with pytest.raises(ValueError, match=r"\(lr differ\)"):
        loop.train(make_task("pretrain", steps=4), changed, tmp_path)


def test_best_checkpoint_is_the_one_with_the_highest_selected_figure(tmp_path: Path) -> None:
    task = make_task("pretrain", steps=6)
    scores = iter([0.3, 0.5, 0.4])  # checkpoints at steps 2, 4, 6
    exported: dict[int, bytes] = {}
    export = task.export

    def keep(module, path, extra):
        export(module, path, extra)
        exported[int(extra["step"])] = Path(path).read_bytes()

    task.export, task.evaluate, task.select = keep, lambda module: {"f1": next(scores)}, "f1"
    loop.train(task, TrainConfig("pretrain", steps=6, **SMALL), tmp_path)
    assert (tmp_path / loop.BEST).read_bytes() == exported[4]
    assert (tmp_path / loop.MODEL).read_bytes() == exported[6]


def test_calibrated_vae_init_carries_the_audio_through_the_bottleneck() -> None:
    """After calibrated_init the latents' std is the target and depends on the audio (the default init's
    latents were a bias-made constant, 98% of their std), and the decoder's output has the audio's std."""
    from soundreactor.training.synthetic import make_clip
    from soundreactor.training.vae import LATENT_STD_AT_INIT, calibrated_init

    audio = torch.from_numpy(make_clip(0, 12).audio)[None]
    assert audio.std() > 0  # the scene has an impact
    vae = AudioVAE(tiny_model().config.vae)
    calibrated_init(vae, audio)
    with torch.no_grad():
        latents = vae.encode(audio)
        of_silence = vae.encode(torch.zeros_like(audio))
        gen = torch.Generator().manual_seed(123)  # other latent draws than the calibration's
        decoded = [
            vae.decode(torch.randn(latents.shape, generator=gen) * LATENT_STD_AT_INIT) for _ in range(9)
        ]
    # the bisection stops within 1.2 / 2^16 of the gain; at that gain the std moves by well under 10%
    assert latents.std().item() == pytest.approx(LATENT_STD_AT_INIT, rel=0.1)
    assert of_silence.abs().max().item() == 0.0  # no bias path: silence encodes to zero
    # One draw's output std spreads by -25%..+60% around the audio's (measured, tiny and small presets): the
    # checkerboard-free taps share one random weight over `stride` outputs, so fewer independent terms average.
    # Typical draws, the median of nine, have the audio's std.
    median = torch.tensor([d.std().item() for d in decoded]).median().item()
    assert median == pytest.approx(audio.std().item(), rel=0.25)


def test_calibrated_vae_init_rejects_silence() -> None:
    from soundreactor.training.vae import calibrated_init

    with pytest.raises(ValueError, match="not silent"):
        calibrated_init(AudioVAE(tiny_model().config.vae), torch.zeros(1, 2, 3200))
    with pytest.raises(ValueError, match="vae_init"):
        TrainConfig("vae", vae_init="random")


def test_features_held_in_memory_are_not_made_again() -> None:
    """Once a clip's latents and grids are held, Features returns the same tensors without making the clip."""
    from soundreactor.training.synthetic import SyntheticAV

    class Counted(SyntheticAV):
        made = 0

        def __getitem__(self, i: int):
            Counted.made += 1
            return super().__getitem__(i)

    model = tiny_model()
    features = stages.Features(model, Counted(0, 4, 4))
    first = features(torch.tensor([0, 2]))
    made = Counted.made
    again = features(torch.tensor([2, 0]))
    assert Counted.made == made  # nothing made again
    torch.testing.assert_close(again[0], first[0].flip(0), rtol=0, atol=0)
    torch.testing.assert_close(again[1], first[1].flip(0), rtol=0, atol=0)
    fresh = stages.Features(model, SyntheticAV(0, 4, 4))(torch.tensor([2]))  # recomputed from the clip
    torch.testing.assert_close(fresh[1][0], first[1][1], rtol=0, atol=0)


def test_a_decoder_only_run_keeps_the_encoder_and_swaps_into_a_model(tmp_path: Path) -> None:
    """`--freeze-encoder` trains the decoder alone (the exported encoder is the starting one to float32 rounding
    of the weight-norm fold) and `swap_decoder` puts that decoder into a model sharing the encoder, refusing one
    with another encoder."""
    from soundreactor.training.swap_decoder import swap_decoder

    options = {**ADVERSARIAL, "freeze_encoder": True, "steps": 4}
    task = make_task("vae", **options)
    assert not any(p.requires_grad for p in task.module.vae.encoder.parameters())
    task.evaluate = None
    trained = loop.train(task, TrainConfig("vae", **SMALL, **options), tmp_path / "run")
    _, start = load_checkpoint(_saved(tiny_model(0), tmp_path / "start.safetensors"))
    _, after = load_checkpoint(trained)
    for key in (k for k in start if k.startswith("vae.encoder.")):
        scale = start[key].abs().max().item()
        torch.testing.assert_close(after[key], start[key], atol=1e-6 * scale, rtol=0, msg=key)
    decoder = [k for k in start if k.startswith("vae.decoder.") and k.endswith("weight")]
    assert any(not torch.equal(after[k], start[k]) for k in decoder)

    other = tiny_model(0)
    with torch.no_grad():
        for p in [*other.transformer.parameters(), *other.head.parameters()]:
            p.add_(1.0)  # a "trained" model: its own transformer and head, the VAE it was trained on
    model = _saved(other, tmp_path / "model.safetensors")
    swap_decoder(model, trained, tmp_path / "swapped.safetensors")
    _, mine = load_checkpoint(model)
    _, swapped = load_checkpoint(tmp_path / "swapped.safetensors")
    assert swapped.keys() == mine.keys()
    for key, value in swapped.items():
        expected = after[key] if key.startswith("vae.decoder.") else mine[key]
        torch.testing.assert_close(value, expected, atol=0, rtol=0, msg=key)

    foreign = _saved(tiny_model(1), tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="encoder is not"):
        swap_decoder(foreign, trained, tmp_path / "refused.safetensors")
    assert not (tmp_path / "refused.safetensors").exists()


@pytest.mark.parametrize(
    "case, match",
    [
        ("foreign encoder", "encoder is not"),
        ("missing model", "checkpoint not found"),
        ("run folder as VAE", "is a folder, not a checkpoint"),
        ("out is the model", "would destroy the input"),
        ("out exists", "exists; give --force"),
        ("out not safetensors", "name it out.safetensors"),
        ("out folder missing", "does not exist"),
        ("panned VAE", "(stereo pan vs channels): its decoder cannot be swapped in; a model takes"),
    ],
)
def test_swap_decoder_refuses_bad_paths_with_one_error_line(tmp_path: Path, capsys, case: str, match: str):
    from soundreactor.training.swap_decoder import main

    model, vae = _saved(tiny_model(0), tmp_path / "model.safetensors"), tmp_path / "run" / "best.safetensors"
    vae.parent.mkdir()
    source = tiny_model(1 if case == "foreign encoder" else 0)
    if case == "panned VAE":  # another VAE layout (VAEConfig.stereo): a model pretrains on it instead
        source = SoundReactor(source.config.replace(vae={"stereo": "pan"}))
    _saved(source, vae)
    (tmp_path / "exists.safetensors").write_bytes(b"keep")
    out = {
        "out is the model": model,
        "out exists": tmp_path / "exists.safetensors",
        "out not safetensors": tmp_path / "out.wav",
        "out folder missing": tmp_path / "none" / "out.safetensors",
    }.get(case, tmp_path / "out.safetensors")
    args = [str(tmp_path / "missing.safetensors") if case == "missing model" else str(model)]
    args += [str(vae.parent) if case == "run folder as VAE" else str(vae), str(out)]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written


def test_freeze_encoder_needs_a_trained_encoder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="redraws it"):
        TrainConfig("vae", freeze_encoder=True, vae_init="calibrated")
    args = ["train-vae", "--preset", "tiny", "--freeze-encoder", "--out-dir", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-m", "soundreactor", *args], capture_output=True, text=True)
    assert proc.returncode != 0 and "give --init" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def _saved(model: SoundReactor, path: Path) -> Path:
    model.save(path)
    return path
