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
