"""The digits comparison behind the README's formulations table: ADM, EDM and flow matching, each on the UNet and
the DiT of the digits recipes, at the `make train` budget (2,000 steps), each scored at its best sampler at about
10 and about 35 network evaluations.

    python scripts/formulations_compare.py                       # trains the six runs, then samples and scores
    python scripts/formulations_compare.py --skip-training       # reuse outputs/formulations/*

Training is one `-m` sweep per backbone, as a user would run it:
``python train.py -m experiment=digits diffusion=adm,edm,flow`` (and ``experiment=digits_dit``). Each run then
samples ``--num`` images (all classes in turn, classifier-free guidance ``--guidance``) with every candidate
sampler at the largest step count within each budget, and the digit judge scores them (FID, precision, recall on
its features against the real digits it never saw; its accuracy against the requested classes). Writes
``OUT/results.json`` and prints the table of each run's best sampler per budget.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from digit_scores import score  # scripts/digit_scores.py
from hydra import compose, initialize_config_dir

import diffusion
from diffusion.evaluation.digit_judge import train_digit_classifier
from diffusion.sample import sample
from diffusion.sampling.k_samplers import network_evaluations

ROOT = Path(__file__).resolve().parent.parent
BACKBONES = {"unet": "digits", "dit": "digits_dit"}
FORMULATIONS = ("adm", "edm", "flow")
# Candidate samplers: (solver option, how many steps fit a budget of n network evaluations).
CANDIDATES = {
    "euler": lambda n: n,
    "heun": lambda n: max(d for d in range(1, n + 1) if network_evaluations("heun", d) <= n),
    "dpmpp_2m": lambda n: n,
}
ADM_ONLY = {"dpm_solver": lambda n: n}  # DPM-Solver++ on ADM's own discrete timesteps


def train(out: Path) -> None:
    for backbone, experiment in BACKBONES.items():
        command = [
            sys.executable, str(ROOT / "train.py"), "-m", f"experiment={experiment}",
            f"diffusion={','.join(FORMULATIONS)}", f"hydra.sweep.dir={out / backbone}",
            "hydra.sweep.subdir=${hydra.runtime.choices.diffusion}",
        ]  # fmt: skip
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/formulations")
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 35])
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.skip_training:
        train(out)
    diffusion.register()
    judge = train_digit_classifier()
    rows = []
    for backbone in BACKBONES:
        for formulation in FORMULATIONS:
            checkpoint = out / backbone / formulation / "checkpoints" / "latest.pt"
            candidates = {**CANDIDATES, **(ADM_ONLY if formulation == "adm" else {})}
            for budget in args.budgets:
                for solver, steps_for in candidates.items():
                    steps = steps_for(budget)
                    start = time.perf_counter()
                    with initialize_config_dir(str(diffusion.CONF_DIR), version_base="1.3"):
                        cfg = compose(
                            "sample",
                            overrides=[
                                "hardware=cpu", "hardware.num_threads=1", f"checkpoint={checkpoint}",
                                f"num_samples={args.num}", "batch_size=250", f"guidance_scale={args.guidance}",
                                f"solver={solver}", f"solver.steps={steps}", f"seed={args.seed}",
                            ],
                        )  # fmt: skip
                    path = sample(cfg, out / "samples" / f"{backbone}_{formulation}_{solver}_{steps}")
                    with np.load(path) as npz:
                        nfe = int(npz["network_evaluations"])
                    row = {"backbone": backbone, "formulation": formulation, "budget": budget, "solver": solver,
                           "steps": steps, "nfe": nfe, **score(path, judge),
                           "seconds": time.perf_counter() - start}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    (out / "results.json").write_text(
        json.dumps({"num": args.num, "guidance": args.guidance, "rows": rows}, indent=1)
    )
    print(
        "\n| backbone | formulation | NFE budget | best sampler | FID | precision | recall | judge accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for backbone in BACKBONES:
        for formulation in FORMULATIONS:
            for budget in args.budgets:
                cell = [
                    r
                    for r in rows
                    if (r["backbone"], r["formulation"], r["budget"]) == (backbone, formulation, budget)
                ]
                best = min(cell, key=lambda r: r["fid"])
                print(
                    f"| {backbone} | {formulation} | {budget} | {best['solver']} ({best['nfe']} NFE) | {best['fid']:.4f} | "
                    f"{best['precision']:.3f} | {best['recall']:.3f} | {best['judge_accuracy']:.3f} |"
                )


if __name__ == "__main__":
    main()
