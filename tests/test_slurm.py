"""Sweeps through the submitit launchers: on the real single-node SLURM cluster of scripts/slurm_start.sh
(marker `slurm`) and on the local launcher, plus how the launcher configs compose."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF, ROOT, TINY, load_ckpt, run_script

# This cluster is one CPU node: no GPUs to request, 2 cores for two concurrent jobs.
CPU_NODE = [
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.tasks_per_node=1",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
]
LRS = {0: 1e-4, 1: 3e-4}


def sweep_args(sweep_dir: Path) -> list[str]:
    """A two-job sweep (one job per learning rate) of the tiny digits model, 3 steps, checkpoints at 2 and 3."""
    tiny = [o for o in TINY if not o.startswith("save_every=")]
    return [
        "-m",
        "optim.lr=" + ",".join(str(lr) for lr in LRS.values()),
        *tiny,
        "max_steps=3",
        "save_every=2",
        "sample_every=0",
        "solver.steps=5",
        f"hydra.sweep.dir={sweep_dir}",
        # The default subdir spells every override out and would exceed the 255-character name limit.
        "hydra.sweep.subdir=${hydra.job.num}",
    ]


def assert_jobs_trained(sweep_dir: Path) -> None:
    """Each job of the sweep wrote checkpoints at steps 2 and 3 with its own learning rate."""
    for num, lr in LRS.items():
        ckpts = sweep_dir / str(num) / "checkpoints"
        assert (ckpts / "step_00000002.pt").is_file(), f"job {num} wrote no step-2 checkpoint"
        latest = load_ckpt(ckpts / "latest.pt")
        assert latest["step"] == 3
        assert latest["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr)


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """Start (or find running) the local cluster; skip when it cannot start, unless CI=true demands it."""
    required = os.environ.get("CI") == "true"
    if os.geteuid() != 0 and not required:
        pytest.skip("the local SLURM cluster needs root (scripts/slurm_start.sh starts munged and slurmd)")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm_start.sh")], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        message = f"scripts/slurm_start.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        if required:
            pytest.fail(message)
        pytest.skip(message)


def sacct_states(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("|") for line in out.split())


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_sweep_trains_each_job_on_the_cluster(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_script("train.py", *sweep_args(sweep_dir), "hydra/launcher=slurm", *CPU_NODE, timeout=600)
    assert_jobs_trained(sweep_dir)
    # submitit keeps one folder per array task, named <array job id>_<task>: SLURM accounted both.
    array_ids = {p.name.split("_")[0] for p in (sweep_dir / ".submitit").glob("*_*") if p.is_dir()}
    assert len(array_ids) == 1
    array_id = array_ids.pop()
    deadline = time.monotonic() + 60
    while (states := sacct_states(array_id)) != {f"{array_id}_0": "COMPLETED", f"{array_id}_1": "COMPLETED"}:
        # A job can still be COMPLETING for a moment after its result was written.
        assert time.monotonic() < deadline, f"SLURM states of job {array_id}: {states}"
        time.sleep(1)


@pytest.mark.slow
def test_local_sweep_trains_each_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # The local launcher's defaults fit any machine: one task, CUDA_VISIBLE_DEVICES=0 (unused on a CPU).
    # Both jobs start at once on this 2-core machine: one thread each, as slurm.yaml's setup line does on SLURM.
    run_script(
        "train.py", *sweep_args(sweep_dir), "hydra/launcher=local", timeout=600, env={"OMP_NUM_THREADS": "1"}
    )
    assert_jobs_trained(sweep_dir)
    assert len(list((sweep_dir / ".submitit").glob("*/*_0_result.pkl"))) == 2


@pytest.mark.slurm
def test_sbatch_rejection_reaches_the_user_as_one_error(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_script(
        "train.py",
        *sweep_args(sweep_dir),
        "hydra/launcher=slurm",
        *CPU_NODE,
        "hydra.launcher.partition=no_such_partition",
        check=False,
        timeout=300,
    )
    assert proc.returncode == 1
    errors = [
        line for line in proc.stdout.splitlines() if line.startswith("submitit.core.utils.FailedJobError")
    ]
    assert errors == [
        "submitit.core.utils.FailedJobError: sbatch: error: invalid partition specified: no_such_partition"
    ]
    assert "Batch job submission failed: Invalid partition name specified" in proc.stdout
    assert not list(sweep_dir.glob("*/train.log")), "no job may run when sbatch refused the sweep"


def launcher_cfg(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True).hydra.launcher


@pytest.mark.parametrize(
    ("launcher", "plugin_class"), [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")]
)
def test_launcher_config_runs_one_task_per_gpu(launcher, plugin_class):
    cfg = launcher_cfg(
        f"hydra/launcher={launcher}", "hydra.launcher.gpus_per_node=4", "hydra.sweep.dir=/sweeps/a"
    )
    assert cfg._target_ == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{plugin_class}"
    assert (cfg.gpus_per_node, cfg.tasks_per_node) == (4, 4)
    assert cfg.submitit_folder == "/sweeps/a/.submitit/%j"


def test_slurm_launcher_config_requeues_with_a_warning_signal():
    cfg = launcher_cfg("hydra/launcher=slurm")
    assert cfg.signal_delay_s > 0 and cfg.max_num_timeout > 0
