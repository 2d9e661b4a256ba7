"""ADM's discrete-time solvers: DDPM, DDIM and DPM-Solver++(2M) on the process's own timesteps.

Every solver is a small class built from the ``solver`` config group and called with one signature::

    solver(denoiser, x_T, extra_args=None, noise=None, progress=False, callback=None) -> x_0

``denoiser`` is the seam of diffusion/process/denoiser.py (built by ``guidance.guided_denoiser``); these solvers
use its discrete face: each picks ``steps`` of the process's timesteps (DDPM and DDIM by guided-diffusion's
respacing, DPM-Solver++ evenly in log-SNR), and one loop, in the base class, runs the denoiser respaced to them and
calls the solver's ``step``; the network always sees the original timestep indices. ``noise(k)`` returns the fresh
Gaussian noise a stochastic solver needs at its k-th step; ``callback(k, x, pred_xstart)`` sees every step.

The network may predict epsilon, x0 or v (the process converts); learned-variance channels are used by the
ancestral solver and ignored by the deterministic ones. Classifier guidance comes in the prediction: DDPM asks for
it in the mean form (``classifier_form = "mean"``), the others in the score form.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion.errors import ConfigError
from diffusion.process.denoiser import Denoiser
from diffusion.process.gaussian import GaussianDiffusion, space_timesteps

NoiseFn = Callable[[int], Tensor]
# The conf/solver option of each class.
_NAMES = {"DDPM": "ddpm", "DDIM": "ddim", "DPMSolverPP": "dpm_solver"}


class Solver:
    """What the solvers share: the step count, which timesteps they evaluate, and the one sampling loop.

    A solver picks ``steps`` of the model's original timesteps (:meth:`timesteps`); the loop runs the process
    respaced to exactly those, from the noisiest down, and a subclass's :meth:`step` takes one of them.

    :param steps: number of network evaluations (reverse steps).
    :param clip_denoised: clamp the predicted x_0 to [-1, 1] at every step, as the reference does.
    """

    # Which timesteps a respacing solver keeps: guided-diffusion's respacing string for ``steps``
    # (see space_timesteps); "{}" spaces them evenly, the first and the last included.
    respacing = "{}"
    # How classifier guidance reaches the step: "score" (a corrected prediction) or "mean" (an ancestral step
    # moves its mean by variance * gradient).
    classifier_form = "score"
    # These solvers step through a process's discrete timesteps (the denoiser's discrete face).
    discrete = True

    def __init__(self, steps: int, clip_denoised: bool = True) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ConfigError(f"solver.steps={steps!r}: must be an integer >= 2")
        self.steps = steps
        self.clip_denoised = clip_denoised

    def timesteps(self, diffusion: GaussianDiffusion) -> list[int]:
        """The original timesteps the network is evaluated at, ascending; ConfigError naming solver.steps when
        the spacing cannot meet ``steps`` on ``diffusion``."""
        num_timesteps = diffusion.original_num_steps
        try:
            return space_timesteps(num_timesteps, self.respacing.format(self.steps))
        except ValueError as e:
            raise ConfigError(
                f"solver.steps={self.steps} cannot be met on the model's {num_timesteps}-step process: {e}. "
                f"{self._feasible_hint(num_timesteps)}"
            ) from None

    def _feasible_hint(self, num_timesteps: int) -> str:
        return f"Use at most {num_timesteps} steps."

    def check(self, diffusion: GaussianDiffusion) -> None:
        """Raise ConfigError now if ``steps`` cannot be met on ``diffusion`` (before any sampling work)."""
        if not diffusion.discrete:
            raise ConfigError(
                f"solver={self.name} steps through ADM's discrete timesteps; the model was trained with "
                f"diffusion={diffusion.name}, which has none: use solver=auto (its own sampler) or a continuous "
                "one, e.g. solver=heun"
            )
        self.timesteps(diffusion)

    @property
    def name(self) -> str:
        """The solver's option name in ``conf/solver``."""
        return _NAMES.get(type(self).__name__, type(self).__name__.lower())

    @property
    def network_evaluations(self) -> int:
        """Network evaluations per batch: one per step."""
        return self.steps

    def describe(self) -> dict:
        """What the samples were made with: the solver's name, its options and its network evaluations."""
        options = {k: getattr(self, k) for k in inspect.signature(type(self)).parameters}
        return {"solver": self.name, "options": options, "network_evaluations": self.network_evaluations}

    def __call__(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        extra_args: dict | None = None,
        noise: NoiseFn | None = None,
        progress: bool = False,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """
        :param denoiser: the denoiser of the network (and its guidance) on the process it was trained with.
        :param x_T: an [N x C x H x W] Tensor of standard normal noise.
        :param extra_args: extra arguments of every network call, e.g. ``{"y": labels}``.
        :param noise: ``noise(k)`` gives the fresh noise of the k-th step (drawn with ``randn_like`` when None);
            called once per step, in order, by the stochastic solvers.
        :param callback: called after every step as ``callback(k, x, pred_xstart)``.
        :return: an [N x C x H x W] Tensor of samples.
        """
        denoiser = denoiser.respaced(self.timesteps(denoiser.process))
        x, carry = x_T, None
        indices = range(denoiser.process.num_timesteps - 1, -1, -1)
        for k, i in enumerate(tqdm(indices, desc=type(self).__name__, leave=False, disable=not progress)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            draw = functools.partial(_draw, noise, k, x)
            x, pred_xstart, carry = self.step(denoiser, x, t, extra_args or {}, draw, carry)
            if callback is not None:
                callback(k, x, pred_xstart)
        return x

    def step(
        self,
        denoiser: Denoiser,
        x: Tensor,
        t: Tensor,
        extra_args: dict,
        draw: Callable[[], Tensor],
        carry: object,
    ) -> tuple[Tensor, Tensor, object]:
        """
        One step from x_t to the next (less noisy) kept timestep.

        :param denoiser: the denoiser on the process respaced to this solver's timesteps (``denoiser.process``);
            ``t`` indexes it.
        :param t: a LongTensor [N], the same respaced index for every image.
        :param draw: returns this step's fresh noise like x (call it at most once, and only when needed).
        :param carry: what this solver's previous step returned as its carry (None on the first step).
        :return: (x at the next timestep, the step's x_0 prediction, the carry for the next step).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, clip_denoised={self.clip_denoised})"


def _draw(noise: NoiseFn | None, k: int, x: Tensor) -> Tensor:
    return noise(k) if noise is not None else torch.randn_like(x)


class DDPM(Solver):
    """Ancestral sampling (the reference's p_sample_loop) on the process respaced to ``steps`` evenly spaced
    timesteps, the first and the last included; uses the learned variance when the model has one."""

    def __init__(self, steps: int = 250, clip_denoised: bool = True) -> None:
        super().__init__(steps, clip_denoised)

    classifier_form = "mean"

    def step(self, denoiser, x, t, extra_args, draw, carry):
        # A noise is drawn at t == 0 too (and not used), as the reference's loop draws it.
        noise = draw()
        pred = denoiser.predict(x, t, **extra_args)
        return denoiser.process.ancestral_step(pred, x, t, noise), pred.denoised, None


class DDIM(Solver):
    """DDIM (Song et al. 2021); ``eta=0`` is deterministic, ``eta=1`` has DDPM's variance.

    The timesteps are DDIM's: every s-th original step from 0, for the integer stride s that gives exactly
    ``steps`` of them (guided-diffusion's "ddimN" respacing), so not every count is possible.
    """

    respacing = "ddim{}"

    def __init__(self, steps: int = 50, eta: float = 0.0, clip_denoised: bool = True) -> None:
        if eta < 0:
            raise ConfigError(f"solver.eta={eta}: must be >= 0 (0 = deterministic, 1 = DDPM-like)")
        super().__init__(steps, clip_denoised)
        self.eta = eta

    def _feasible_hint(self, num_timesteps: int) -> str:
        counts = sorted({len(range(0, num_timesteps, s)) for s in range(1, num_timesteps)})
        below = [c for c in counts if c < self.steps][-1:]
        above = [c for c in counts if c > self.steps][:1]
        return f"Nearest counts that work: {' or '.join(map(str, below + above))}."

    def step(self, denoiser, x, t, extra_args, draw, carry):
        noise = draw() if self.eta > 0 else None
        pred = denoiser.predict(x, t, **extra_args)
        return denoiser.process.ddim_step(pred, x, t, self.eta, noise), pred.denoised, None

    def __repr__(self) -> str:
        return f"DDIM(steps={self.steps}, eta={self.eta}, clip_denoised={self.clip_denoised})"


class DPMSolverPP(Solver):
    """DPM-Solver++(2M) (Lu et al. 2022), deterministic, in the data-prediction form.

    With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t) and the
    model's denoised estimate D_i at step i, one step from s to t with h = lambda_t - lambda_s is
    ``x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D`` where D = D_i on the first step and
    ``D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}`` (r = h_prev / h) after it. The step from t = 0 goes to sigma = 0,
    where x is the last denoised estimate.

    :param spacing: where the ``steps`` network evaluations go among the T training timesteps, T - 1 and 0
        always included. ``logsnr``: evenly in lambda (what DPM-Solver recommends for pixel-space models; even
        in t, the linear schedule crowds most steps where lambda barely moves and takes one huge last step);
        ``time``: evenly in t (guided-diffusion's respacing).
    """

    SPACINGS = ("logsnr", "time")

    def __init__(self, steps: int = 20, clip_denoised: bool = True, spacing: str = "logsnr") -> None:
        if spacing not in self.SPACINGS:
            raise ConfigError(f"solver.spacing={spacing!r}: use one of {list(self.SPACINGS)}")
        super().__init__(steps, clip_denoised)
        self.spacing = spacing

    def timesteps(self, diffusion: GaussianDiffusion) -> list[int]:
        if self.spacing == "time":
            return super().timesteps(diffusion)
        num_timesteps = diffusion.original_num_steps
        if self.steps > num_timesteps:
            raise ConfigError(
                f"solver.steps={self.steps} cannot be met on the model's {num_timesteps}-step process: "
                f"use at most {num_timesteps} steps"
            )
        return logsnr_timesteps(diffusion.respace(None).alphas_cumprod, self.steps)

    def step(self, denoiser, x, t, extra_args, draw, carry):
        process = denoiser.process
        denoised = denoiser.predict(x, t, **extra_args).denoised
        i = int(t[0])
        if i == 0:
            return (
                denoised,
                denoised,
                None,
            )  # the step from t = 0 ends at sigma = 0: x is the denoised estimate
        # float64 schedule values of this step (s) and of the next kept one (t), which is alphas_cumprod_prev.
        alpha_s, sigma_s, lam_s = _alpha_sigma_lambda(process.alphas_cumprod[i])
        alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(process.alphas_cumprod_prev[i])
        h = lam_t - lam_s
        d = denoised if carry is None else _second_order(denoised, *carry, h)
        x = (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * d
        return x, denoised, (denoised, h)

    def __repr__(self) -> str:
        return (
            f"DPMSolverPP(steps={self.steps}, spacing={self.spacing!r}, clip_denoised={self.clip_denoised})"
        )


def _alpha_sigma_lambda(alpha_bar: float) -> tuple[float, float, float]:
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    return alpha, sigma, math.log(alpha) - math.log(sigma)


def logsnr_timesteps(alphas_cumprod: np.ndarray, steps: int) -> list[int]:
    """
    ``steps`` distinct timesteps evenly spaced in log-SNR between the first and the last of a schedule.

    :param alphas_cumprod: the schedule's float64 [T] alpha_bar (decreasing).
    :return: ascending original timesteps, 0 and T - 1 included. Where even log-SNR spacing is finer than one
        timestep (near t = 0 with many steps), consecutive timesteps are taken instead, so none repeats.
    """
    num_timesteps = len(alphas_cumprod)
    lam = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))  # decreasing in t
    targets = np.linspace(lam[-1], lam[0], steps)
    # np.interp needs increasing x: read t(lambda) off the reversed table.
    t = np.rint(np.interp(targets, lam[::-1], np.arange(num_timesteps)[::-1])).astype(int)
    t = np.sort(t)
    for k in range(1, steps):  # push duplicates up...
        t[k] = max(t[k], t[k - 1] + 1)
    t[-1] = num_timesteps - 1
    for k in range(steps - 2, -1, -1):  # ...and back below T - 1
        t[k] = min(t[k], t[k + 1] - 1)
    return t.tolist()


def _second_order(denoised: Tensor, prev_denoised: Tensor, prev_h: float, h: float) -> Tensor:
    """The multistep extrapolation of the denoised estimate, (1 + 1/2r) D_i - (1/2r) D_{i-1}, r = h_prev / h."""
    c = h / (2.0 * prev_h)
    return (1.0 + c) * denoised - c * prev_denoised


def unclipped(solver: Solver) -> Solver:
    """``solver`` without clamping its x0 predictions to [-1, 1]: latents are not bounded (DiT samples with
    clip_denoised=False); a copy, the given solver is left as it is."""
    if not getattr(solver, "clip_denoised", False):
        return solver
    unclipped = copy.copy(solver)
    unclipped.clip_denoised = False
    return unclipped
