"""train.py as a user runs it: one step, --help, --cfg job, -m sweeps, and one clear line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusion.engine.loggers import _wandb_records

from conftest import ROOT, TINY, load_ckpt, run_script


def image_folder(root, classes=("cat", "dog"), per_class=4, size=12):
    """A small ImageNet-layout folder: one sub-folder per class of random RGB PNGs."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return root


def test_the_headline_command_trains_on_an_image_folder(tmp_path):
    """`python train.py model=... data.dir=... optim.lr=...` as the README's first command, on a small model and
    folder; the class sub-folders are the labels without a flag."""
    folder = image_folder(tmp_path / "images")
    run_script(
        "train.py", "model=unet_digits", f"data.dir={folder}", "optim.lr=1e-4",
        # A CPU-sized run: one step of a batch of 4, no W&B, no workers.
        "max_steps=1", "data.batch_size=4", "data.num_workers=0", "hardware=cpu", "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    state = load_ckpt(tmp_path / "run/checkpoints/latest.pt")
    assert state["step"] == 1 and state["class_names"] == ["cat", "dog"]
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-4
    assert "in_channels: 3" in state["model_config"] and "num_classes: 2" in state["model_config"]


def test_train_py_alone_names_data_dir_and_the_digits_recipe(tmp_path):
    proc = run_script("train.py", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 1
    lines = [line for line in proc.stdout.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "data.dir" in lines[0] and "experiment=digits" in lines[0]
    assert "Traceback" not in proc.stdout


def test_a_bug_keeps_its_traceback(tmp_path):
    """A ValueError raised by code (here a network's forward) is not a user error: it is not cut to one line."""
    (tmp_path / "buggy.py").write_text(
        "from diffusion.models.unet import UNetModel\n\n\n"
        "class BuggyUNet(UNetModel):\n"
        "    def forward(self, x, t, y=None):\n"
        "        raise ValueError('an internal bug in forward')\n"
    )
    proc = run_script(
        "train.py", *TINY, "max_steps=1", "model._target_=buggy.BuggyUNet", f"hydra.run.dir={tmp_path / 'run'}",
        check=False, env={"PYTHONPATH": f"{tmp_path}:{ROOT}"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" in proc.stdout and "an internal bug in forward" in proc.stdout
    assert "buggy.py" in proc.stdout  # the frame that raised it is shown


def test_compose_and_instantiate_from_python_after_diffusion_register(tmp_path):
    """What a notebook does: one line of setup, diffusion.register() (a fresh interpreter, not this session)."""
    code = (
        "import diffusion, torch\n"
        "from hydra import compose, initialize_config_dir\n"
        "from hydra.utils import instantiate\n"
        "diffusion.register()\n"
        "with initialize_config_dir(str(diffusion.CONF_DIR), version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['model=unet_64'])\n"
        "with torch.device('meta'):\n"
        "    model = instantiate(cfg.model)\n"
        "print(type(model).__name__, sum(p.numel() for p in model.parameters()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    layouts = json.loads((ROOT / "tests/fixtures/reference/released_layouts.json").read_text())
    assert out.stdout.split() == ["UNetModel", str(layouts["64x64_diffusion"]["num_parameters"])]


def test_one_training_step_through_train_py(tmp_path):
    run_script("train.py", *TINY, "max_steps=1", f"hydra.run.dir={tmp_path}")
    state = load_ckpt(tmp_path / "checkpoints/latest.pt")
    assert state["step"] == 1
    assert (tmp_path / ".hydra/config.yaml").exists() and (tmp_path / "train.log").stat().st_size > 0
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl") if "train/loss" in x] == [1]


def test_help_and_cfg_job():
    out = run_script("train.py", "--help").stdout
    groups = out.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = dict(line.split(": ", 1) for line in groups.splitlines() if ": " in line)
    assert set(listed) == {
        "model", "diffusion", "data", "optim", "sampler", "hardware", "logger", "solver", "task", "eval", "experiment",
        "vae",
    }  # fmt: skip
    assert "unet_256_uncond" in listed["model"] and "dpm_solver" in listed["solver"]
    # Only options a user can pick: the schemas the options extend are not listed anywhere.
    assert "schema" not in groups and "base_" not in groups
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
