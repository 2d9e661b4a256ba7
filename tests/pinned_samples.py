"""Sampled images pinned before the package was reorganised (tests/fixtures/pinned/): a checkpoint written by the
code of that time and the images it gave through DDPM, DDIM and DPM-Solver++, each unguided, with
classifier-free guidance and with classifier guidance. ``python tests/pinned_samples.py`` rewrote them; after
the move the tests recompute the images with today's code and require them bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra.utils import instantiate

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pinned"
CHECKPOINT = FIXTURES / "digits_tiny_legacy.pt"  # written by the code before the move (its _target_ paths)
SAMPLES = FIXTURES / "samples.pt"
SOLVERS = {"ddpm": 6, "ddim": 5, "dpm_solver": 6}
CASES = ("plain", "cfg", "classifier")


def tiny_classifier() -> torch.nn.Module:
    from conftest import compose_cfg

    torch.manual_seed(3)
    cfg = compose_cfg(["model=classifier_digits", "model.num_head_channels=16", "data=digits"])
    classifier = instantiate(cfg.model, image_size=8, in_channels=1, num_classes=10).eval()
    with torch.no_grad():  # a new classifier's head is zeroed: give it a gradient worth steering with
        for p in classifier.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return classifier


def pinned_samples(checkpoint: Path = CHECKPOINT) -> dict[str, torch.Tensor]:
    """Four images of each (solver, case) at seed 7: {"ddpm/cfg": [4 x 1 x 8 x 8] Tensor, ...}."""
    from diffusion.sample import load_model
    from diffusion.sampling.generate import generate
    from diffusion.sampling.guidance import classifier_cond_fn

    from conftest import compose_cfg

    out = {}
    classes = torch.tensor([0, 3, 5, 9])
    classifier = tiny_classifier()
    for name, steps in SOLVERS.items():
        cfg = compose_cfg(
            ["hardware=cpu", f"solver={name}", f"solver.steps={steps}", f"checkpoint={checkpoint}"],
            config_name="sample",
        )
        model, diffusion, _ = load_model(cfg)
        solver = instantiate(cfg.solver)
        for case in CASES:
            kwargs = {"classes": classes}
            if case == "cfg":
                kwargs["guidance_scale"] = 2.0
            if case == "classifier":
                kwargs["cond_fn"] = classifier_cond_fn(classifier, classes, scale=4.0)
            x = generate(model, diffusion, solver, range(4), 7, torch.device("cpu"), **kwargs)
            out[f"{name}/{case}"] = x
    return out


def write_fixtures() -> None:
    """Train the tiny class-conditional model for two steps (weights perturbed so that they matter) and pin its
    samples."""
    import tempfile

    from diffusion.engine.training import train

    from conftest import tiny_cfg

    FIXTURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        overrides = ("model.num_res_blocks=1", "model.channel_mult=[1,1]")
        train(
            tiny_cfg(
                "max_steps=2", "model.label_dropout=0.1", "num_grid_samples=1", "solver.steps=2", *overrides
            ),
            run,
        )
        state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for rate in state["ema"]:
        state["ema"][rate] = {
            k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in state["ema"][rate].items()
        }
    torch.save(state, CHECKPOINT)
    torch.save(pinned_samples(CHECKPOINT), SAMPLES)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    write_fixtures()
