"""Shared test helpers: compose the real configs with Hydra's compose API and shrink them for a 2-core CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import diffusion

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# A network small enough that a training step takes milliseconds: digits at 8x8, two levels.
TINY = [
    "model=unet_digits",
    "model.image_size=8",
    "model.num_channels=32",
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[4]",
    "model.num_head_channels=16",
    "data=digits",
    "data.batch_size=8",
    "hardware=cpu",
    "logger=none",
    "log_every=1",
    "save_every=0",
]

diffusion.register()
os.environ.setdefault("WANDB_SILENT", "true")


def compose_cfg(overrides: list[str] = (), config_name: str = "train"):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def tiny_cfg(*overrides: str):
    return compose_cfg([*TINY, *overrides])


def run_script(script: str, *args: str, check: bool = True, timeout: int = 600, env: dict | None = None):
    """Run train.py / sample.py as a user would; returns the CompletedProcess (stdout+stderr merged)."""
    proc = subprocess.run(
        [PYTHON, str(ROOT / script), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env={**os.environ, "WANDB_SILENT": "true", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc


def load_ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_state_equal(a, b, path: str = "") -> None:
    """Bit-for-bit equality of nested checkpoint structures (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), (
            f"tensor differs at {path}"
        )
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {path}: {set(a) ^ set(b)}"
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"length differs at {path}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"value differs at {path}: {a!r} != {b!r}"


@pytest.fixture
def tiny():
    return tiny_cfg


@pytest.fixture
def isolated_wandb(tmp_path, monkeypatch):
    """No credentials, no prompts, no console capture; W&B's service and login state reset after the test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / ".cache" / "wandb"))
    yield
    import wandb

    wandb.teardown()


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """A random-weights Inception file in the real file's format (a plain state dict saved with torch.save)."""
    from diffusion.evaluation.inception import WEIGHTS_FILENAME, random_inception_state_dict

    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILENAME
    torch.save(random_inception_state_dict(seed=0), path)
    return path


def run_solver(solver, model, process, x_T, noise=None, cond_fn=None, model_kwargs=None, callback=None):
    """A solver on a bare network (or test stand-in) and its process, guided by ``cond_fn`` when given: the
    denoiser ``generate`` would build, without generate's per-image noise."""
    from diffusion.sampling.guidance import guided_denoiser

    denoiser = guided_denoiser(
        model,
        process,
        clip_denoised=solver.clip_denoised,
        cond_fn=cond_fn,
        classifier_form=solver.classifier_form,
        quantize=getattr(solver, "quantize", None),
    )
    return solver(denoiser, x_T, extra_args=model_kwargs, noise=noise, callback=callback)


# --- tiers -------------------------------------------------------------------------------------------------------
# unit: one module or function, no training run, no subprocess (make test-fast runs these, in under 3 minutes);
# integration: the engine, the commands and the tasks end to end on tiny models; system: a real SLURM cluster, W&B's
# files, several processes, the README's commands. make test (CI) runs all three.
SYSTEM_FILES = {
    "test_slurm",
    "test_wandb_run",
    "test_distributed",
    "test_readme",
    "test_optuna_sweep",
    "test_crash",
}
INTEGRATION_FILES = {
    "test_training", "test_sampling", "test_dit_runs", "test_dit_platform", "test_classifier_training",
    "test_super_res", "test_guided_sampling", "test_nll", "test_sample_quality", "test_cli", "test_bench",
    "test_eval_bench", "test_reference", "test_latent", "test_cluster", "test_report", "test_pinned",
    "test_evaluate", "test_guided_models", "test_dit_bench", "test_architecture",
}  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SYSTEM_FILES or item.get_closest_marker("slurm") or "wandb" in item.name:
            item.add_marker(pytest.mark.system)
        elif module in INTEGRATION_FILES or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)
