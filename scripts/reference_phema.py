"""Write the EDM2 post-hoc EMA reference numbers that tests/test_phema.py compares against.

usage: python scripts/reference_phema.py EDM2_GIT_DIR [OUT_DIR]

EDM2_GIT_DIR is a bare clone of NVlabs/edm2 (e.g. from the search tool's fetch). The tree at HEAD is exported
to a temporary directory and its ``training/phema.py`` is imported by file path (it needs only numpy and
torch), so nothing is installed. Only numbers produced by running EDM2 are written, with the commit, to
OUT_DIR/edm2_phema.npz (default tests/fixtures/phema). EDM2 counts images: a run with batch size B at step t
has ``cur_nimg = t * B``; the fixtures keep both the image and the step numbers so the mapping is tested too.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

BATCH = 256  # images per step in the EDM2 units (any value works; 256 is not a power of two's worst case)
BETA_STDS = np.array([0.01, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20, 0.28])
BETA_STEPS = np.array([1, 2, 3, 5, 10, 33, 100, 1000, 12345, 100000, 2000000])
EMA_STDS = (0.05, 0.10)
EMA_STEPS = 60
OUT_STDS = np.array([0.03, 0.05, 0.07, 0.10, 0.15, 0.20])


def export_edm2(git_dir: Path, dest: Path) -> str:
    """Untar HEAD of ``git_dir`` into ``dest``; the commit hash."""
    commit = subprocess.run(
        ["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", f"--git-dir={git_dir}", "archive", commit], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return commit


def import_phema(tree: Path):
    spec = importlib.util.spec_from_file_location("edm2_phema", tree / "training" / "phema.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def weight_sequence(step: int, shape_w=(2, 3), shape_b=(2,)) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, non-monotonic float64 weight trajectory; step is 1-based."""
    n = int(np.prod(shape_w))
    w = torch.sin(0.37 * step + torch.arange(n, dtype=torch.float64)).reshape(shape_w) + 0.01 * step
    b = torch.cos(0.11 * step * torch.arange(1, shape_b[0] + 1, dtype=torch.float64))
    return w, b


def ema_sequence(edm2) -> tuple[np.ndarray, np.ndarray]:
    """EDM2's PowerFunctionEMA on nn.Linear(3, 2) (float64) fed weight_sequence: inputs and EMAs per step.

    Returns inputs ``[steps, 8]`` (weight then bias, flattened) and EMAs ``[steps, len(EMA_STDS), 8]``.
    """
    net = torch.nn.Linear(3, 2).double()
    ema = edm2.PowerFunctionEMA(net, stds=list(EMA_STDS))
    inputs, outs = [], []
    for step in range(1, EMA_STEPS + 1):
        w, b = weight_sequence(step)
        with torch.no_grad():
            net.weight.copy_(w)
            net.bias.copy_(b)
        ema.update(cur_nimg=step * BATCH, batch_size=BATCH)  # EDM2 calls this after cur_nimg += batch_size
        inputs.append(torch.cat([w.flatten(), b]).numpy())
        outs.append([torch.cat([e.weight.flatten(), e.bias]).detach().numpy().copy() for e, _ in ema.get()])
    return np.stack(inputs), np.array(outs)


def solve_grids(edm2) -> dict[str, np.ndarray]:
    """Coefficients for two snapshot grids (regular and irregular), in EDM2's image units."""
    grids = {
        "regular": np.arange(100, 2001, 100),
        "irregular": np.array([7, 40, 41, 150, 400, 1000, 1024, 3000, 8000, 8192]),
    }
    out = {}
    for name, steps in grids.items():
        in_step = np.repeat(steps, len(EMA_STDS))
        in_std = np.tile(EMA_STDS, len(steps))
        coefs = edm2.solve_posthoc_coefficients(in_step * BATCH, in_std, steps[-1] * BATCH, OUT_STDS)
        out[f"solve_{name}_in_step"] = in_step
        out[f"solve_{name}_in_std"] = in_std
        out[f"solve_{name}_coefs"] = coefs
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    git_dir = Path(argv[0])
    out_dir = (
        Path(argv[1])
        if len(argv) > 1
        else Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "phema"
    )
    with tempfile.TemporaryDirectory() as tmp:
        commit = export_edm2(git_dir, Path(tmp))
        edm2 = import_phema(Path(tmp))
        s, t = np.meshgrid(BETA_STDS, BETA_STEPS, indexing="ij")
        fixtures = {
            "commit": np.array(commit),
            "batch": np.array(BATCH),
            "beta_stds": BETA_STDS,
            "beta_steps": BETA_STEPS,
            "beta": edm2.power_function_beta(s, t * BATCH, BATCH),  # [stds, steps]
            "std_to_exp": edm2.std_to_exp(BETA_STDS),
            "exp_to_std": edm2.exp_to_std(edm2.std_to_exp(BETA_STDS)),
            "ema_stds": np.array(EMA_STDS),
            "out_stds": OUT_STDS,
        }
        fixtures["ema_inputs"], fixtures["ema_outputs"] = ema_sequence(edm2)
        fixtures.update(solve_grids(edm2))
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / "edm2_phema.npz", **fixtures)
    print(f"wrote {out_dir / 'edm2_phema.npz'} from NVlabs/edm2@{commit}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
