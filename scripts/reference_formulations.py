"""Record reference numbers from the anchors' own code for tests/test_formulations.py.

Usage (with the platform venv, which has torch and diffusers):

    python scripts/reference_formulations.py --edm /path/edm.git --sit /path/SiT.git \
        --minsnr /path/Min-SNR.git [--out tests/fixtures/formulations]

Each argument is a bare git directory. Its HEAD tree is exported to a temporary directory, the commit is recorded,
and only the modules needed are imported from there (torchdiffeq is stubbed: SiT imports it for ODE sampling,
which is not exercised). Writes ``reference.pt`` (tensors) and ``reference.json`` (commits, versions, description).
Random draws inside the reference code (torch.randn, torch.rand, torch.randn_like) are replaced by replayed
tensors or seeded generators, which are saved alongside so the tests can feed the same values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.tiny_net import TinyNet  # noqa: E402


def export(git_dir: str, tmp: Path, name: str) -> tuple[Path, str]:
    """Export HEAD of a bare repo to tmp/name; return (tree path, commit)."""
    commit = subprocess.check_output(["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"], text=True).strip()
    dest = tmp / name
    dest.mkdir()
    archive = subprocess.Popen(["git", f"--git-dir={git_dir}", "archive", "HEAD"], stdout=subprocess.PIPE)
    subprocess.check_call(["tar", "-x", "-C", str(dest)], stdin=archive.stdout)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive failed for {git_dir}")
    return dest, commit


@contextlib.contextmanager
def imported_from(tree: Path, prefixes: tuple[str, ...]):
    """Put tree first on sys.path; afterwards drop it and every module under ``prefixes`` (EDM and Min-SNR both
    ship top-level ``torch_utils``/``dnnlib`` packages, which must not leak from one repo into the next)."""
    sys.path.insert(0, str(tree))
    try:
        yield
    finally:
        sys.path.remove(str(tree))
        for mod in list(sys.modules):
            if mod.split(".")[0] in prefixes:
                del sys.modules[mod]


@contextlib.contextmanager
def patched(obj, name, fn):
    orig = getattr(obj, name)
    setattr(obj, name, fn)
    try:
        yield orig
    finally:
        setattr(obj, name, orig)


def replay(tensors):
    """A stand-in for a torch random function that returns the given tensors in order, checking shapes."""
    queue = list(tensors)

    def fn(*args, **kwargs):
        out = queue.pop(0)
        shape = (
            args[0].shape
            if args and torch.is_tensor(args[0])
            else kwargs.get("size", args[0] if args else None)
        )
        if shape is not None and tuple(shape) != tuple(out.shape):
            raise AssertionError(f"replay shape {tuple(out.shape)} != requested {tuple(shape)}")
        return out.clone()

    return fn


class TinyInner(torch.nn.Module):
    """EDMPrecond builds its inner model by class name and calls model(x, noise_labels, class_labels=...);
    module-level so EDM's persistence checks can pickle it."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim, **_):
        super().__init__()
        self.net = TinyNet(channels=in_channels)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        return self.net(x, noise_labels)


def edm_reference(tree: Path) -> dict:
    with imported_from(tree, ("training", "torch_utils", "dnnlib")):
        import training.loss as edm_loss
        import training.networks as edm_networks

        edm_networks.TinyInner = TinyInner
        precond = edm_networks.EDMPrecond(img_resolution=4, img_channels=3, model_type="TinyInner")
        g = torch.Generator().manual_seed(1)
        sigma = torch.tensor([0.002, 0.02, 0.3, 1.0, 4.0, 80.0])
        x = torch.randn(6, 3, 4, 4, generator=g) * (0.5**2 + sigma**2).sqrt().reshape(-1, 1, 1, 1)
        with torch.no_grad():
            denoised = precond(x, sigma)

        images = 0.5 * torch.randn(6, 3, 4, 4, generator=g)
        z = torch.randn(6, 1, 1, 1, generator=g)
        noise = torch.randn(6, 3, 4, 4, generator=g)
        loss_fn = edm_loss.EDMLoss()
        with (
            patched(torch, "randn", replay([z])),
            patched(torch, "randn_like", replay([noise])),
            torch.no_grad(),
        ):
            loss = loss_fn(net=precond, images=images)
        return {
            "edm.x": x,
            "edm.sigma": sigma,
            "edm.denoised": denoised,
            "edm.loss.images": images,
            "edm.loss.z": z.flatten(),
            "edm.loss.noise": noise,
            "edm.loss.per_pixel": loss,
        }


def sit_reference(tree: Path) -> dict:
    sys.modules["torchdiffeq"] = types.SimpleNamespace(odeint=None)
    out = {}
    with imported_from(tree, ("transport", "torchdiffeq")):
        from transport import create_transport
        from transport import path as sit_path
        from transport.transport import Sampler

        g = torch.Generator().manual_seed(2)
        t = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95])
        x = torch.randn(5, 3, 4, 4, generator=g)
        v = torch.randn(5, 3, 4, 4, generator=g)
        out["sit.t"], out["sit.x"], out["sit.v"] = t, x, v
        for name, plan in (("linear", sit_path.ICPlan()), ("gvp", sit_path.GVPCPlan())):
            tt = sit_path.expand_t_like_x(t, x)
            alpha, d_alpha = plan.compute_alpha_t(tt)
            sigma, d_sigma = plan.compute_sigma_t(tt)
            _, drift_var = plan.compute_drift(x, t)
            for key, val in (
                ("alpha", alpha),
                ("d_alpha", d_alpha),
                ("sigma", sigma),
                ("d_sigma", d_sigma),
                ("drift_var", drift_var),
            ):
                out[f"sit.{name}.{key}"] = (
                    torch.as_tensor(val, dtype=torch.float32) * torch.ones_like(tt)
                ).flatten()
            out[f"sit.{name}.score_from_velocity"] = plan.get_score_from_velocity(v, x, t)
            out[f"sit.{name}.noise_from_velocity"] = plan.get_noise_from_velocity(v, x, t)

        net = TinyNet()
        labels = torch.tensor([0, 1, 2, 3, 1])
        x1 = torch.randn(5, 3, 4, 4, generator=g)
        x0 = torch.randn(5, 3, 4, 4, generator=g)
        r = torch.tensor([0.03, 0.25, 0.5, 0.71, 0.97])
        out["sit.loss.labels"], out["sit.loss.x1"], out["sit.loss.noise"], out["sit.loss.rand"] = (
            labels,
            x1,
            x0,
            r,
        )
        for path_name, path_type in (("linear", "Linear"), ("gvp", "GVP")):
            for prediction in ("velocity", "noise", "score"):
                for weight in (None,) if prediction == "velocity" else (None, "velocity", "likelihood"):
                    tr = create_transport(path_type, prediction, weight)
                    key = f"sit.loss.{path_name}.{prediction}.{weight or 'none'}"
                    t0, t1 = tr.check_interval(tr.train_eps, tr.sample_eps)
                    out[key + ".t"] = r * (t1 - t0) + t0  # the same float32 expression as Transport.sample
                    with patched(torch, "rand", replay([r])), patched(torch, "randn_like", replay([x0])):
                        with torch.no_grad():
                            out[key] = tr.training_losses(net, x1, model_kwargs={"y": labels})["loss"]

        init = torch.randn(5, 3, 4, 4, generator=g)
        out["sit.sde.init"] = init
        # Noise prediction starts at t = 1e-3, where x1 = (x - sigma eps) / alpha amplifies float32 rounding of an
        # untrained net ~1000-fold; that case runs in float64 (SiT's sampler follows x's dtype) to be comparable.
        for path_name, path_type, prediction, dtype in (
            ("linear", "Linear", "velocity", torch.float32),
            ("gvp", "GVP", "noise", torch.float64),
        ):
            tr = create_transport(path_type, prediction, None)
            sample = Sampler(tr).sample_sde(
                sampling_method="Euler",
                diffusion_form="sigma",
                diffusion_norm=1.0,
                last_step="Mean",
                last_step_size=0.04,
                num_steps=8,
            )
            bm = torch.Generator().manual_seed(123)
            randn = torch.randn
            with (
                patched(torch, "randn", lambda size, _r=randn, _g=bm, **kw: _r(size, generator=_g)),
                torch.no_grad(),
            ):
                out[f"sit.sde.{path_name}.{prediction}"] = sample(init.to(dtype), net, y=labels)[-1]
    return out


def minsnr_reference(tree: Path) -> dict:
    import numpy as np

    out = {}
    with imported_from(tree, ("guided_diffusion", "torch_utils", "dnnlib")):
        import guided_diffusion.gaussian_diffusion as gd

        # Count every per-example squared error as 1 so that terms["mse"] is exactly the weight.
        gd.mean_flat = lambda x: torch.ones(x.shape[0])
        cosine = gd.get_named_beta_schedule("cosine", 1000)
        zero_terminal = cosine.copy()
        zero_terminal[-1] = 1.0  # alphas_cumprod[-1] == 0: the reference's snr == 0 branch
        schedules = {
            "linear": gd.get_named_beta_schedule("linear", 1000),
            "cosine": cosine,
            "zsnr": zero_terminal,
        }
        t = torch.tensor([0, 1, 5, 20, 100, 250, 500, 750, 900, 999])
        out["minsnr.t"] = t
        targets = {
            "eps": (gd.ModelMeanType.EPSILON, "min_snr_5"),
            "x0": (gd.ModelMeanType.START_X, "min_snr_5"),
            "v": (gd.ModelMeanType.VELOCITY, "vmin_snr_5"),
        }
        x = torch.zeros(len(t), 1, 2, 2)
        for sname, betas in schedules.items():
            out[f"minsnr.{sname}.alphas_cumprod"] = torch.from_numpy(np.cumprod(1.0 - betas))
            for target, (mean_type, weight_type) in targets.items():
                diff = gd.GaussianDiffusion(
                    betas=betas,
                    model_mean_type=mean_type,
                    model_var_type=gd.ModelVarType.FIXED_SMALL,
                    loss_type=gd.LossType.MSE,
                    mse_loss_weight_type=weight_type,
                )
                with np.errstate(all="ignore"):
                    terms = diff.training_losses(lambda xt, tt, **kw: torch.zeros_like(xt), x, t, noise=x)
                out[f"minsnr.{sname}.{target}"] = terms["mse"]
    return out


def diffusers_reference() -> dict:
    from diffusers.training_utils import compute_density_for_timestep_sampling

    out = {}
    cases = {
        "logit_normal": {"logit_mean": 0.0, "logit_std": 1.0},
        "logit_normal_shifted": {"logit_mean": 0.5, "logit_std": 1.3},
        "mode": {"mode_scale": 1.29},
    }
    for name, kw in cases.items():
        scheme = "mode" if name == "mode" else "logit_normal"
        recorded = []

        def record(fn, recorded=recorded):
            def wrapper(*a, **k):
                recorded.append(fn(*a, **k))
                return recorded[-1]

            return wrapper

        g = torch.Generator().manual_seed(7)
        with patched(torch, "normal", record(torch.normal)), patched(torch, "rand", record(torch.rand)):
            u = compute_density_for_timestep_sampling(scheme, 4096, generator=g, **kw)
        out[f"density.{name}.raw"], out[f"density.{name}.u"] = recorded[0], u
    return out, cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edm", required=True)
    ap.add_argument("--sit", required=True)
    ap.add_argument("--minsnr", required=True)
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "formulations"))
    args = ap.parse_args()
    import diffusers

    tensors, commits = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, git_dir, fn in (
            ("edm", args.edm, edm_reference),
            ("sit", args.sit, sit_reference),
            ("minsnr", args.minsnr, minsnr_reference),
        ):
            tree, commits[name] = export(git_dir, tmp, name)
            tensors.update(fn(tree))
    dens, cases = diffusers_reference()
    tensors.update(dens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in tensors.items()}, out / "reference.pt")
    meta = {
        "commits": {
            "NVlabs/edm": commits["edm"],
            "willisma/SiT": commits["sit"],
            "TiankaiHang/Min-SNR-Diffusion-Training": commits["minsnr"],
        },
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "density_cases": cases,
        "density_seed": 7,
        "sde": {
            "num_steps": 8,
            "last_step": "Mean",
            "last_step_size": 0.04,
            "diffusion_form": "sigma",
            "brownian_seed": 123,
        },
        "description": (
            "edm.*: EDMPrecond(sigma_data=0.5) around tests.tiny_net.TinyNet (given c_noise as its time) at fixed "
            "x, sigma; EDMLoss per-pixel losses with its torch.randn/randn_like replaced by edm.loss.z/noise. "
            "sit.<path>.*: ICPlan/GVPCPlan coefficients, drift variance, velocity->score and velocity->noise at "
            "sit.t, sit.x, sit.v. sit.loss.<path>.<prediction>.<weight>: Transport.training_losses with TinyNet "
            "(y=labels, time input t) and torch.rand/randn_like replaced by sit.loss.rand/noise (the t actually "
            "used in .t). sit.sde.*: Sampler.sample_sde Euler-Maruyama, 8 steps, Brownian draws from "
            "torch.Generator seed 123 (gvp.noise in float64). minsnr.<schedule>.<target>: GaussianDiffusion.training_losses loss weights "
            "(min_snr_5, or vmin_snr_5 for v) at minsnr.t. density.*: diffusers "
            "compute_density_for_timestep_sampling(4096, generator seed 7): raw normal/uniform draws and u."
        ),
    }
    (out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {len(tensors)} tensors to {out}")
    for k, v in meta["commits"].items():
        print(k, v)


if __name__ == "__main__":
    main()
