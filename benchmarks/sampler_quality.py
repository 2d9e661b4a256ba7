"""Which sampler at which budget: sample quality against network evaluations on the `make train` digits model.

    python benchmarks/sampler_quality.py                 # `make bench-quality`
    python benchmarks/sampler_quality.py --samples 200 --nfe 10 20 --samplers heun dpmpp_2m

Trains the digits model first when ``--checkpoint`` (outputs/digits/checkpoints/latest.pt) is missing, as `make
train` does. Then, with classifier-free guidance 2, it samples ``--samples`` images (labels 0..9 cycled, the same
per-image noise in every cell) with each continuous sampler at each NFE (network evaluations per batch; the
two-evaluation samplers get the step count whose NFE is the largest not above it), DPM-Solver++ on the discrete
timesteps at the same NFEs, and the goal's baselines DDIM 50 and DDPM 250. Every cell is scored against the real
digits the judge never saw: FID, precision and recall on the digit judge's features, and the judge's accuracy on
the conditioning labels. Writes ``<out>/sampler_quality.md`` (the table), ``.json`` and ``.png`` (the plot).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

import diffusion  # noqa: E402
from diffusion.data.images import to_uint8  # noqa: E402
from diffusion.evaluation.digit_judge import digit_accuracy  # noqa: E402
from diffusion.evaluation.evaluator import Evaluator  # noqa: E402
from diffusion.sample import load_model  # noqa: E402
from diffusion.sampling.generate import generate  # noqa: E402
from diffusion.sampling.k_samplers import SAMPLERS, network_evaluations  # noqa: E402
from diffusion.sampling.k_solver import KSampler  # noqa: E402
from diffusion.sampling.solvers import DDIM, DDPM, DPMSolverPP  # noqa: E402

NFES = (5, 10, 20, 35, 50)


def steps_for(sampler: str, nfe: int) -> int:
    """The most steps whose network evaluations do not exceed ``nfe``."""
    steps = nfe
    while steps > 1 and network_evaluations(sampler, steps) > nfe:
        steps -= 1
    return steps


def ensure_checkpoint(path: Path) -> None:
    if path.exists():
        print(f"reusing {path}", flush=True)
        return
    print(f"{path} missing: training the digits model (make train's run, ~4 min)", flush=True)
    subprocess.run(
        [sys.executable, "train.py", "experiment=digits", "hydra.run.dir=outputs/digits"],
        cwd=ROOT,
        check=True,
    )


def load(checkpoint: Path):
    diffusion.register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=[f"checkpoint={checkpoint}"])
    model, process, _ = load_model(cfg)
    return model, process


def cells(samplers: list[str], nfes: list[int]) -> list[tuple[str, object]]:
    out = []
    for name in samplers:
        for nfe in nfes:
            out.append((name, KSampler(name, steps_for(name, nfe))))
    for nfe in nfes:
        if nfe >= 2:
            out.append(("dpm_solver", DPMSolverPP(steps=nfe)))
    out.append(("ddim", DDIM(steps=50)))
    out.append(("ddpm", DDPM(steps=250)))
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("fid", "FID (digit-judge features) ↓"), ("precision", "precision ↑"), ("recall", "recall ↑"),
               ("accuracy", "judge accuracy ↑")]  # fmt: skip
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    names = sorted({r["solver"] for r in rows if r["solver"] not in ("ddim", "ddpm")})
    cmap = plt.get_cmap("tab20")
    for ax, (key, label) in zip(axes.flat, metrics, strict=True):
        for i, name in enumerate(names):
            pts = sorted((r["nfe"], r[key]) for r in rows if r["solver"] == name)
            style = "--" if name == "dpm_solver" else "-"
            ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, label=name, color=cmap(i))
        for name, color in (("ddim", "black"), ("ddpm", "grey")):
            for r in rows:
                if r["solver"] == name:
                    ax.axhline(r[key], color=color, ls=":", label=f"{name} {r['nfe']} NFE")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_title(label)
        ax.set_xticks(list(NFES))
        if key == "fid":
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict], nfes: list[int]) -> str:
    """Markdown: one row per solver, FID / accuracy per NFE, then the precision and recall table."""
    lines = []
    names = list(dict.fromkeys(r["solver"] for r in rows))
    for key, fmt in (
        ("fid", "{:.2f}"),
        ("accuracy", "{:.3f}"),
        ("precision", "{:.3f}"),
        ("recall", "{:.3f}"),
    ):
        lines.append(f"**{key}** (by target NFE; the actual NFE in brackets where it is lower)\n")
        lines.append("| solver | " + " | ".join(str(n) for n in nfes) + " |")
        lines.append("|---" * (len(nfes) + 1) + "|")
        for name in names:
            if name in ("ddim", "ddpm"):
                continue
            cells_ = []
            for n in nfes:
                match = [r for r in rows if r["solver"] == name and r["target_nfe"] == n]
                if not match:
                    cells_.append("")
                    continue
                r = match[0]
                extra = f" ({r['nfe']})" if r["nfe"] != n else ""
                cells_.append(fmt.format(r[key]) + extra)
            lines.append(f"| {name} | " + " | ".join(cells_) + " |")
        for name in ("ddim", "ddpm"):
            for r in rows:
                if r["solver"] == name:
                    lines.append(f"| {name} {r['nfe']} (baseline) | " + fmt.format(r[key]) + " |" * len(nfes))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="outputs/digits/checkpoints/latest.pt")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--batch", type=int, default=300)
    parser.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoint = (ROOT / args.checkpoint).resolve()
    ensure_checkpoint(checkpoint)
    model, process = load(checkpoint)
    evaluator = Evaluator(features="digits")
    evaluator.reference()
    judge = evaluator.feature_set.classifier
    labels = torch.arange(args.samples) % 10
    rows = []
    start_all = time.perf_counter()
    for name, solver in cells(args.samplers, args.nfe):
        start = time.perf_counter()
        images = []
        for b in range(0, args.samples, args.batch):
            idx = list(range(b, min(b + args.batch, args.samples)))
            x = generate(model, process, solver, idx, args.seed, torch.device("cpu"), labels[idx],
                         guidance_scale=args.guidance)  # fmt: skip
            images.append(to_uint8(x))
        images = np.concatenate(images)
        metrics = evaluator.compute_metrics(evaluator.extract(images))
        nfe = solver.network_evaluations
        target = nfe if name in ("ddim", "ddpm") else min(n for n in args.nfe if n >= nfe)
        row = {
            "solver": name, "steps": solver.steps, "nfe": nfe, "target_nfe": target,
            "fid": metrics["fid"], "precision": metrics["precision"], "recall": metrics["recall"],
            "accuracy": digit_accuracy(images, labels.numpy(), judge), "seconds": time.perf_counter() - start,
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "checkpoint": str(args.checkpoint), "samples": args.samples, "guidance_scale": args.guidance,
        "seed": args.seed, "schedule": "karras (continuous samplers)", "seconds": time.perf_counter() - start_all,
    }  # fmt: skip
    (out / "sampler_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    title = f"digits model (`make train`), CFG {args.guidance:g}, {args.samples} samples per cell, karras schedule"
    (out / "sampler_quality.md").write_text(f"{title}\n\n{table(rows, args.nfe)}")
    plot(rows, out / "sampler_quality.png", title)
    print(f"wrote {out / 'sampler_quality.md'}, .json, .png in {meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
