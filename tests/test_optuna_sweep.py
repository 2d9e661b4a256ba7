"""Optuna sweeps (hydra-optuna-sweeper) over train.py: each trial hands the sweeper the final value of its
eval.objective, the one its run logged, in the objective's direction; a failed trial is recorded as failed."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from conftest import PYTHON, ROOT

pytestmark = pytest.mark.slow

TINY = [
    "model=unet_digits", "model.image_size=8", "model.num_channels=32", "model.channel_mult=[1,2]",
    "model.attention_resolutions=[4]", "model.num_head_channels=16", "data=digits", "data.batch_size=8",
    "hardware=cpu", "logger=none", "log_every=1", "save_every=0",
    "eval=digits", "eval.num_samples=12", "eval.batch_size=12", "solver.steps=2",
]  # fmt: skip

# A Hydra callback that writes, into each job's directory, what the job handed the sweeper.
RECORDER = """
import json
from pathlib import Path

from hydra.experimental.callback import Callback


class RecordReturns(Callback):
    def on_job_end(self, config, job_return, **kwargs):
        failed = job_return.status.name == "FAILED"
        record = {
            "status": job_return.status.name,
            "value": None if failed else job_return.return_value,
            "error": str(job_return._return_value) if failed else None,
        }
        Path(config.hydra.runtime.output_dir, "returned.json").write_text(json.dumps(record))
"""


def sweep(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    (tmp_path / "record_returns.py").write_text(RECORDER)
    return subprocess.run(
        [PYTHON, str(ROOT / "train.py"), "-m", "hydra/sweeper=optuna_objective", *TINY, *overrides,
         f"hydra.sweep.dir={tmp_path / 'sweep'}", "+hydra.callbacks.record._target_=record_returns.RecordReturns"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
    )  # fmt: skip


def jobs(tmp_path) -> list[tuple[dict, dict, list[dict]]]:
    """(returned, config, eval rows) of every job of the sweep, in launch order."""
    out = []
    for job in sorted(
        (p for p in (tmp_path / "sweep").iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    ):
        returned = json.loads((job / "returned.json").read_text())
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        metrics = job / "metrics.jsonl"
        rows = [r for r in map(json.loads, open(metrics)) if "eval/fid" in r] if metrics.exists() else []
        out.append((returned, config, rows))
    return out


def test_two_trials_return_the_fid_their_runs_logged_and_the_best_is_the_lowest(tmp_path):
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=2", "max_steps=2", "optim.lr=tag(log,interval(1e-4,1e-2))")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Directions: ['minimize']" in proc.stdout  # FID: lower is better, from eval.objective
    trials = jobs(tmp_path)
    assert len(trials) == 2
    for returned, _, rows in trials:
        assert returned["status"] == "COMPLETED"
        assert returned["value"] == rows[-1]["eval/fid"]  # the final evaluation, exactly as logged
    assert trials[0][1]["optim"]["lr"] != trials[1][1]["optim"]["lr"]
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    best = min(trials, key=lambda t: t[0]["value"])
    assert results["best_value"] == best[0]["value"]
    assert results["best_params"] == {"optim.lr": best[1]["optim"]["lr"]}


def test_a_failed_trial_is_recorded_as_failed_and_the_direction_follows_the_objective(tmp_path):
    """max_steps=-1 fails its trial (a config error at run time): the sweeper logs why and records no value for
    it; the sweep goes on and reports the trial that completed. IS is maximised."""
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=3", "eval.objective=is", "max_steps=choice(2,-1)")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Directions: ['maximize']" in proc.stdout
    trials = jobs(tmp_path)
    failed = [t for t in trials if t[1]["max_steps"] == -1]
    completed = [t for t in trials if t[1]["max_steps"] == 2]
    assert failed and completed, [t[1]["max_steps"] for t in trials]  # seeded sampler: both values drawn
    for returned, _, rows in failed:
        assert returned["status"] == "FAILED" and "max_steps=-1: must be >= 0" in returned["error"]
        assert not rows
    assert proc.stdout.count("Failed experiment: max_steps=-1: must be >= 0") == len(failed)
    for returned, _, rows in completed:
        assert returned["value"] == rows[-1]["eval/is"]
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(t[0]["value"] for t in completed)
    assert results["best_params"] == {"max_steps": 2}


def test_a_sweep_whose_trials_all_fail_fails(tmp_path):
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=1", "max_steps=-1")
    assert proc.returncode != 0
    assert "Failed experiment: max_steps=-1: must be >= 0" in proc.stdout
    assert not (tmp_path / "sweep" / "optimization_results.yaml").exists()
