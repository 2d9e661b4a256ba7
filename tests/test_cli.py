"""train.py as a user runs it: one step, --help, --cfg job, -m sweeps, and one clear line for bad input."""

from __future__ import annotations

import json

import pytest

from diffusion.loggers import _wandb_records

from conftest import TINY, load_ckpt, run_script


def test_one_training_step_through_train_py(tmp_path):
    run_script("train.py", *TINY, "max_steps=1", f"hydra.run.dir={tmp_path}")
    state = load_ckpt(tmp_path / "checkpoints/latest.pt")
    assert state["step"] == 1
    assert (tmp_path / ".hydra/config.yaml").exists() and (tmp_path / "train.log").stat().st_size > 0
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl") if "train/loss" in x] == [1]


def test_help_and_cfg_job():
    out = run_script("train.py", "--help").stdout
    for group in ("model:", "diffusion:", "data:", "optim:", "sampler:", "hardware:", "logger:", "solver:"):
        assert group in out
    assert "unet_256_uncond" in out and "dpm_solver" in out
    cfg = run_script("train.py", "--cfg", "job", "model=unet_128", "optim.lr=3e-4").stdout
    assert "num_channels: 256" in cfg and "lr: 0.0003" in cfg


@pytest.mark.slow
def test_multirun_sweep_with_the_basic_launcher(tmp_path):
    run_script(
        "train.py",
        "-m",
        *TINY,
        "max_steps=1",
        "optim.lr=1e-4,3e-4",
        "logger=wandb",
        "logger.mode=offline",
        f"hydra.sweep.dir={tmp_path}",
        env={"HOME": str(tmp_path)},
    )
    lrs, groups, names = [], set(), set()
    for job in ("0", "1"):
        state = load_ckpt(tmp_path / job / "checkpoints/latest.pt")
        assert state["step"] == 1
        lrs.append(state["optimizer"]["param_groups"][0]["lr"])
        (path,) = (tmp_path / job).glob("wandb/offline-run-*/run-*.wandb")
        run = next(r["run"] for r in _wandb_records(path) if r["type"] == "run")
        groups.add(run["run_group"])
        names.add(run["display_name"])
    assert lrs == [1e-4, 3e-4]
    assert groups == {tmp_path.name} and len(names) == 2  # one W&B group per sweep, one named run per job


@pytest.mark.parametrize(
    "args, message",
    [
        (["data=image_folder"], "missing required value data.dir"),
        (["data=image_folder", "data.dir=/no/such/dir"], "looked at '/no/such/dir'"),
        (["model=unet_9000"], "unet_9000"),
        (["data.image_size=16"], "model.image_size=8 but data.image_size=16"),
        (["resume=/no/such.pt"], "resume=/no/such.pt: no such file"),
        (["optim.ema_rates=[1.0]"], "every rate must be in (0, 1)"),
        (["model.num_channels=30"], "num_channels"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, args, message):
    proc = run_script(
        "train.py", *TINY, "max_steps=1", *args, f"hydra.run.dir={tmp_path / 'run'}", check=False
    )
    assert proc.returncode != 0
    assert message in proc.stdout
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()
