"""torchrun with 2 gloo ranks through train.py: one run directory, one writer, DDP equals one process."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import ROOT, TINY, TORCHRUN, load_ckpt, run_script

pytestmark = pytest.mark.slow
SGD = ["optim.optimizer._target_=torch.optim.SGD", "hardware.fused_optimizer=false", "optim.lr=1.0"]


def torchrun(*args: str, cwd=ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TORCHRUN, "--nproc_per_node=2", str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_two_ranks_share_one_run_directory_and_match_one_process(tmp_path):
    common = [*TINY, "data.batch_size=16", "max_steps=1", *SGD]
    # No hydra.run.dir: the default, time-stamped one must be the same for both ranks.
    proc = torchrun(*common, "save_every=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.pt", "step_00000001.pt"]
    log = (run / "train.log").read_text()
    assert "parameters identical on all 2 ranks at step 1" in log
    assert "rank 0/2" in log and "rank 1/2" not in log  # only rank 0 writes the log

    run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'single'}")
    two = load_ckpt(run / "checkpoints/latest.pt")
    one = load_ckpt(tmp_path / "single/checkpoints/latest.pt")
    # With SGD and lr=1 a parameter's update is minus its gradient: compare the updates.
    for k in one["model"]:
        a, b = one["model"][k], two["model"][k]
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (k, (a - b).abs().max().item())


def test_a_dead_rank_stops_the_other(tmp_path):
    """SIGKILL one of two ranks mid-training: torchrun ends the survivor and exits non-zero, within bounds."""
    proc = subprocess.Popen(
        [
            TORCHRUN,
            "--nproc_per_node=2",
            str(ROOT / "train.py"),
            *TINY,
            "max_steps=100000",
            "dist_timeout_s=60",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not (tmp_path / "metrics.jsonl").exists():  # training has started on both ranks
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.5)
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) == 2
        os.kill(int(children[-1]), signal.SIGKILL)
        start = time.time()
        rc = proc.wait(timeout=120)
        assert rc != 0 and time.time() - start < 120
        for pid in children:
            assert (
                not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
            )
    finally:
        if proc.poll() is None:
            proc.kill()
