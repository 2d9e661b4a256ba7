"""The engine's W&B run, read back from the files W&B wrote: quartile means, resume, 2 ranks."""

from __future__ import annotations

import math
import os
import subprocess

import pytest
import torch

from diffusion.engine.loggers import read_wandb_history
from diffusion.engine.training import train
from diffusion.process.gaussian import GaussianDiffusion

from conftest import ROOT, TINY, TORCHRUN, run_script, tiny_cfg

pytestmark = pytest.mark.usefixtures("isolated_wandb")


def expected_means(records: list[tuple[torch.Tensor, dict]], T: int) -> dict:
    """Hand computation: every example of the interval counts once, quartile = floor(4 t / T)."""
    t = torch.cat([r[0] for r in records])
    out = {}
    for term in records[0][1]:
        v = torch.cat([r[1][term] for r in records]).double()
        out[f"train/{term}"] = v.mean().item()
        for q in range(4):
            sel = (4 * t) // T == q
            if sel.any():
                out[f"train/{term}_q{q}"] = v[sel].mean().item()
    return out


@pytest.mark.slow
def test_quartile_means_and_resume_in_the_wandb_files(tmp_path, monkeypatch):
    recorded: list[tuple[torch.Tensor, dict]] = []
    original = GaussianDiffusion.training_losses

    def recording(self, model, x_start, t, **kwargs):
        terms = original(self, model, x_start, t, **kwargs)
        recorded.append((t.clone(), {k: v.detach().clone() for k, v in terms.items()}))
        return terms

    monkeypatch.setattr(GaussianDiffusion, "training_losses", recording)
    wandb_cfg = ["logger=wandb", "logger.mode=offline", "log_every=2", "data.microbatch=4"]
    train(tiny_cfg(*wandb_cfg, "max_steps=4"), tmp_path, name="quartiles")
    run_id, config, rows = read_wandb_history(str(tmp_path))
    loss_rows = [r for r in rows if "train/loss" in r]
    assert [r["_step"] for r in loss_rows] == [2, 4]
    # 2 steps x 2 micro-batches = 4 recorded calls per interval
    for row, records in zip(loss_rows, (recorded[0:4], recorded[4:8])):
        want = expected_means(records, T=1000)
        assert {k for k in row if k.startswith(("train/loss", "train/mse", "train/vb"))} == set(want)
        for key, value in want.items():
            assert math.isclose(row[key], value, rel_tol=1e-5), key
    assert config["model"]["num_channels"] == 32 and config["optim"]["lr"] == 1e-4
    assert {"train/lr", "train/grad_norm", "train/images_per_s", "train/skipped_steps"} <= set(loss_rows[0])
    assert any("samples.path" in r or any(k.startswith("samples") for k in r) for r in rows)

    train(tiny_cfg(*wandb_cfg, "max_steps=6"), tmp_path, name="quartiles")  # resume: same W&B run
    run_id2, _, rows2 = read_wandb_history(str(tmp_path))
    assert run_id2 == run_id
    steps = [r["_step"] for r in rows2 if "train/loss" in r]
    assert steps == [2, 4, 6]


@pytest.mark.slow
def test_two_ranks_one_wandb_run_covering_both(tmp_path):
    """Under torchrun one W&B run exists, and its quartile means are the global batch's: they equal a single
    process's on the same global batch (timesteps and noise are drawn per global batch, so they are the same)."""
    common = [*TINY, "data.batch_size=16", "max_steps=1", "logger=wandb", "logger.mode=offline"]
    env = {"HOME": str(tmp_path), "WANDB_MODE": "offline"}
    run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'one'}", env=env)
    proc = subprocess.run(
        [TORCHRUN, "--nproc_per_node=2", "train.py", *common, f"hydra.run.dir={tmp_path / 'two'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "two").glob("wandb/*run-*/run-*.wandb"))) == 1
    _, _, one = read_wandb_history(str(tmp_path / "one"))
    _, _, two = read_wandb_history(str(tmp_path / "two"))
    a = next(r for r in one if "train/loss" in r)
    b = next(r for r in two if "train/loss" in r)
    quartile_keys = [k for k in a if "_q" in k]
    assert quartile_keys and set(quartile_keys) == {k for k in b if "_q" in k}
    for k in quartile_keys + ["train/loss", "train/mse", "train/vb"]:
        assert math.isclose(a[k], b[k], rel_tol=1e-5), k
