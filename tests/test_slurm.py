"""Sweeps through the submitit launchers: on the real single-node SLURM cluster of scripts/slurm_start.sh
(marker `slurm`) and on the local launcher, plus how the launcher configs compose."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF, PYTHON, ROOT, TINY, assert_state_equal, load_ckpt, run_script


def cpu_node(tasks: int = 1) -> list[str]:
    """Launcher overrides for this cluster, one 2-core CPU node: no GPUs is the one override a one-task job
    needs (one task, the partition's default CPUs and memory); a job of two tasks (ranks) says so."""
    return [
        "hydra.launcher.gpus_per_node=0",
        *([f"hydra.launcher.tasks_per_node={tasks}"] if tasks > 1 else []),
    ]


LRS = {0: 1e-4, 1: 3e-4}


def job_args(sweep_dir: Path, max_steps: int, save_every: int) -> list[str]:
    """Overrides that train the tiny digits model for ``max_steps`` steps, saving every ``save_every``; a sweep
    writes job ``n`` to ``sweep_dir/n``."""
    tiny = [o for o in TINY if not o.startswith("save_every=")]
    return [
        *tiny,
        f"max_steps={max_steps}",
        f"save_every={save_every}",
        "sample_every=0",
        "solver.steps=5",
        f"hydra.sweep.dir={sweep_dir}",
        # The default subdir spells every override out and would exceed the 255-character name limit.
        "hydra.sweep.subdir=${hydra.job.num}",
    ]


def sweep_args(sweep_dir: Path) -> list[str]:
    """A two-job sweep (one job per learning rate) of the tiny digits model, 3 steps, checkpoints at 2 and 3."""
    return ["-m", "optim.lr=" + ",".join(str(lr) for lr in LRS.values()), *job_args(sweep_dir, 3, 2)]


def assert_jobs_trained(sweep_dir: Path) -> None:
    """Each job of the sweep wrote checkpoints at steps 2 and 3 with its own learning rate."""
    for num, lr in LRS.items():
        ckpts = sweep_dir / str(num) / "checkpoints"
        assert (ckpts / "step_00000002.pt").is_file(), f"job {num} wrote no step-2 checkpoint"
        latest = load_ckpt(ckpts / "latest.pt")
        assert latest["step"] == 3
        assert latest["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr)


def sacct_rows(job_id: str, *options: str) -> list[tuple[str, str]]:
    """(JobID, State) of each allocation SLURM accounted for ``job_id``; ``-D`` adds runs ended by a requeue."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", *options, "-j", job_id, "-o", "JobID,State"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [tuple(line.split("|")) for line in out.split()]


def sacct_states(job_id: str) -> dict[str, str]:
    return dict(sacct_rows(job_id))


def wait_until(what: str, ready: Callable[[], bool], timeout_s: float, procs: Sequence = ()) -> None:
    """Poll ``ready`` until it holds; fail after ``timeout_s`` or as soon as one of ``procs`` has exited."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        exited = [p.args for p in procs if p.poll() is not None]
        assert not exited, f"{exited} exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.2)


def job_folders(sweep_dir: Path) -> list[str]:
    """submitit's per-job folders of a sweep, named by SLURM job id: <array job id>_<task> for a sweep of
    several jobs, a plain job id for one job."""
    return sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir())


def start_script(script: str, *args: str, output: Path, env: dict | None = None) -> subprocess.Popen:
    """Like conftest.run_script, in the background; stdout+stderr go to ``output``, not to a pipe that nobody
    reads while the test waits (a full pipe would block the script)."""
    with output.open("w") as out:
        return subprocess.Popen(
            [PYTHON, str(ROOT / script), *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "WANDB_SILENT": "true", **(env or {})},
        )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def finish(proc: subprocess.Popen, output: Path, timeout_s: float) -> None:
    """Wait for a script started by :func:`start_script`; fail with its output when it failed."""
    try:
        proc.wait(timeout_s)
    finally:
        stop(proc)
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{output.read_text()[-4000:]}"


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_sweep_trains_each_job_on_the_cluster(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_script("train.py", *sweep_args(sweep_dir), "hydra/launcher=slurm", *cpu_node(), timeout=600)
    assert_jobs_trained(sweep_dir)
    # One array job with a task per sweep job: SLURM accounted both.
    array_ids = {name.split("_")[0] for name in job_folders(sweep_dir)}
    assert len(array_ids) == 1
    array_id = array_ids.pop()
    expected = {f"{array_id}_0": "COMPLETED", f"{array_id}_1": "COMPLETED"}
    # A job can still be COMPLETING for a moment after its result was written.
    wait_until(f"SLURM to account {expected}", lambda: sacct_states(array_id) == expected, 60)


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
        *cpu_node(),
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


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_job_with_two_tasks_trains_as_two_gloo_ranks(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_script(
        "train.py", "-m", *job_args(sweep_dir, 3, 2), "hydra/launcher=slurm", *cpu_node(tasks=2), timeout=600
    )
    # One job, so one run directory: the second task joined the first as rank 1 instead of training a copy.
    assert sorted(p.name for p in sweep_dir.iterdir()) == [".submitit", "0", "multirun.yaml"]
    (folder,) = job_folders(sweep_dir)
    # submitit writes one log per task (<job>_<task>_log.out): SLURM started both.
    assert sorted(p.name for p in (sweep_dir / ".submitit" / folder).glob("*_log.out")) == [
        f"{folder}_0_log.out",
        f"{folder}_1_log.out",
    ]
    log = (sweep_dir / "0" / "train.log").read_text()
    assert "rank 0/2 on" in log
    assert "rank 1/2" not in log  # only rank 0 writes train.log
    assert "parameters identical on all 2 ranks at step 3" in log
    # One set of checkpoints, written by rank 0 with both ranks' RNG states.
    ckpts = sweep_dir / "0" / "checkpoints"
    assert sorted(str(p.relative_to(sweep_dir)) for p in sweep_dir.rglob("*.pt")) == [
        "0/checkpoints/latest.pt",
        "0/checkpoints/step_00000002.pt",
        "0/checkpoints/step_00000003.pt",
    ]
    latest = load_ckpt(ckpts / "latest.pt")
    assert latest["step"] == 3
    assert len(latest["rng"]["torch"]) == 2


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_is_requeued_resumes_and_ends_as_an_uninterrupted_run(slurm_cluster, tmp_path):
    max_steps = 100
    # The signal follows the first checkpoint (step 10) by well under a second; 90 steps more take seconds.
    overrides = job_args(tmp_path / "sweep", max_steps, save_every=10)
    run_dir = tmp_path / "sweep" / "0"
    # The reference, trained without SLURM in the meantime. One thread, as slurm.yaml gives the job's one
    # CPU: a reduction split over another number of threads may round differently.
    direct_out = tmp_path / "direct.out"
    direct = start_script(
        "train.py",
        *overrides,
        f"hydra.run.dir={tmp_path / 'direct'}",
        output=direct_out,
        env={"OMP_NUM_THREADS": "1"},
    )
    sweep_out = tmp_path / "sweep.out"
    sweep = start_script("train.py", "-m", *overrides, "hydra/launcher=slurm", *cpu_node(), output=sweep_out)
    try:
        wait_until("the job's first checkpoint", (run_dir / "checkpoints" / "latest.pt").exists, 300, [sweep])
        (job_id,) = job_folders(tmp_path / "sweep")
        # What SLURM sends signal_delay_s before the time limit, sent now.
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)
        finish(sweep, sweep_out, 600)
    except BaseException:
        # A failed test leaves no job behind. Only then: a job whose result is in is still COMPLETING.
        stop(sweep)
        for job in job_folders(tmp_path / "sweep"):
            subprocess.run(["scancel", job], capture_output=True, check=False, timeout=60)
        raise
    finally:
        finish(direct, direct_out, 600)

    log = (run_dir / "train.log").read_text()  # both attempts append to it
    saved = [int(n) for n in re.findall(r"pre-emption signal: saved step (\d+)", log)]
    resumed = [int(n) for n in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert len(saved) == 1 and 10 < saved[0] < max_steps, f"interrupted once mid-training: {saved}"
    assert resumed == saved, "the requeued job resumed from the checkpoint saved on the signal"
    assert log.count("rank 0/1 on") == 2
    # submitit's handler on rank 0 requeued the job after the save, and SLURM ran the same job again.
    submitit_log = (tmp_path / "sweep" / ".submitit" / job_id / f"{job_id}_0_log.out").read_text()
    assert f"Requeued job {job_id}" in submitit_log
    wait_until(
        f"SLURM to account job {job_id} as requeued, then completed",
        lambda: sacct_rows(job_id, "-D") == [(job_id, "REQUEUED"), (job_id, "COMPLETED")],
        60,
    )

    interrupted = load_ckpt(run_dir / "checkpoints" / "latest.pt")
    uninterrupted = load_ckpt(tmp_path / "direct" / "checkpoints" / "latest.pt")
    assert interrupted["step"] == max_steps
    for key in ("step", "model", "ema", "optimizer", "scheduler", "sampler", "data", "rng"):
        assert_state_equal(interrupted[key], uninterrupted[key], key)


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


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_no_gpus_is_one_override(launcher):
    """A CPU-only partition: one task, and SLURM's own defaults for CPUs and memory (nothing requested)."""
    cfg = launcher_cfg(f"hydra/launcher={launcher}", "hydra.launcher.gpus_per_node=0", "hydra.sweep.dir=/s")
    assert (cfg.gpus_per_node, cfg.tasks_per_node) == (0, 1)
    if launcher == "slurm":
        assert cfg.cpus_per_task is None and cfg.mem_gb is None
        gpu = launcher_cfg("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8", "hydra.sweep.dir=/s")
        assert (gpu.tasks_per_node, gpu.cpus_per_task, gpu.mem_gb) == (8, 8, 64)


def test_slurm_launcher_config_requeues_with_a_warning_signal():
    cfg = launcher_cfg("hydra/launcher=slurm")
    assert cfg.signal_delay_s > 0 and cfg.max_num_timeout > 0
