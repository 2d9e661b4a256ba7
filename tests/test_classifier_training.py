"""Training a noisy-image classifier through train.py's engine (task=classifier): its loss terms, the held-out
data it validates on, validation metrics in W&B's files, exact resume, and validation over two ranks."""

from __future__ import annotations

import math
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion.data.datasets import Digits, ImageFolder, digits_split
from diffusion.engine import training as training
from diffusion.engine.loggers import read_metrics_jsonl, read_wandb_history
from diffusion.engine.tasks import RunContext, classification_terms
from diffusion.engine.training import train
from diffusion.errors import UserError
from diffusion.evaluation.digit_judge import train_digit_classifier

from conftest import ROOT, TORCHRUN, assert_state_equal, compose_cfg, load_ckpt

# The digits classifier preset as it is (0.5M parameters), on 8 images per step.
CLASSIFIER = [
    "model=classifier_digits",
    "task=classifier",
    "data=digits",
    "data.split=train",
    "data.batch_size=8",
    "hardware=cpu",
    "hardware.num_threads=1",
    "logger=none",
    "log_every=1",
    "save_every=0",
]


def classifier_cfg(*overrides: str):
    return compose_cfg([*CLASSIFIER, *overrides])


class Recorder(torch.nn.Module):
    """Wraps a classifier and records the (x, t) it is called with."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.clone()))
        return self.net(x, t)


def built(*overrides: str):
    """(task, classifier) of a config, built as the engine builds them, on the digits' train split."""
    cfg = classifier_cfg(*overrides)
    task = training.build_task(cfg)
    model, _ = task.build_model(cfg.model, Digits(split="train"))
    return task, model


# --- the loss --------------------------------------------------------------------------------------------------


def test_loss_is_the_cross_entropy_of_q_sample_at_the_timesteps_the_network_sees():
    """On a process respaced to 10 steps, the classifier sees x_t = q_sample(x, t, noise) at the ORIGINAL
    timesteps (as a diffusion network does), and the terms are per-example cross-entropy and top-k hits."""
    task, model = built("diffusion.timestep_respacing=[10]")
    net = Recorder(model)
    data = Digits(split="train")
    x, y = data.images[:6], data.targets[:6]
    t, noise = (
        torch.tensor([0, 1, 3, 5, 8, 9]),
        torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
    )
    terms = task.losses(net, x, y, t, noise)
    ((seen_x, seen_t),) = net.calls
    original = task.diffusion.timestep_map[t]
    assert seen_t.tolist() == original.tolist() and original.tolist() == [0, 111, 333, 555, 888, 999]
    alpha_bar = torch.as_tensor(task.diffusion.respace(None).alphas_cumprod)[original][:, None, None, None]
    by_hand = alpha_bar.sqrt() * x.double() + (1 - alpha_bar).sqrt() * noise.double()
    assert (seen_x - by_hand).norm() / by_hand.norm() <= 1e-6
    logits = model(seen_x, original)
    assert set(terms) == {"loss", "acc@1", "acc@5"} and all(v.shape == (6,) for v in terms.values())
    assert torch.allclose(terms["loss"], F.cross_entropy(logits, y, reduction="none"), atol=1e-6)
    ranks = (logits > logits.gather(1, y[:, None])).sum(1)  # how many classes score above the label
    assert terms["acc@1"].tolist() == (ranks == 0).float().tolist()
    assert terms["acc@5"].tolist() == (ranks < 5).float().tolist()


def test_clean_classifier_sees_the_images_at_t_0():
    task, model = built("task.noised=false")
    net = Recorder(model)
    x, y = Digits(split="train").images[:3], torch.tensor([0, 1, 2])
    task.losses(net, x, y, torch.tensor([5, 500, 999]), torch.randn(3, 1, 8, 8))
    ((seen_x, seen_t),) = net.calls
    assert torch.equal(seen_x, x) and seen_t.tolist() == [0, 0, 0]


def test_top_k_terms_by_hand():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [1, 0.5, 0, 0, 0, -1]])
    terms = classification_terms(logits, torch.tensor([0, 0, 1]))
    assert terms["acc@1"].tolist() == [1, 0, 0] and terms["acc@5"].tolist() == [1, 0, 1]
    # With fewer than 5 classes every label is within the "top 5".
    assert classification_terms(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))["acc@5"].tolist() == [1] * 4


# --- held-out data -------------------------------------------------------------------------------------------


def test_the_digits_split_is_the_judges_held_out_quarter():
    train_idx, val_idx = digits_split("train"), digits_split("val")
    assert len(train_idx) == 1347 and len(val_idx) == 450 and not set(train_idx) & set(val_idx)
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), digits_split("all"))
    # The same 450 digits the digit judge never trained on, so it can judge models trained on "train".
    assert np.array_equal(val_idx, np.sort(train_digit_classifier().held_out))
    val = Digits(split="train").held_out()
    assert val.split == "val" and len(val) == 450
    # Stratified: a quarter of each class (44 to 46 digits).
    assert (torch.bincount(val.targets) - torch.bincount(Digits().targets) / 4).abs().max() < 1
    assert Digits().held_out() is None and Digits(split="val").held_out() is None
    with pytest.raises(UserError, match="data.split='test': must be one of 'all', 'train', 'val'"):
        Digits(split="test")


def _folder(root, classes: list[str], per_class: int = 2):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / name / f"{k}.png")
    return root


def test_an_image_folder_validates_on_val_dir_with_the_training_class_indices(tmp_path):
    train_dir = _folder(tmp_path / "train", ["cat", "dog", "emu"])
    _folder(tmp_path / "val", ["dog", "emu"])
    data = ImageFolder(str(train_dir), 8, val_dir=str(tmp_path / "val"), random_flip=True)
    val = data.held_out()
    assert val.class_names == ["cat", "dog", "emu"] and sorted(set(val.labels)) == [1, 2]
    assert val.random_flip is False and val.random_crop is False
    assert ImageFolder(str(train_dir), 8).held_out() is None
    _folder(tmp_path / "odd", ["dog", "yak"])
    with pytest.raises(UserError, match="data.val_dir=.* has 1 classes that data.dir does not \\(yak\\)"):
        ImageFolder(str(train_dir), 8, val_dir=str(tmp_path / "odd")).held_out()


def test_validation_classifies_every_held_out_image_once_per_quartile():
    task, model = built()
    hw = training.build(classifier_cfg().hardware)
    env = type("Env", (), dict(rank=0, world_size=1, is_main=True))()
    metrics = task.evaluate(model.eval(), 0, RunContext(hw=hw, env=env, seed=0))
    keys = {f"val/{term}{q}" for term in ("loss", "acc@1", "acc@5") for q in ("", "_q0", "_q1", "_q2", "_q3")}
    assert set(metrics) == keys
    for term in ("loss", "acc@1", "acc@5"):  # equal counts per quartile: the mean is the quartiles' mean
        quartiles = [metrics[f"val/{term}_q{q}"] for q in range(4)]
        assert math.isclose(metrics[f"val/{term}"], sum(quartiles) / 4, rel_tol=1e-9)
    again = task.evaluate(model, 0, RunContext(hw=hw, env=env, seed=0))
    assert again == metrics  # the same noisy images at every evaluation
    assert task.evaluate(model, 0, RunContext(hw=hw, env=env, seed=1)) != metrics


def test_the_wrong_network_or_data_for_a_task_is_one_line(tmp_path):
    with pytest.raises(UserError, match="task=classifier trains a noisy-image classifier, not .*UNetModel"):
        train(classifier_cfg("model=unet_digits", "max_steps=1"), tmp_path / "a")
    with pytest.raises(UserError, match="is a noisy-image classifier: train it with task=classifier"):
        train(classifier_cfg("task=diffusion", "max_steps=1"), tmp_path / "b")
    with pytest.raises(UserError, match="model.image_size=8 but data.image_size=16"):
        train(classifier_cfg("data.image_size=16", "max_steps=1"), tmp_path / "c")
    with pytest.raises(UserError, match="task.val_timesteps=0: must be >= 1"):
        train(classifier_cfg("task.val_timesteps=0", "max_steps=1"), tmp_path / "d")


# --- through the engine --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("isolated_wandb")
def test_train_and_val_accuracy_reach_the_wandb_files(tmp_path):
    cfg = classifier_cfg("logger=wandb", "logger.mode=offline", "max_steps=4", "log_every=2", "eval_every=2")
    train(cfg, tmp_path, name="classifier")
    _, config, rows = read_wandb_history(str(tmp_path))
    assert config["task"]["_target_"] == "diffusion.engine.tasks.ClassifierTask"
    train_rows = [r for r in rows if "train/loss" in r]
    val_rows = [r for r in rows if "val/loss" in r]
    assert [r["_step"] for r in train_rows] == [2, 4] and [r["_step"] for r in val_rows] == [2, 4]
    for term in ("loss", "acc@1", "acc@5"):
        assert f"train/{term}" in train_rows[0] and f"val/{term}" in val_rows[0]
        assert {f"val/{term}_q{q}" for q in range(4)} <= set(val_rows[-1])
    assert any(k.startswith("train/acc@1_q") for k in train_rows[0])
    assert all(0 <= r[k] <= 1 for r in train_rows + val_rows for k in r if "acc@" in k)
    # What was logged at step 4 is the evaluation of the checkpoint's EMA at step 4.
    state = load_ckpt(tmp_path / "checkpoints/latest.pt")
    task, model = built()
    model.load_state_dict(state["ema"]["0.9999"])
    env = type("Env", (), dict(rank=0, world_size=1, is_main=True))()
    hw = training.build(cfg.hardware)
    again = task.evaluate(model.eval(), 4, RunContext(hw=hw, env=env, seed=0))
    for key, value in again.items():
        assert math.isclose(val_rows[-1][key], value, rel_tol=1e-6), key
    assert not (tmp_path / "samples").exists()  # a classifier makes no sample grids


@pytest.mark.slow
def test_classifier_resume_is_exact(tmp_path):
    """2N steps in one go == N steps, stop, resume for N: identical weights, EMA, optimizer and data position."""
    over = ["model.dropout=0.1", "optim.ema_rates=[0.9,0.99]", "optim.weight_decay=0.05", "eval_every=3"]
    train(classifier_cfg(*over, "max_steps=6"), tmp_path / "straight")
    train(classifier_cfg(*over, "max_steps=3"), tmp_path / "resumed")
    train(classifier_cfg(*over, "max_steps=6"), tmp_path / "resumed")  # resume=auto finds step 3
    a = load_ckpt(tmp_path / "straight/checkpoints/latest.pt")
    b = load_ckpt(tmp_path / "resumed/checkpoints/latest.pt")
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "sampler", "data", "rng", "step"):
        assert_state_equal(a[key], b[key], key)
    logged = [read_metrics_jsonl(str(tmp_path / run)) for run in ("straight", "resumed")]
    val = [[r for r in rows if r["step"] == 6 and "val/loss" in r][0] for rows in logged]
    assert val[0] == val[1]


@pytest.mark.slow
def test_two_ranks_validate_like_one(tmp_path):
    """Each rank classifies its share of the held-out images; the reduced metrics are one process's."""
    common = [*CLASSIFIER, "max_steps=1", "data.batch_size=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    for ranks in (1, 2):
        proc = subprocess.run(
            [TORCHRUN, f"--nproc_per_node={ranks}", "train.py", *common, f"hydra.run.dir={tmp_path / str(ranks)}"],
            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ([r for r in read_metrics_jsonl(str(tmp_path / str(n))) if "val/loss" in r][0] for n in (1, 2))
    assert set(one) == set(two) and len(one) == 16  # step + 3 terms x (overall + 4 quartiles)
    for key in one:
        assert math.isclose(one[key], two[key], rel_tol=1e-5), key
