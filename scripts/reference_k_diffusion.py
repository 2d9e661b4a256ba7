"""Record reference numbers from k-diffusion's own code for ``tests/test_k_samplers.py`` and friends.

Usage (from the repository root)::

    python scripts/reference_k_diffusion.py /path/to/k-diffusion.git [--out tests/fixtures/k_diffusion]

The first argument (or the environment variable ``K_DIFFUSION_GIT``) is a git directory of
https://github.com/crowsonkb/k-diffusion (a bare clone works). Its HEAD tree is exported to a temporary
directory with ``git archive`` and k-diffusion's ``sampling.py``, ``external.py`` and ``utils.py`` are loaded
from there under a stub ``k_diffusion`` package: the real ``k_diffusion/__init__.py`` imports heavy training
dependencies (clean-fid, kornia, clip, ...) that these files do not need. ``torchdiffeq`` and ``torchsde`` are
replaced by stubs that raise when used: only ``log_likelihood`` and the Brownian-tree noise sampler need them,
and neither is called here.

Everything runs in float64. The sampler cases use a closed-form denoiser, the exact posterior mean of a
Gaussian mixture, and replayed noise: a fixed list of standard-normal tensors handed out in order, both as the
``noise_sampler`` and, for the churn samplers (which call ``torch.randn_like`` themselves), by patching
``torch.randn_like`` inside k-diffusion's sampling module. The test side defines the same mixture denoiser and
tiny network (keep the two definitions in sync).

Writes ``reference.pt`` (tensors) and ``reference.json`` (commit, and what each entry is) to the output
directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from k_reference import mixture_denoiser, tiny_net  # noqa: E402  (the very functions the tests use)

DEFAULT_OUT = ROOT / "tests" / "fixtures" / "k_diffusion"

# ---- closed-form data distribution (identical copy in tests/k_reference.py)
# ----------------------------------


def make_mixture(dim: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Three isotropic Gaussian components in ``dim`` dimensions: means [3, dim], stds [3], weights [3]."""
    return {
        "means": torch.randn(3, dim, generator=generator, dtype=torch.float64) * 1.5,
        "stds": torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64),
        "weights": torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
    }


def make_net_params(in_ch: int, out_ch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded weights of :func:`tiny_net`: a 3x3 conv plus two per-channel timestep terms."""
    return {
        "weight": torch.randn(out_ch, in_ch, 3, 3, generator=generator, dtype=torch.float64) * 0.3,
        "bias": torch.randn(out_ch, generator=generator, dtype=torch.float64) * 0.1,
        "t_sin": torch.randn(out_ch, generator=generator, dtype=torch.float64),
        "t_lin": torch.randn(out_ch, generator=generator, dtype=torch.float64),
    }


def linear_alphas_cumprod(steps: int = 1000) -> np.ndarray:
    """DDPM's linear beta schedule (1e-4 .. 0.02) as cumulative alpha products, float64 [steps]."""
    betas = np.linspace(1e-4, 0.02, steps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


# ---- noise replay
# -----------------------------------------------------------------------------------------------


class Replay:
    """Hands out precomputed noise tensors in order; usable as a noise sampler or as ``randn_like``."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise
        self.used = 0

    def next(self) -> torch.Tensor:
        if self.used >= len(self.noise):
            raise RuntimeError("replayed noise exhausted")
        out = self.noise[self.used].clone()
        self.used += 1
        return out

    def __call__(self, sigma, sigma_next):
        return self.next()


class _TorchWithReplayedRandn(types.ModuleType):
    """Stands in for ``torch`` in k-diffusion's sampling module: ``randn_like`` replays, the rest is torch."""

    def __init__(self, replay: Replay):
        super().__init__("torch")
        self._replay = replay

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x, *args, **kwargs):
        out = self._replay.next()
        assert out.shape == x.shape and out.dtype == x.dtype
        return out


# ---- loading k-diffusion
# -----------------------------------------------------------------------------------------


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"{name} is a stub in scripts/reference_k_diffusion.py")

    for attr in attrs.get("names", []):
        setattr(module, attr, unavailable)
    return module


def load_k_diffusion(git_dir: str, workdir: Path):
    """Exports HEAD of ``git_dir`` into ``workdir``; returns (commit, sampling module, external module)."""
    commit = subprocess.run(
        ["git", "--git-dir", git_dir, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "--git-dir", git_dir, "archive", "HEAD"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive.stdout, check=True)
    pkg_dir = workdir / "k_diffusion"
    for name in ("torchdiffeq", "torchsde"):
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = _stub(name, names=["odeint", "BrownianTree"])
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(pkg_dir)]
    sys.modules["k_diffusion"] = package
    modules = {}
    for name in ("utils", "sampling", "external"):  # dependency order
        spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", pkg_dir / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(package, name, module)
        modules[name] = module
    return commit, modules["sampling"], modules["external"]


# ---- the cases
# ---------------------------------------------------------------------------------------------------

# (case name, sampler name, options); noise is replayed for every case (unused by the deterministic ones).
SAMPLER_CASES = [
    ("euler", "euler", {}),
    ("euler_churn", "euler", {"s_churn": 2.0, "s_tmin": 0.1, "s_tmax": 10.0, "s_noise": 1.003}),
    ("euler_ancestral", "euler_ancestral", {}),
    ("euler_ancestral_eta05", "euler_ancestral", {"eta": 0.5, "s_noise": 0.9}),
    ("heun", "heun", {}),
    ("heun_churn", "heun", {"s_churn": 1.0, "s_noise": 1.01}),
    ("dpm_2", "dpm_2", {}),
    ("dpm_2_churn", "dpm_2", {"s_churn": 3.0, "s_tmin": 0.5}),
    ("dpm_2_ancestral", "dpm_2_ancestral", {}),
    ("dpm_2_ancestral_eta07", "dpm_2_ancestral", {"eta": 0.7, "s_noise": 0.95}),
    ("lms", "lms", {}),
    ("lms_order2", "lms", {"order": 2}),
    ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral", {}),
    ("dpmpp_2s_ancestral_eta05", "dpmpp_2s_ancestral", {"eta": 0.5}),
    ("dpmpp_2m", "dpmpp_2m", {}),
    ("dpmpp_2m_sde_midpoint", "dpmpp_2m_sde", {"solver_type": "midpoint"}),
    ("dpmpp_2m_sde_heun", "dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp_2m_sde_midpoint_eta05", "dpmpp_2m_sde", {"eta": 0.5, "s_noise": 1.05}),
    ("dpmpp_2m_sde_heun_eta0", "dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.0}),
    ("dpmpp_3m_sde", "dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde_eta05", "dpmpp_3m_sde", {"eta": 0.5, "s_noise": 0.9}),
    ("dpmpp_3m_sde_eta0", "dpmpp_3m_sde", {"eta": 0.0}),
]
CHURN_SAMPLERS = {"euler", "heun", "dpm_2"}

SCHEDULE_CASES = [  # (n, sigma_min, sigma_max, rho); rho is used by karras and polyexponential
    (8, 0.02, 20.0, 7.0),
    (5, 0.1, 10.0, 3.0),
    (12, 0.002, 80.0, 1.0),
    (1, 0.5, 2.0, 2.0),
]

IMAGE_SHAPE = (2, 1, 2, 2)  # [N, C, H, W] for the sampler cases
SAMPLER_STEPS = 8
SIGMA_MIN, SIGMA_MAX, RHO = 0.02, 20.0, 7.0
NOISE_DRAWS = 2 * SAMPLER_STEPS


def discrete_sigma_sets(schedule_sigmas: torch.Tensor) -> torch.Tensor:
    """[3, 4] per-image sigmas: trained levels, points between levels (not midway), and outside the range."""
    s = schedule_sigmas
    log_between = lambda i, w: ((1 - w) * s[i].log() + w * s[i + 1].log()).exp()  # noqa: E731
    return torch.stack(
        [
            torch.stack([s[0], s[500], s[999], s[37]]),
            torch.stack(
                [log_between(10, 0.3), log_between(250, 0.8), log_between(998, 0.45), torch.tensor(1.0)]
            ),
            torch.stack([s[0] * 0.5, s[999] * 1.5, torch.tensor(0.05), torch.tensor(7.3)]),
        ]
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("git_dir", nargs="?", default=os.environ.get("K_DIFFUSION_GIT"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not args.git_dir:
        parser.error("pass the k-diffusion git directory or set K_DIFFUSION_GIT")
    torch.set_default_dtype(torch.float64)

    with tempfile.TemporaryDirectory() as tmp:
        commit, ksampling, kexternal = load_k_diffusion(args.git_dir, Path(tmp))
        tensors: dict[str, torch.Tensor] = {}
        described: dict[str, str] = {}

        # -- samplers on the Gaussian-mixture denoiser --
        gen = torch.Generator().manual_seed(20240611)
        mixture = make_mixture(math.prod(IMAGE_SHAPE[1:]), gen)
        denoiser = mixture_denoiser(mixture)
        sigmas = ksampling.get_sigmas_karras(SAMPLER_STEPS, SIGMA_MIN, SIGMA_MAX, rho=RHO)
        x_init = torch.randn(IMAGE_SHAPE, generator=gen) * SIGMA_MAX
        noise = torch.randn((NOISE_DRAWS, *IMAGE_SHAPE), generator=gen)
        for key, value in mixture.items():
            tensors[f"mixture/{key}"] = value
        tensors["sampler/sigmas"] = sigmas
        tensors["sampler/x_init"] = x_init
        tensors["sampler/noise"] = noise
        described["mixture/*"] = "Gaussian mixture data distribution: means [3, D], stds [3], weights [3]"
        described["sampler/sigmas"] = (
            f"get_sigmas_karras({SAMPLER_STEPS}, {SIGMA_MIN}, {SIGMA_MAX}, rho={RHO})"
        )
        described["sampler/x_init"] = f"initial x {list(IMAGE_SHAPE)}"
        described["sampler/noise"] = "replayed standard-normal draws, consumed in order from index 0 per case"
        cases = {}
        for case, name, options in SAMPLER_CASES:
            replay = Replay(noise)
            sigma_hats = []
            fn = getattr(ksampling, f"sample_{name}")
            kwargs = dict(options)
            if name not in CHURN_SAMPLERS and name not in {"lms", "dpmpp_2m"}:
                kwargs["noise_sampler"] = replay
            calls = [0]

            def model(x, sigma, calls=calls):
                calls[0] += 1
                return denoiser(x, sigma)

            saved_torch = ksampling.torch
            if name in CHURN_SAMPLERS:
                ksampling.torch = _TorchWithReplayedRandn(replay)
            try:
                out = fn(
                    model,
                    x_init.clone(),
                    sigmas,
                    disable=True,
                    callback=lambda info, acc=sigma_hats: acc.append(float(info["sigma_hat"])),
                    **kwargs,
                )
            finally:
                ksampling.torch = saved_torch
            tensors[f"sampler/{case}/x"] = out
            tensors[f"sampler/{case}/sigma_hat"] = torch.tensor(sigma_hats)
            cases[case] = {"sampler": name, "options": options, "noise_used": replay.used, "calls": calls[0]}
        described["sampler/<case>/x"] = "final x of each case in 'sampler_cases'"
        described["sampler/<case>/sigma_hat"] = "the callback's sigma_hat per step"

        # -- continuous schedules --
        schedules = []
        for n, smin, smax, rho in SCHEDULE_CASES:
            tag = f"{n}_{smin}_{smax}_{rho}"
            tensors[f"schedule/karras/{tag}"] = ksampling.get_sigmas_karras(n, smin, smax, rho=rho)
            tensors[f"schedule/exponential/{tag}"] = ksampling.get_sigmas_exponential(n, smin, smax)
            tensors[f"schedule/polyexponential/{tag}"] = ksampling.get_sigmas_polyexponential(
                n, smin, smax, rho=rho
            )
            schedules.append({"n": n, "sigma_min": smin, "sigma_max": smax, "rho": rho, "tag": tag})
        described["schedule/<kind>/<tag>"] = (
            "get_sigmas_<kind>(n, sigma_min, sigma_max[, rho]) for 'schedules'"
        )

        # -- discrete schedule and wrappers --
        abar = linear_alphas_cumprod(1000)
        tensors["discrete/alphas_cumprod"] = torch.from_numpy(abar)
        eps_model = kexternal.DiscreteEpsDDPMDenoiser(None, torch.from_numpy(abar), quantize=True)
        schedule_sigmas = eps_model.sigmas
        sigma_sets = discrete_sigma_sets(schedule_sigmas)
        tensors["discrete/sigma_sets"] = sigma_sets
        flat_sigmas = sigma_sets.reshape(-1)
        for n in (4, 8, 13):
            tensors[f"discrete/get_sigmas/{n}"] = eps_model.get_sigmas(n)
        tensors["discrete/get_sigmas/all"] = eps_model.get_sigmas()
        tensors["discrete/sigma_to_t/quantized"] = eps_model.sigma_to_t(flat_sigmas, quantize=True)
        tensors["discrete/sigma_to_t/interpolated"] = eps_model.sigma_to_t(flat_sigmas, quantize=False)
        t_values = torch.tensor([0.0, 1.0, 10.25, 10.3, 123.0, 500.5, 998.75, 999.0])
        tensors["discrete/t_values"] = t_values
        tensors["discrete/t_to_sigma"] = eps_model.t_to_sigma(t_values)
        described["discrete/*"] = (
            "linear-beta (1e-4..0.02, 1000 steps) DiscreteSchedule: get_sigmas(n), sigma_to_t of sigma_sets "
            "flattened, t_to_sigma(t_values)"
        )

        gen = torch.Generator().manual_seed(7)
        channels, shape = 2, (4, 2, 4, 4)
        params_c = make_net_params(channels, channels, gen)
        params_2c = make_net_params(channels, 2 * channels, gen)
        x_disc = torch.randn(shape, generator=gen) * 2
        for key, value in params_c.items():
            tensors[f"net_c/{key}"] = value
        for key, value in params_2c.items():
            tensors[f"net_2c/{key}"] = value
        tensors["discrete/x"] = x_disc
        abar_t = torch.from_numpy(abar)
        wrappers = {
            "eps": lambda q: kexternal.DiscreteEpsDDPMDenoiser(tiny_net(params_c), abar_t, quantize=q),
            "v": lambda q: kexternal.DiscreteVDDPMDenoiser(tiny_net(params_c), abar_t, quantize=q),
            # OpenAIDenoiser reads diffusion.alphas_cumprod (numpy) and casts it to float32.
            "openai": lambda q: kexternal.OpenAIDenoiser(
                tiny_net(params_2c), types.SimpleNamespace(alphas_cumprod=abar), quantize=q
            ),
        }
        for kind, build in wrappers.items():
            for quantize in (True, False):
                wrapper = build(quantize)
                out = torch.stack([wrapper(x_disc, sig) for sig in sigma_sets])  # [3, *shape]
                tensors[f"wrapper/{kind}/quantize_{quantize}"] = out
        described["wrapper/<kind>/quantize_<q>"] = (
            "[3, 4, 2, 4, 4]: wrapper(discrete/x, sigma_sets[j]) for j in 0..2; "
            "eps = DiscreteEpsDDPMDenoiser and "
            "v = DiscreteVDDPMDenoiser on tiny_net(net_c), openai = OpenAIDenoiser (learned sigmas, float32 "
            "alphas_cumprod) on tiny_net(net_2c)"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in tensors.items()}, args.out / "reference.pt")
    meta = {
        "k_diffusion_commit": commit,
        "k_diffusion_repo": "https://github.com/crowsonkb/k-diffusion",
        "torch_version": torch.__version__,
        "dtype": "float64",
        "generated_by": "scripts/reference_k_diffusion.py",
        "sampler_steps": SAMPLER_STEPS,
        "sampler_sigmas": {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "rho": RHO},
        "sampler_cases": cases,
        "schedules": schedules,
        "arrays": described,
    }
    (args.out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"k-diffusion {commit}: wrote {len(tensors)} arrays to {args.out}")


if __name__ == "__main__":
    main()
