"""The digits measurements behind the README's classifier-guidance and cascade numbers.

    python scripts/digits_guided_eval.py guidance MODEL.pt CLASSIFIER.pt --scales 0 1 2 4 8 --solver ddim --steps 50
    python scripts/digits_guided_eval.py upsampler UPSAMPLER.pt --solver dpm_solver --steps 20

``guidance`` samples 100 digits (10 of each class) from MODEL guided by CLASSIFIER at each scale, through
sample.py's code, and prints how often the project's digit judge reads each sample as its requested class.
``upsampler`` area-downsamples the 450 held-out digits (the digits' "val" split, which neither the upsampler nor
the judge trained on) to the upsampler's small size, upsamples them with it, and prints the judge's accuracy on
its output, on the same inputs upsampled bilinearly, and on the original digits. Outputs go to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import diffusion
from diffusion.data.datasets import Digits
from diffusion.data.images import to_uint8
from diffusion.evaluation.digit_judge import train_digit_classifier
from diffusion.sample import load_model, sample


def sample_cfg(overrides: list[str]):
    diffusion.register()
    with initialize_config_dir(str(diffusion.CONF_DIR), version_base="1.3"):
        return compose("sample", overrides=["hardware=cpu", "hardware.num_threads=1", *overrides])


def accuracy(judge, images: np.ndarray, labels: np.ndarray) -> tuple[float, dict[int, float]]:
    predictions = judge.predict(images)
    per_class = {d: float(np.mean(predictions[labels == d] == d)) for d in range(10) if np.any(labels == d)}
    return float(np.mean(predictions == labels)), per_class


def guidance(args, judge) -> None:
    print(f"| scale | accuracy ({args.num} samples, {args.solver} {args.steps} steps) | per class (0..9) |")
    print("|---|---|---|")
    for scale in args.scales:
        out = Path(args.out) / f"{args.solver}{args.steps}_scale{scale:g}"
        cfg = sample_cfg([f"checkpoint={args.model}", f"classifier={args.classifier}",
                          f"classifier_scale={scale}", f"num_samples={args.num}", "batch_size=100",
                          f"solver={args.solver}", f"solver.steps={args.steps}", f"seed={args.seed}",
                          f"classes=[{','.join(map(str, range(10)))}]"])  # fmt: skip
        start = time.perf_counter()
        with np.load(sample(cfg, out)) as npz:
            total, per_class = accuracy(judge, npz["arr_0"], npz["arr_1"])
        per = " ".join(f"{v:.1f}" for v in per_class.values())
        print(f"| {scale:g} | {total:.2f} | {per} |   ({time.perf_counter() - start:.0f} s, {out}/grid.png)")


def upsampler(args, judge) -> None:
    model, _, _ = load_model(sample_cfg([f"checkpoint={args.model}"]))
    held_out = Digits(image_size=model.image_size, channels=model.in_channels, split="val")
    small = model.small_size
    low = to_uint8(
        F.interpolate(held_out.images, size=(small, small), mode="area")
    )  # what a base model writes
    labels = held_out.targets.numpy()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "held_out_low_res.npz", arr_0=low, arr_1=labels)
    low_float = torch.from_numpy(low).permute(0, 3, 1, 2).float() / 127.5 - 1
    rows = {"original 8x8 digits": to_uint8(held_out.images)}
    for mode in ("nearest", "bilinear"):
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        upsampled = F.interpolate(low_float, size=(model.image_size,) * 2, mode=mode, **kwargs)
        rows[f"{small}x{small} inputs, {mode} upsampling"] = to_uint8(upsampled)
    cfg = sample_cfg([f"checkpoint={args.model}", f"base_samples={out / 'held_out_low_res.npz'}",
                      f"num_samples={len(labels)}", "batch_size=150", f"solver={args.solver}",
                      f"solver.steps={args.steps}", f"seed={args.seed}"])  # fmt: skip
    with np.load(sample(cfg, out / "upsampled")) as npz:
        assert np.array_equal(npz["arr_1"], labels)
        rows[f"{small}x{small} inputs, the upsampler ({args.solver} {args.steps} steps)"] = npz["arr_0"]
    print(f"| {len(labels)} held-out digits | judge accuracy |")
    print("|---|---|")
    for name, images in rows.items():
        print(f"| {name} | {accuracy(judge, images, labels)[0]:.3f} |")
    np.savez(out / "compare.npz", **{f"arr_{i}": images[:20] for i, images in enumerate(rows.values())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("guidance")
    g.add_argument("model")
    g.add_argument("classifier")
    g.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 4, 8])
    g.add_argument("--num", type=int, default=100)
    u = sub.add_parser("upsampler")
    u.add_argument("model")
    for p in (g, u):
        p.add_argument("--solver", default="ddim")
        p.add_argument("--steps", type=int, default=50)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default="outputs/digits_guided_eval")
    args = parser.parse_args()
    torch.set_num_threads(1)
    judge = train_digit_classifier()
    print(f"digit judge: SVM, held-out accuracy {judge.held_out_accuracy:.3f}")
    {"guidance": guidance, "upsampler": upsampler}[args.what](args, judge)


if __name__ == "__main__":
    main()
