"""The training engine in-process: run directory, metrics, exact resume, micro-batching, numerics, bad input."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from diffusion.engine import checkpoint as ckpt
from diffusion.engine import training as training
from diffusion.engine.training import TrainingError, lr_lambda, train, update_ema
from diffusion.errors import UserError
from diffusion.process.gaussian import GaussianDiffusion

from conftest import assert_state_equal, load_ckpt, tiny_cfg


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_training_writes_run_directory(tmp_path):
    metrics = train(tiny_cfg("max_steps=3", "save_every=2"), tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert os.readlink(ckpts / "latest.pt") == "step_00000003.pt"
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == ["step_00000002.pt", "step_00000003.pt"]
    state = load_ckpt(ckpts / "latest.pt")
    assert state["step"] == 3 and state["format_version"] == 1
    assert set(state) >= {
        "model",
        "ema",
        "optimizer",
        "scheduler",
        "scaler",
        "sampler",
        "data",
        "rng",
        "config",
        "model_config",
        "wandb_run_id",
        "class_names",
    }
    assert state["data"] == {"epoch": 0, "batch": 3}
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "samples/step_00000003.png").exists()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    last = [r for r in rows if "train/loss" in r][-1]
    assert last["train/images_seen"] == 24 and last["train/skipped_steps"] == 0
    assert math.isclose(last["train/loss"], metrics["loss"], rel_tol=1e-6)
    assert {"train/mse", "train/vb", "train/lr", "train/grad_norm", "train/images_per_s"} <= set(last)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["uniform", "loss_second_moment"])
def test_resume_is_exact(tmp_path, sampler):
    """2N steps in one go == N steps, stop, resume for N: bit-identical model, EMAs (constant-rate and
    power-function), optimizer, sampler, and post-hoc EMA snapshots."""
    over = [
        f"sampler={sampler}",
        "diffusion.noise_schedule=cosine",
        "diffusion.steps=8",
        "model.dropout=0.1",
        "model.label_dropout=0.2",
        "optim.ema_rates=[0.9,0.99]",
        "optim.ema_stds=[0.05,0.1]",
        "optim.ema_snapshot_every=3",
    ]
    train(tiny_cfg(*over, "max_steps=16"), tmp_path / "straight")
    train(tiny_cfg(*over, "max_steps=8"), tmp_path / "resumed")
    train(tiny_cfg(*over, "max_steps=16"), tmp_path / "resumed")  # resume=auto finds step 8
    a = load_ckpt(tmp_path / "straight/checkpoints/latest.pt")
    b = load_ckpt(tmp_path / "resumed/checkpoints/latest.pt")
    for key in (
        "model",
        "ema",
        "phema",
        "optimizer",
        "scheduler",
        "scaler",
        "sampler",
        "data",
        "rng",
        "step",
    ):
        assert_state_equal(a[key], b[key], key)
    snaps = [p.name for p in sorted((tmp_path / "straight/phema").glob("snapshot-*.pt"))]
    assert [int(n[9:17]) for n in snaps] == [3, 6, 9, 12, 15, 16]  # every 3 steps and the last step
    resumed = [p.name for p in sorted((tmp_path / "resumed/phema").glob("snapshot-*.pt"))]
    assert resumed == sorted([*snaps, "snapshot-00000008.pt"])  # plus the first part's last step
    for name in snaps:
        assert_state_equal(
            load_ckpt(tmp_path / "straight/phema" / name), load_ckpt(tmp_path / "resumed/phema" / name), name
        )
    if (
        sampler == "loss_second_moment"
    ):  # 8 timesteps x 10 losses fill within the run: importance phase reached
        assert bool(b["sampler"]["loss_counts"].min() == 10)
    assert not torch.equal(a["ema"]["0.9"]["out.2.weight"], a["model"]["out.2.weight"])


def test_ema_warmup_and_rates():
    model = torch.nn.Linear(2, 2)
    ema = {0.9999: torch.nn.Linear(2, 2), 0.5: torch.nn.Linear(2, 2)}
    for e in ema.values():
        e.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
    with torch.no_grad():
        model.weight.fill_(1.0)
    update_ema(ema, model, step=0, warmup=True)  # decay = min(rate, 1/10) for both rates
    assert torch.allclose(ema[0.9999].weight, torch.full((2, 2), 0.9))
    assert torch.allclose(ema[0.5].weight, torch.full((2, 2), 0.9))
    update_ema(ema, model, step=10**6, warmup=False)  # plain rates: 0.9 -> lerp towards 1
    assert torch.allclose(ema[0.9999].weight, torch.full((2, 2), 0.9 + 0.1 * 1e-4))
    assert torch.allclose(ema[0.5].weight, torch.full((2, 2), 0.95))
    with torch.no_grad():
        ema[0.5].weight.zero_()
    update_ema(ema, model, step=10, warmup=True)  # (1 + 10) / (10 + 10) = 0.55 > 0.5: the rate itself
    assert torch.allclose(ema[0.5].weight, torch.full((2, 2), 0.5))


def test_lr_schedule_warmup_then_linear_anneal(tmp_path):
    f = lr_lambda(warmup_steps=4, anneal_steps=10)
    assert [round(f(s), 4) for s in (0, 1, 3, 5, 9, 10)] == [0.25, 0.45, 0.7, 0.5, 0.1, 0.0]
    train(tiny_cfg("optim.lr_anneal_steps=3", "optim.lr=1e-3"), tmp_path)  # training ends at the anneal
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/lr" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [round(r["train/lr"], 8) for r in rows] == [round(1e-3 * (1 - s / 3), 8) for s in (1, 2, 3)]


def test_microbatches_give_the_full_batch_gradient(tmp_path):
    """With SGD the first update is -lr * grad, so equal updates mean equal gradients."""
    sgd = [
        "optim.optimizer._target_=torch.optim.SGD",
        "hardware.fused_optimizer=false",
        "max_steps=1",
        "optim.lr=1.0",
    ]
    train(tiny_cfg(*sgd), tmp_path / "full")
    train(tiny_cfg(*sgd, "data.microbatch=2"), tmp_path / "micro")
    a = load_ckpt(tmp_path / "full/checkpoints/latest.pt")["model"]
    b = load_ckpt(tmp_path / "micro/checkpoints/latest.pt")["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    """Two NaN losses: both steps skipped and counted, parameters and EMA stay finite, training goes on."""
    original = GaussianDiffusion.training_losses
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        terms = original(self, *args, **kwargs)
        if calls["n"] in (2, 3):
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(GaussianDiffusion, "training_losses", flaky)
    train(tiny_cfg("max_steps=5", "log_every=5"), tmp_path)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/skipped_steps" in r]
    assert rows[-1]["train/skipped_steps"] == 2
    state = load_ckpt(tmp_path / "checkpoints/latest.pt")
    for sd in (state["model"], *state["ema"].values()):
        assert all(torch.isfinite(v).all() for v in sd.values())


def test_a_run_of_nonfinite_steps_stops_with_the_step(tmp_path, monkeypatch):
    original = GaussianDiffusion.training_losses

    def broken(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        terms["loss"] = terms["loss"] * float("inf")
        return terms

    train(tiny_cfg("max_steps=2", "save_every=2"), tmp_path)  # a good checkpoint at step 2
    before = load_ckpt(tmp_path / "checkpoints/latest.pt")
    monkeypatch.setattr(GaussianDiffusion, "training_losses", broken)
    # Steps 3-6 are non-finite; the check runs once per log interval (no host sync per step), so at step 6.
    with pytest.raises(TrainingError, match=r"4 consecutive steps with non-finite gradients, up to step 6"):
        train(tiny_cfg("max_steps=10", "optim.max_nonfinite_steps=3", "log_every=3"), tmp_path)
    after = load_ckpt(tmp_path / "checkpoints/latest.pt")
    assert_state_equal(before["model"], after["model"])
    assert after["step"] == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.microbatch=3"], "data.batch_size=8 must be divisible"),
        (["optim.lr=0"], "optim.lr=0.0: must be > 0"),
        (["optim.lr=-1e-4"], "optim.lr=-0.0001: must be > 0"),
        (["data.batch_size=0"], "data.batch_size=0: must be > 0"),
        (["max_steps=-1"], "max_steps=-1: must be >= 0"),
        (["optim.ema_rates=[1.5]"], r"optim.ema_rates contains 1.5: every rate must be in \(0, 1\)"),
        (["optim.ema_rates=[0]"], r"every rate must be in \(0, 1\)"),
        (["data.image_size=16"], "model.image_size=8 but data.image_size=16"),
        (["resume=/nonexistent/ckpt.pt"], "resume=/nonexistent/ckpt.pt: no such file"),
        (["model.class_cond=true", "data=image_folder", "data.labels=none"], None),
    ],
)
def test_bad_config_is_rejected_before_work(tmp_path, overrides, message):
    if message is None:  # data.dir missing is reported as a missing value
        with pytest.raises(TrainingError, match="missing required value data.dir"):
            train(tiny_cfg(*overrides), tmp_path)
        return
    with pytest.raises(UserError, match=message):
        train(tiny_cfg("max_steps=1", *overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_unwritable_run_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(TrainingError, match="cannot write to the run directory"):
        train(tiny_cfg("max_steps=1"), blocker / "run")


def test_resume_from_an_incompatible_model_names_the_keys(tmp_path):
    train(tiny_cfg("max_steps=1"), tmp_path)
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"184 shapes differ, e.g. time_embed.0.weight: model \(256, 64\) vs file \(128, 32\)",
    ):
        train(tiny_cfg("max_steps=2", "model.num_channels=64"), tmp_path)


def test_the_task_builds_the_model_with_runtime_values_from_data_and_diffusion(tmp_path):
    from diffusion.data.datasets import Digits

    task = training.build_task(tiny_cfg("diffusion=ddpm"))
    model, model_config = task.build_model(tiny_cfg().model, Digits(image_size=8))
    assert (
        model.out_channels == 1 and model_config["learn_sigma"] is False and model_config["num_classes"] == 10
    )
    with pytest.raises(UserError, match="model.class_cond=true but the data has no labels"):
        task.build_model(
            tiny_cfg().model, type("Unlabeled", (), dict(image_size=8, channels=1, num_classes=0))()
        )


def test_out_of_memory_says_what_to_change(tmp_path, monkeypatch):
    train(tiny_cfg("max_steps=1"), tmp_path)

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(GaussianDiffusion, "training_losses", oom)
    with pytest.raises(
        TrainingError, match=r"out of memory at step 2 with 8 images .*data.microbatch=4.*use_checkpoint"
    ):
        train(tiny_cfg("max_steps=3"), tmp_path)
    assert load_ckpt(tmp_path / "checkpoints/latest.pt")["step"] == 1


def test_resumed_run_rejects_classes_the_checkpoint_does_not_know(tmp_path):
    training.check_classes(["cat", "dog"], ["cat", "dog"], tmp_path)
    with pytest.raises(TrainingError, match="1 classes that .* does not know \\(zebra\\)"):
        training.check_classes(["cat", "dog"], ["cat", "dog", "zebra"], tmp_path)
    with pytest.raises(TrainingError, match="missing: dog"):
        training.check_classes(["cat", "dog"], ["cat"], tmp_path)
    train(tiny_cfg("max_steps=1"), tmp_path)
    assert json.loads((tmp_path / "class_names.json").read_text()) == [str(i) for i in range(10)]
