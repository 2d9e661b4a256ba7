"""The digits measurement behind docs/phema.md: FID against the post-hoc EMA length, at two guidance scales.

    python train.py experiment=digits optim.ema_stds=[0.05,0.10] optim.ema_snapshot_every=100 \\
        hydra.run.dir=outputs/digits_phema
    python scripts/phema_sweep.py outputs/digits_phema --stds 0.03 0.05 0.07 0.10 0.15 0.20 --scales 1 2

For each sigma_rel the EMA is reconstructed from the run's snapshots (sample.py's ``ema_std=``, which
``python -m diffusion.phema`` writes to a file); ``--num`` images (all classes in turn) are sampled at each
guidance scale with ``--solver`` and scored by ``python -m diffusion.evaluate --features digits`` (FID on the
digit judge's features, against the real digits the judge never saw), with the judge's accuracy against the
requested classes. The run's own constant-rate EMA (its checkpoint) is scored too, for comparison. Then 100
samples (10 per class) of ``--check-std`` are judged: how many the judge reads as their class. Writes
``OUT/results.json``, prints a Markdown table, and draws FID against sigma_rel (one line per scale) to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from digit_scores import score  # scripts/digit_scores.py
from hydra import compose, initialize_config_dir

import diffusion
from diffusion.evaluation.digit_judge import judge_samples, train_digit_classifier
from diffusion.sample import sample


def sample_cfg(overrides: list[str]):
    with initialize_config_dir(str(diffusion.CONF_DIR), version_base="1.3"):
        return compose("sample", overrides=["hardware=cpu", "hardware.num_threads=1", *overrides])


def draw(args, source: list[str], out: Path, num: int, scale: float, classes: str | None = None) -> Path:
    extra = [f"classes={classes}"] if classes else []
    cfg = sample_cfg([*source, f"num_samples={num}", "batch_size=250", f"guidance_scale={scale}",
                      f"solver={args.solver}", f"solver.steps={args.steps}", f"seed={args.seed}", *extra])  # fmt: skip
    return sample(cfg, out)


def plot(results: dict, scales: list[float], path: Path, run: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, scale in enumerate(scales):
        rows = [r for r in results["posthoc"] if r["guidance_scale"] == scale]
        line = ax.plot([r["ema_std"] for r in rows], [r["fid"] for r in rows], "o-", color=f"C{i}",
                       label=f"post-hoc EMA, guidance {scale:g}")  # fmt: skip
        const = next(r for r in results["constant_rate"] if r["guidance_scale"] == scale)
        ax.axhline(const["fid"], ls="--", color=line[0].get_color(), alpha=0.6,
                   label=f"tracked EMA rate {const['ema_rate']:g}, guidance {scale:g}")  # fmt: skip
    ax.set_xlabel("EMA length sigma_rel (reconstructed after training)")
    ax.set_ylabel("FID (digit judge features; lower is better)")
    ax.set_title(f"digits, {results['step']} steps: one training run, every EMA length", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run", help="a run directory trained with optim.ema_stds and optim.ema_snapshot_every"
    )
    parser.add_argument("--stds", type=float, nargs="+", default=[0.03, 0.05, 0.07, 0.10, 0.15, 0.20])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--solver", default="dpm_solver")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-std", type=float, default=0.07)
    parser.add_argument("--out", default="outputs/phema_sweep")
    parser.add_argument("--plot", default="docs/phema_fid.png")
    args = parser.parse_args()
    diffusion.register()
    torch.set_num_threads(1)
    out, run = Path(args.out), Path(args.run)
    judge = train_digit_classifier()
    latest = torch.load(run / "checkpoints/latest.pt", map_location="cpu", weights_only=True, mmap=True)
    results = {"run": str(run), "step": int(latest["step"]), "num_samples": args.num,
               "solver": f"{args.solver} {args.steps} steps", "posthoc": [], "constant_rate": []}  # fmt: skip
    rate = next(iter(latest["ema"]), None)
    for scale in args.scales:
        start = time.perf_counter()
        if rate is not None:
            path = draw(
                args,
                [f"checkpoint={run}/checkpoints/latest.pt"],
                out / f"rate{rate}_w{scale:g}",
                args.num,
                scale,
            )
            row = {"ema_rate": float(rate), "guidance_scale": scale, **score(path, judge)}
            results["constant_rate"].append(row)
            print(row, f"({time.perf_counter() - start:.0f} s)", flush=True)
        for std in args.stds:
            start = time.perf_counter()
            path = draw(
                args, [f"checkpoint={run}", f"ema_std={std}"], out / f"std{std:g}_w{scale:g}", args.num, scale
            )
            row = {"ema_std": std, "guidance_scale": scale, **score(path, judge)}
            results["posthoc"].append(row)
            print(row, f"({time.perf_counter() - start:.0f} s)", flush=True)
    check = {}
    for scale in args.scales:
        path = draw(args, [f"checkpoint={run}", f"ema_std={args.check_std}"], out / f"check{args.check_std:g}_w{scale:g}",
                    100, scale, classes="[0,1,2,3,4,5,6,7,8,9]")  # fmt: skip
        with np.load(path) as npz:
            report = judge_samples(npz["arr_0"], npz["arr_1"], judge)
        check[f"{scale:g}"] = round(report["accuracy"] * 100)
    results["judge_check"] = {"ema_std": args.check_std, "recognised_of_100": check}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.scales, Path(args.plot), str(run))

    print("\n| sigma_rel | " + " | ".join(f"FID, w={s:g}" for s in args.scales) + " |")
    print("|---|" + "---|" * len(args.scales))
    for std in args.stds:
        fids = [next(r["fid"] for r in results["posthoc"] if r["ema_std"] == std and r["guidance_scale"] == s)
                for s in args.scales]  # fmt: skip
        print(f"| {std:g} | " + " | ".join(f"{f:.4f}" for f in fids) + " |")
    for r in results["constant_rate"][:1]:
        fids = [c["fid"] for c in results["constant_rate"]]
        print(f"| tracked rate {r['ema_rate']:g} | " + " | ".join(f"{f:.4f}" for f in fids) + " |")
    print(f"judge: samples of sigma_rel {args.check_std} recognised as their class, of 100: {check}")
    print(f"wrote {out / 'results.json'} and {args.plot}")


if __name__ == "__main__":
    main()
