"""SIGKILL at random moments, checkpoint writes included: latest.pt always loads and the resumed run
ends bit-identical to one that was never interrupted."""

from __future__ import annotations

import random
import signal
import subprocess
import time

import pytest

from conftest import PYTHON, ROOT, TINY, assert_state_equal, load_ckpt, run_script

pytestmark = pytest.mark.slow
STEPS = 12
ARGS = [
    *TINY,
    f"max_steps={STEPS}",
    "save_every=1",
    "keep_last=2",
    "sampler=loss_second_moment",
    "diffusion.noise_schedule=cosine",
    "diffusion.steps=8",
    "sample_every=0",
]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    run_script("train.py", *ARGS, f"hydra.run.dir={tmp_path / 'straight'}")
    run = tmp_path / "crashed"
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [PYTHON, str(ROOT / "train.py"), *ARGS, f"hydra.run.dir={run}"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        latest = run / "checkpoints" / "latest.pt"
        before = load_ckpt(latest)["step"] if latest.exists() else 0
        deadline = time.time() + 300
        while True:  # wait until this attempt has saved at least once, then kill at a random moment
            if proc.poll() is not None or time.time() > deadline:
                break
            if latest.exists() and load_ckpt(latest)["step"] > before:
                time.sleep(rng.uniform(0.0, 0.6))
                break
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        state = load_ckpt(latest)  # never a partial file
        assert 0 < state["step"] <= STEPS
        if state["step"] == STEPS:
            break
    assert kills >= 1
    run_script("train.py", *ARGS, f"hydra.run.dir={run}")  # resume=auto finishes the run
    a = load_ckpt(tmp_path / "straight/checkpoints/latest.pt")
    b = load_ckpt(run / "checkpoints/latest.pt")
    for key in ("step", "model", "ema", "optimizer", "scheduler", "sampler", "data", "rng"):
        assert_state_equal(a[key], b[key], key)
    # Temporary files of killed writes are removed by the next save; keep_last=2 bounds what stays.
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest.pt", f"step_{STEPS - 1:08d}.pt", f"step_{STEPS:08d}.pt"]
