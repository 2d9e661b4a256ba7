"""The digits measurement behind the README's guidance table: classifier-free guidance, CFG limited to an interval
of noise levels, and autoguidance, each over guidance weights w.

    python train.py experiment=digits hydra.run.dir=outputs/digits                     # the main model (make train)
    python train.py experiment=digits model.num_channels=32 max_steps=300 eval=none \\
        hydra.run.dir=outputs/digits_guide                                            # the guide: smaller, shorter
    python scripts/guidance_sweep.py outputs/digits/checkpoints/latest.pt outputs/digits_guide/checkpoints/latest.pt

For each method and weight, ``--num`` images (all classes in turn) are sampled with ``--solver`` (the same noise
for every cell) and scored by ``python -m diffusion.evaluate --features digits``: FID, precision and recall on the
digit judge's features against the real digits the judge never saw, and the judge's accuracy against the
requested classes. Autoguidance (Karras et al. 2024) guides the model with a smaller, less-trained one of the
same data; the interval (Kynkaanniemi et al. 2024) applies CFG only for sigma in ``--interval``. Writes
``OUT/results.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from digit_scores import score  # scripts/digit_scores.py
from hydra import compose, initialize_config_dir

import diffusion
from diffusion.evaluation.digit_judge import train_digit_classifier
from diffusion.sample import sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="the main model")
    parser.add_argument("guide", help="the autoguidance model: smaller and/or less trained, same data")
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--interval", type=float, nargs=2, default=[0.28, 5.42], metavar=("LO", "HI"))
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--solver", default="dpm_solver")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/guidance_sweep")
    args = parser.parse_args()
    diffusion.register()
    out = Path(args.out)
    judge = train_digit_classifier()
    methods = {
        "cfg": [],
        "cfg_interval": [f"guidance_interval=[{args.interval[0]},{args.interval[1]}]"],
        "autoguidance": [f"guide={args.guide}"],
    }
    rows = []
    for method, extra in methods.items():
        for w in args.weights:
            start = time.perf_counter()
            with initialize_config_dir(str(diffusion.CONF_DIR), version_base="1.3"):
                cfg = compose(
                    "sample",
                    overrides=[
                        "hardware=cpu", "hardware.num_threads=1", f"checkpoint={args.checkpoint}",
                        f"num_samples={args.num}", "batch_size=250", f"guidance_scale={w}", f"solver={args.solver}",
                        f"solver.steps={args.steps}", f"seed={args.seed}", *extra,
                    ],
                )  # fmt: skip
            path = sample(cfg, out / f"{method}_w{w:g}")
            row = {"method": method, "w": w, **score(path, judge), "seconds": time.perf_counter() - start}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "checkpoint": args.checkpoint,
        "guide": args.guide,
        "interval": args.interval,
        "num": args.num,
        "solver": f"{args.solver} {args.steps}",
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| method | w | FID | precision | recall | judge accuracy |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['w']:g} | {r['fid']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{r['judge_accuracy']:.3f} |"
        )


if __name__ == "__main__":
    main()
