"""Every command of the README's "Usual commands" block runs, so that none of them can rot.

Each line is run as written, with three kinds of change, all below and nothing else:
- paths: ``/data/imagenet`` is a folder of 1000 class sub-folders of one small image each, ``outputs/...`` lies in a temporary
  directory, and OpenAI's and DiT's released files (``64x64_diffusion.pt``, ``DiT-XL-2-256x256.pt``...) are random
  state dicts saved in their format from the same presets at a CPU-sized width; ``/data/latents/...`` lies in the
  temporary directory too, and a line in latent space (``data.latent``, ``vae=``, the latent cache command) gets
  a tiny random VAE in diffusers' format (2x smaller sides, so its images are 64 px where SD's VAE makes them
  256 px); batches for the evaluator (OpenAI's reference batch, samples) hold 8 random 64 px images, and the
  Inception weights are a random state dict of the real one's layout;
- CPU-sized settings appended: a few steps, small batches, no W&B, a narrow network for the large presets;
- the SLURM scripts are not run here: CI's ``.ci/run`` starts and stops the cluster around ``make test``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from test_latent import save_tiny_vae

from diffusion.evaluation.inception import random_inception_state_dict

from conftest import PYTHON, ROOT, TORCHRUN, compose_cfg, load_ckpt

README = (ROOT / "README.md").read_text()

# CPU-sized widths of the big presets (the layouts stay the presets' own: levels, attention, heads per channel).
SHRINK = {
    "unet_64": ["model.num_channels=32", "model.num_res_blocks=1", "model.num_head_channels=32"],
    "unet_128": ["model.num_channels=32", "model.num_res_blocks=1"],
    "unet_256": ["model.num_channels=32", "model.num_res_blocks=1"],
    "dit_b_2": ["model.depth=1", "model.hidden_size=32", "model.num_heads=2"],
    "dit_xl_2": ["model.depth=1", "model.hidden_size=32", "model.num_heads=2"],
}
# OpenAI's and DiT's released files the README names, and the presets that build their layouts.
RELEASED = {
    "64x64_diffusion.pt": "unet_64",
    "256x256_diffusion.pt": "unet_256",
    "DiT-XL-2-256x256.pt": "dit_xl_2",
}
TRAIN_SIZE = ["max_steps=2", "save_every=0", "log_every=1", "data.batch_size=4", "data.num_workers=0",
              "eval.num_samples=8"]  # fmt: skip
# Image batches the evaluation commands read (8 random 64 px images each), and where the Inception weights lie.
BATCHES = ["VIRTUAL_imagenet64_labeled.npz", "outputs/my_samples/samples.npz", "outputs/ref64.npz"]
INCEPTION = "inception_weights.pth"
CPU = ["hardware=cpu", "logger=none"]


def usual_commands() -> list[str]:
    """The command lines of the README's "Usual commands" block, comments stripped."""
    block = README.split("## Usual commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


COMMANDS = usual_commands()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The files the commands name: an image folder, released-format state dicts, and the outputs/... directories
    that the README's own commands with ``hydra.run.dir=outputs/...`` write (my_run, the classifier, the upsampler,
    the 4x4 base model and its samples), run in the README's order."""
    root = tmp_path_factory.mktemp("readme")
    # ImageNet's layout and class count (so that OpenAI's 1000-class weights fit), one small image per class.
    rng = np.random.default_rng(0)
    for k in range(1000):
        (root / f"data/imagenet/n{k:08d}").mkdir(parents=True)
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"data/imagenet/n{k:08d}/n{k:08d}_1.png")
    for filename, preset in RELEASED.items():
        with torch.device("cpu"):
            model = instantiate(compose_cfg([f"model={preset}", *SHRINK[preset]]).model)
        torch.save(model.state_dict(), root / filename)
    save_tiny_vae(root / "vae")
    for k, name in enumerate(BATCHES):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        np.savez(root / name, arr_0=np.random.default_rng(k).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8))
    torch.save(random_inception_state_dict(seed=0), root / INCEPTION)
    # What the latent training lines read, then every line that writes outputs/... in README order (a cascade's
    # inputs come before it).
    for command in [c for c in COMMANDS if "diffusion.latent_cache" in c or "hydra.run.dir=outputs/" in c]:
        _run(adapt(command, root))
    return root


def in_latent_space(words: list[str]) -> bool:
    return any(w in ("data.latent=true", "diffusion.latent_cache") or w.startswith("vae=") for w in words)


def adapt(command: str, root: Path) -> list[str]:
    """The README line as this machine runs it (see the module docstring)."""
    slug = str(COMMANDS.index(command))
    words = []
    command = command.replace("/data/imagenet", str(root / "data/imagenet"))
    for word in shlex.split(command.replace("/data/latents", str(root / "data/latents"))):
        key, _, value = word.partition("=")
        if value.startswith("outputs/") or value in RELEASED or value in BATCHES:
            word = f"{key}={root / value}"
        elif word.startswith("outputs/") or word in BATCHES:  # a positional path
            word = str(root / word)
        words.append(word)
    script = next(w for w in words if w.endswith(".py") or w.startswith("diffusion."))
    extra = [o for w in words if w.startswith("model=") for o in SHRINK.get(w.split("=", 1)[1], [])]
    if in_latent_space(words):
        extra.append(f"vae.name_or_path={root / 'vae'}")
    if "--help" in words or "--cfg" in words:
        extra = []
    elif script == "train.py":
        extra += [*TRAIN_SIZE, *CPU]
        if "eval=inception" in words:
            extra += [f"eval.inception_weights={root / INCEPTION}", "solver.steps=5"]
        if "hydra/sweeper=optuna_objective" in words:
            extra.append("hydra.sweeper.n_trials=2")
        if "-m" in words:
            extra.append(f"hydra.sweep.dir={root / 'multirun' / slug}")
        elif not any(w.startswith("hydra.run.dir=") for w in words):
            extra.append(f"hydra.run.dir={root / 'runs' / slug}")
    elif script == "sample.py":
        extra += ["num_samples=4", "batch_size=2", "hardware=cpu"]
        if not any(w.startswith("hydra.run.dir=") for w in words):
            extra.append(f"hydra.run.dir={root / 'samples' / slug}")
    elif script == "diffusion.nll":
        extra += ["num_batches=1", "data.batch_size=4", "hardware=cpu", f"hydra.run.dir={root / 'nll'}"]
    elif script == "diffusion.latent_cache":
        extra += ["hardware=cpu", "data.num_workers=0", f"hydra.run.dir={root / 'latent_cache'}"]
    elif script == "diffusion.evaluate":
        extra += ["--inception-weights", str(root / INCEPTION), "--no-download", "--device", "cpu"]
    elif script == "diffusion.reference":
        extra += ["num_images=8", "hardware=cpu", "data.num_workers=0", f"eval.inception_weights={root / INCEPTION}",
                  f"hydra.run.dir={root / 'reference' / slug}"]  # fmt: skip
    launcher = {"python": [PYTHON], "torchrun": [TORCHRUN]}[words[0]]
    return launcher + words[1:] + extra


def _run(words: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        words, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
        env={**os.environ, "WANDB_SILENT": "true"},
    )  # fmt: skip
    assert proc.returncode == 0, f"{' '.join(words)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}"
    return proc


def test_the_block_has_the_commands_a_user_needs():
    assert "python train.py model=unet_128 data.dir=/data/imagenet optim.lr=1e-4" in COMMANDS  # the headline
    for piece in (
        "train.py -m",
        "hydra/launcher=slurm",
        "torchrun",
        "init_from=",
        "sample.py",
        "diffusion.nll",
        "model=dit_",
        "guidance_style=dit",
        "diffusion.latent_cache",
        "data.latent_cache=",
        "diffusion.evaluate",
        "diffusion.reference",
        "eval=inception eval.reference=",
        "hydra/sweeper=optuna_objective",
        "diffusion.report",
    ):
        assert any(piece in c for c in COMMANDS), piece


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("bash scripts/")])
def test_the_slurm_scripts_run_in_ci(command):
    assert command in (ROOT / ".ci/run").read_text().replace('"$(dirname "$0")/.."', "")


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        pytest.param(c, marks=pytest.mark.slurm) if "hydra/launcher=slurm" in c else c
        for c in COMMANDS
        if not c.startswith("bash scripts/")
    ],
)
def test_readme_command_runs(command, workspace, request):
    if "hydra/launcher=slurm" in command:
        request.getfixturevalue("slurm_cluster")
    resume = "hydra.run.dir=outputs/my_run" in command
    proc = _run(adapt(command, workspace) + (["max_steps=4"] if resume else []))
    if "--help" in command:
        assert "== Configuration groups ==" in proc.stdout
    if resume:  # the fixture ran it to step 2; running it again continues there
        assert (
            "at step 2" in proc.stdout
            and load_ckpt(workspace / "outputs/my_run/checkpoints/latest.pt")["step"] == 4
        )
    if "init_from=" in command:
        assert "initialised the weights from" in proc.stdout
    if "diffusion.evaluate" in command:
        assert all(
            f"{label}: " in proc.stdout for label in ("Inception Score", "FID", "sFID", "Precision", "Recall")
        )
    if "eval=" in command and "-m" not in command:
        assert "eval at step 2" in proc.stdout
