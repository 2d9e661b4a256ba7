"""Generation: solvers that turn noise into images, classifier-free guidance, reproducible per-image noise.

Every solver is a small class built from the ``solver`` config group and called with one signature::

    solver(model, diffusion, x_T, model_kwargs=None, noise=None, progress=False) -> x_0

``diffusion`` is the process the model was trained with (any number of steps); each solver respaces it for its own
step count, and the respaced process calls the network with the original timestep indices. ``noise(i)`` returns
the fresh Gaussian noise a stochastic solver needs at its i-th step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from diffusion.gaussian_diffusion import GaussianDiffusion

NoiseFn = Callable[[int], torch.Tensor]


def _steps_iter(n: int, progress: bool, desc: str):
    steps = range(n - 1, -1, -1)
    return tqdm(steps, desc=desc, leave=False) if progress else steps


class Solver:
    """Shared by the solvers: the step count and how the training process is respaced for it."""

    section = "{}"  # the respacing string for ``steps``

    def __init__(self, steps: int, clip_denoised: bool = True) -> None:
        if steps < 1:
            raise ValueError(f"solver.steps={steps}: must be >= 1")
        self.steps = steps
        self.clip_denoised = clip_denoised

    def respaced(self, diffusion: GaussianDiffusion) -> GaussianDiffusion:
        return diffusion.respace(self.section.format(self.steps))

    def check(self, diffusion: GaussianDiffusion) -> None:
        """Raise ValueError now if ``steps`` cannot be met on ``diffusion`` (before any sampling work)."""
        self.respaced(diffusion)


class DDPM(Solver):
    """Ancestral sampling (the reference's p_sample_loop) on the process respaced to ``steps``."""

    def __init__(self, steps: int = 250, clip_denoised: bool = True) -> None:
        super().__init__(steps, clip_denoised)

    def __call__(
        self,
        model,
        diffusion: GaussianDiffusion,
        x_T,
        model_kwargs=None,
        noise: NoiseFn | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        process = self.respaced(diffusion)
        x = x_T
        for k, i in enumerate(_steps_iter(process.num_timesteps, progress, "ddpm")):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            z = noise(k) if noise is not None else torch.randn_like(x)
            x = process.p_sample(
                model, x, t, clip_denoised=self.clip_denoised, model_kwargs=model_kwargs, noise=z
            )["sample"]
        return x


class DDIM(Solver):
    """DDIM (Song et al. 2021) with ``steps`` evenly spaced steps; ``eta=0`` is deterministic."""

    section = "ddim{}"

    def __init__(self, steps: int = 50, eta: float = 0.0, clip_denoised: bool = True) -> None:
        if eta < 0:
            raise ValueError(f"solver.eta={eta}: must be >= 0 (0 = deterministic, 1 = DDPM-like)")
        super().__init__(steps, clip_denoised)
        self.eta = eta

    def __call__(
        self,
        model,
        diffusion: GaussianDiffusion,
        x_T,
        model_kwargs=None,
        noise: NoiseFn | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        process = self.respaced(diffusion)
        x = x_T
        for k, i in enumerate(_steps_iter(process.num_timesteps, progress, "ddim")):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            z = None
            if self.eta > 0:
                z = noise(k) if noise is not None else torch.randn_like(x)
            x = process.ddim_sample(
                model,
                x,
                t,
                eta=self.eta,
                clip_denoised=self.clip_denoised,
                model_kwargs=model_kwargs,
                noise=z,
            )["sample"]
        return x


class DPMSolverPP(Solver):
    """DPM-Solver++(2M) (Lu et al. 2022), deterministic, in the data-prediction form.

    With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t) and the
    model's denoised estimate D_i at step i, one step from s to t with h = lambda_t - lambda_s is
    ``x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D`` where D = D_i for the first and the last step
    and ``D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}`` (r = h_prev / h) otherwise. The model is evaluated at ``steps``
    evenly spaced timesteps and the last step goes to sigma = 0, where x equals the final denoised estimate.
    """

    section = "ddim{}"

    def __init__(self, steps: int = 20, clip_denoised: bool = True) -> None:
        super().__init__(steps, clip_denoised)

    def __call__(
        self,
        model,
        diffusion: GaussianDiffusion,
        x_T,
        model_kwargs=None,
        noise: NoiseFn | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        process = self.respaced(diffusion)
        ab = torch.as_tensor(process.alphas_cumprod, dtype=torch.float64)
        # Append the clean end point (alpha_bar = 1, sigma = 0) as the target of the final step.
        ab = torch.cat([torch.ones(1, dtype=torch.float64), ab])  # index i + 1 is respaced step i
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        lam = torch.log(alpha) - torch.log(sigma)  # +inf at the end point
        x = x_T
        prev_d = prev_h = None
        for i in _steps_iter(process.num_timesteps, progress, "dpm-solver++"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = process.model_output(model, x, t, model_kwargs)
            d, _ = process.predict_xstart_eps(out, x, t, clip_denoised=self.clip_denoised)
            s, u = i + 1, i  # from step i (index i + 1) to step i - 1 (index i); index 0 is the clean end
            if u == 0:
                x = d  # sigma_u = 0: the update reduces to the denoised estimate (first order)
                break
            h = (lam[u] - lam[s]).item()
            if prev_d is None:
                dd = d
            else:
                r = prev_h / h
                dd = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * prev_d
            x = (sigma[u] / sigma[s]).item() * x - alpha[u].item() * math.expm1(-h) * dd
            prev_d, prev_h = d, h
        return x


def guided(model: torch.nn.Module, scale: float, null_class: int) -> Callable:
    """Classifier-free guidance in one batched forward pass.

    Returns a function with the network's signature that runs the conditional and the null-label halves together
    and combines them as ``uncond + scale * (cond - uncond)`` on the prediction channels; learned-variance channels
    are taken from the conditional half.
    """

    def forward(x, t, y=None, **kwargs):
        out = model(
            torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null_class)]), **kwargs
        )
        cond, uncond = out.chunk(2)
        c = x.shape[1]
        mixed = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([mixed, cond[:, c:]], dim=1)

    return forward


class PerImageNoise:
    """Gaussian noise that depends only on (seed, image index, draw number), not on batching or ranks.

    Each image owns a generator seeded from (seed, index); the initial x_T is its first draw and every stochastic
    solver step draws the next one, so image k is the same whether it is generated in a batch of 4 or 16, on one
    rank or on two.
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int], device: torch.device) -> None:
        self.shape = tuple(shape)
        self.device = device
        self.generators = [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]

    def draw(self) -> torch.Tensor:
        x = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return x.to(self.device)

    def __call__(self, step: int) -> torch.Tensor:
        return self.draw()


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    solver: Callable,
    indices: Sequence[int],
    seed: int,
    device: torch.device,
    classes: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    autocast=None,
) -> torch.Tensor:
    """Generate the images with the given indices: a float [N x C x H x W] Tensor in [-1, 1].

    :param classes: [N] class labels for a class-conditional model, else None.
    :param guidance_scale: classifier-free guidance weight; 1 disables it (one forward pass per step).
    """
    shape = (model.in_channels, model.image_size, model.image_size)
    noise = PerImageNoise(seed, indices, shape, device)
    x_T = noise.draw()
    kwargs = {}
    net = model
    if classes is not None:
        kwargs["y"] = classes.to(device)
        if guidance_scale != 1.0:
            net = guided(model, guidance_scale, model.null_class)
    with autocast if autocast is not None else contextlib.nullcontext():
        x = solver(net, diffusion, x_T, model_kwargs=kwargs, noise=noise)
    return x.float()
