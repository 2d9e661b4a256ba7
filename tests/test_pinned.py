"""Images and checkpoints from before the package was reorganised (tests/pinned_samples.py) stay what they were:
the same images bit for bit through DDPM, DDIM and DPM-Solver++, unguided and with either guidance, and the
old checkpoint, whose config names the modules of that time, still samples and resumes."""

import pytest
import torch
from pinned_samples import CASES, CHECKPOINT, SAMPLES, SOLVERS, pinned_samples


@pytest.fixture(scope="module")
def now() -> dict[str, torch.Tensor]:
    return pinned_samples(CHECKPOINT)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("case", CASES)
def test_samples_are_bit_identical_to_the_pinned_ones(now, solver, case):
    before = torch.load(SAMPLES, weights_only=True)[f"{solver}/{case}"]
    assert torch.equal(now[f"{solver}/{case}"], before), (now[f"{solver}/{case}"] - before).abs().max()


def test_guidance_changes_the_pinned_images(now):
    # The pinned cases differ from each other: a guidance that silently did nothing would not pass the test above.
    for solver in SOLVERS:
        plain = now[f"{solver}/plain"]
        assert (now[f"{solver}/cfg"] - plain).abs().max() > 1e-3
        assert (now[f"{solver}/classifier"] - plain).abs().max() > 1e-3


def test_the_old_checkpoint_resumes(tmp_path):
    """A run directory whose checkpoint was written before the move continues from its step."""
    import os
    import shutil

    from diffusion.engine.training import train

    from conftest import load_ckpt, tiny_cfg

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    shutil.copy(CHECKPOINT, ckpt_dir / "step_00000002.pt")
    os.symlink("step_00000002.pt", ckpt_dir / "latest.pt")
    overrides = ("model.num_res_blocks=1", "model.channel_mult=[1,1]", "model.label_dropout=0.1")
    train(tiny_cfg("max_steps=3", "num_grid_samples=1", "solver.steps=2", *overrides), tmp_path)
    state = load_ckpt(ckpt_dir / "latest.pt")
    old = load_ckpt(CHECKPOINT)
    assert state["step"] == 3 and old["step"] == 2
    # one more optimizer step moved the weights from the old checkpoint's
    assert any(not torch.equal(state["model"][k], old["model"][k]) for k in old["model"])
