"""Generation: solvers that turn noise into images, classifier-free guidance, reproducible per-image noise.

Every solver is a small class built from the ``solver`` config group and called with one signature::

    solver(model, diffusion, x_T, model_kwargs=None, noise=None, progress=False, callback=None, cond_fn=None) -> x_0

``diffusion`` is the process the model was trained with (any number of steps). Each solver picks ``steps`` of its
timesteps (DDPM and DDIM by guided-diffusion's respacing, DPM-Solver++ evenly in log-SNR); one loop, in the base
class, runs the process respaced to them and calls the solver's ``step``, and the network always sees the
original timestep indices. ``noise(k)`` returns the fresh Gaussian noise a stochastic solver needs at its k-th
step; ``callback(k, x, pred_xstart)`` sees every step (k-diffusion's convention). ``cond_fn(x, t)`` adds classifier
guidance (diffusion/guidance.py): DDPM shifts its mean by it, DDIM and DPM-Solver++ correct the score.

The network may predict epsilon, x0 or v (the process converts); learned-variance channels are used by the
ancestral solver and ignored by the deterministic ones.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion.errors import ConfigError
from diffusion.process.gaussian import GaussianDiffusion, space_timesteps
from diffusion.sampling.guidance import CondFn, condition_xstart

NoiseFn = Callable[[int], Tensor]


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
        self.timesteps(diffusion)

    def __call__(
        self,
        model: Callable[..., Tensor],
        diffusion: GaussianDiffusion,
        x_T: Tensor,
        model_kwargs: dict | None = None,
        noise: NoiseFn | None = None,
        progress: bool = False,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
        cond_fn: CondFn | None = None,
    ) -> Tensor:
        """
        :param model: the network (or a guided wrapper of it), called with original timestep indices.
        :param diffusion: the process the model was trained with.
        :param x_T: an [N x C x H x W] Tensor of standard normal noise.
        :param model_kwargs: extra arguments of every network call, e.g. ``{"y": labels}``.
        :param noise: ``noise(k)`` gives the fresh noise of the k-th step (drawn with ``randn_like`` when None);
            called once per step, in order, by the stochastic solvers.
        :param callback: called after every step as ``callback(k, x, pred_xstart)``.
        :param cond_fn: classifier guidance, ``cond_fn(x, t)`` -> the scaled gradient of log p(y | x_t) (see
            diffusion/guidance.py), called with the timesteps the network sees; None: unguided.
        :return: an [N x C x H x W] Tensor of samples.
        """
        process = diffusion.respace_to(self.timesteps(diffusion))
        x, carry = x_T, None
        indices = range(process.num_timesteps - 1, -1, -1)
        for k, i in enumerate(tqdm(indices, desc=type(self).__name__, leave=False, disable=not progress)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            draw = functools.partial(_draw, noise, k, x)
            x, pred_xstart, carry = self.step(process, model, x, t, model_kwargs, draw, carry, cond_fn)
            if callback is not None:
                callback(k, x, pred_xstart)
        return x

    def step(
        self,
        process: GaussianDiffusion,
        model: Callable[..., Tensor],
        x: Tensor,
        t: Tensor,
        model_kwargs: dict | None,
        draw: Callable[[], Tensor],
        carry: object,
        cond_fn: CondFn | None = None,
    ) -> tuple[Tensor, Tensor, object]:
        """
        One step from x_t to the next (less noisy) kept timestep.

        :param process: the process respaced to this solver's timesteps; ``t`` indexes it.
        :param t: a LongTensor [N], the same respaced index for every image.
        :param draw: returns this step's fresh noise like x (call it at most once, and only when needed).
        :param carry: what this solver's previous step returned as its carry (None on the first step).
        :param cond_fn: classifier guidance for this step (diffusion/guidance.py), or None.
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

    def step(self, process, model, x, t, model_kwargs, draw, carry, cond_fn=None):
        # A noise is drawn at t == 0 too (and not used), as the reference's loop draws it. Classifier guidance
        # shifts the mean (condition_mean).
        out = process.p_sample(
            model, x, t, self.clip_denoised, model_kwargs=model_kwargs, noise=draw(), cond_fn=cond_fn
        )
        return out["sample"], out["pred_xstart"], None


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

    def step(self, process, model, x, t, model_kwargs, draw, carry, cond_fn=None):
        noise = draw() if self.eta > 0 else None
        # Classifier guidance corrects the score (condition_score).
        out = process.ddim_sample(
            model, x, t, self.eta, self.clip_denoised, model_kwargs=model_kwargs, noise=noise, cond_fn=cond_fn
        )
        return out["sample"], out["pred_xstart"], None

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

    def step(self, process, model, x, t, model_kwargs, draw, carry, cond_fn=None):
        out = process.model_output(model, x, t, model_kwargs)
        denoised, _ = process.predict_xstart_eps(out, x, t, clip_denoised=self.clip_denoised)
        if cond_fn is not None:  # classifier guidance corrects the score, i.e. the denoised estimate
            denoised, _ = condition_xstart(process, denoised, x, t, cond_fn)
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


def guided(model: Callable[..., Tensor], scale: float, null_class: int) -> Callable[..., Tensor]:
    """Classifier-free guidance in one batched forward pass.

    Returns a function with the network's signature that runs the conditional and the null-label halves as one
    batch of 2N and combines them as ``uncond + scale * (cond - uncond)`` on the prediction channels;
    learned-variance channels are taken from the conditional half. The combination is affine (weights 1 - scale
    and scale), so mixing the raw outputs gives the same x0 and eps whether the network predicts epsilon, x0 or v.

    :param scale: the guidance weight; 1 returns the conditional prediction, 0 the unconditional one.
    :param null_class: the label index the model was trained with for "no label".
    """

    def forward(x: Tensor, t: Tensor, y: Tensor | None = None, **kwargs) -> Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        both = {k: torch.cat([v, v]) for k, v in kwargs.items()}  # per-image inputs such as low_res
        out = model(
            torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null_class)]), **both
        )
        cond, uncond = out.chunk(2)  # each (N, C or 2C, H, W)
        c = x.shape[1]
        mixed = torch.lerp(uncond[:, :c], cond[:, :c], scale)
        return torch.cat([mixed, cond[:, c:]], dim=1)

    return forward


def dit_guided(model: Callable[..., Tensor], scale: float, null_class: int) -> Callable[..., Tensor]:
    """DiT's own classifier-free guidance (``guidance_style=dit``), for DiT's published numbers: the network's
    ``forward_with_cfg`` on the batch laid out as DiT's sample.py lays it out (the images twice, the labels then
    the null label), of which the first half is kept. It guides eps channels 0-2 only; the fourth latent
    channel and the variance channels are the conditional prediction's (see DiT.forward_with_cfg).

    :param model: a network with DiT's ``forward_with_cfg(x, t, y, cfg_scale)``.
    """

    def forward(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        y2 = torch.cat([y, torch.full_like(y, null_class)])
        return model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), y=y2, cfg_scale=scale)[: len(x)]

    return forward


# How classifier-free guidance combines the two predictions, by sample.py's guidance_style.
GUIDANCE_STYLES: dict[str, Callable[[Callable[..., Tensor], float, int], Callable[..., Tensor]]] = {
    "all": guided,
    "dit": dit_guided,
}


def _dropout_field(model: torch.nn.Module) -> str:
    """The config key of the label dropout that trains the null class, in the model's own vocabulary."""
    return "model.class_dropout_prob" if hasattr(model, "class_dropout_prob") else "model.label_dropout"


def check_guidance(model: torch.nn.Module, guidance_scale: float, guidance_style: str = "all") -> None:
    """ValueError unless ``guidance_scale`` (and ``guidance_style``) is usable with ``model`` (1 = off always
    is)."""
    if guidance_scale < 0:
        raise ConfigError(f"guidance_scale={guidance_scale}: must be >= 0 (1 = off, 0 = unconditional)")
    if guidance_style not in GUIDANCE_STYLES:
        raise ConfigError(f"guidance_style={guidance_style!r}: use one of {list(GUIDANCE_STYLES)}")
    if guidance_scale == 1.0:
        return
    if not getattr(model, "num_classes", None):
        raise ConfigError(
            f"guidance_scale={guidance_scale} needs a class-conditional model trained with "
            f"{_dropout_field(model)} > 0; this model is unconditional: use guidance_scale=1"
        )
    if getattr(model, "null_class", None) is None:
        raise ConfigError(
            f"guidance_scale={guidance_scale} needs a model trained with classifier-free guidance "
            f"({_dropout_field(model)} > 0); this one has no null class: use guidance_scale=1"
        )
    if guidance_style == "dit" and not hasattr(model, "forward_with_cfg"):
        raise ConfigError(
            f"guidance_style=dit is DiT's forward_with_cfg, which {type(model).__name__} does not have: use "
            "guidance_style=all"
        )


class PerImageNoise:
    """Gaussian noise that depends only on (seed, image index, draw number), not on batching or ranks.

    Each image owns a CPU generator seeded from (seed, index); x_T is its first draw and every stochastic solver
    step draws the next one, so image k is the same whether it is generated in a batch of 4 or 16, on one rank
    or on two, on the CPU or a GPU.

    :param seed: a non-negative integer.
    :param indices: the global indices of the images in this batch (N of them).
    :param shape: the shape of one image, (C, H, W).
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int], device: torch.device) -> None:
        if seed < 0:
            raise ConfigError(f"seed={seed}: must be >= 0")
        self.shape = tuple(shape)
        self.device = device
        self.generators = [torch.Generator().manual_seed(derived_seed(seed, i)) for i in indices]

    def draw(self) -> Tensor:
        """The next draw of every image: an [N x C x H x W] Tensor on the device."""
        x = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return x.to(self.device)

    def __call__(self, step: int) -> Tensor:
        return self.draw()


def derived_seed(*keys: int) -> int:
    """A 64-bit generator seed from non-negative integer keys, e.g. (seed, image index): distinct key tuples give
    unrelated streams, unlike ``seed * K + index``, where seed 0's image K is seed 1's image 0."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    solver: Callable[..., Tensor],
    indices: Sequence[int],
    seed: int,
    device: torch.device,
    classes: Tensor | None = None,
    guidance_scale: float = 1.0,
    autocast: contextlib.AbstractContextManager | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    cond_fn: CondFn | None = None,
    model_kwargs: dict | None = None,
    guidance_style: str = "all",
) -> Tensor:
    """Generate the images with the given global indices: a float [N x C x H x W] Tensor in [-1, 1].

    :param model: the network; its ``in_channels``, ``image_size`` and ``null_class`` attributes are read.
    :param diffusion: the process the model was trained with.
    :param solver: a solver (see the module docstring).
    :param indices: N global image indices; an image's noise depends only on its index and ``seed``.
    :param classes: [N] class labels for a class-conditional model, else None (an unconditional model guided
        by a classifier gets its classes through ``cond_fn``).
    :param guidance_scale: classifier-free guidance weight; 1 disables it (one forward pass of N per step).
    :param autocast: the forward-pass precision context (``Hardware.autocast()``); None runs in fp32.
    :param callback: passed to the solver: ``callback(k, x, pred_xstart)`` after every step.
    :param cond_fn: classifier guidance for these N images (``guidance.classifier_cond_fn(classifier, classes,
        scale)``), passed to the solver; it combines with classifier-free guidance.
    :param model_kwargs: further per-image network inputs, e.g. ``{"low_res": [N x C x h x w]}`` for a
        SuperResModel.
    :param guidance_style: how guidance combines the predictions: "all" (:func:`guided`, every eps channel) or
        "dit" (:func:`dit_guided`, DiT's forward_with_cfg).
    """
    indices = list(indices)
    check_guidance(model, guidance_scale, guidance_style)
    if classes is not None and len(classes) != len(indices):
        raise ValueError(f"classes has {len(classes)} labels for {len(indices)} images")
    if classes is not None and not model.num_classes:
        raise ValueError(
            "classes given for an unconditional model: steer it with a classifier's cond_fn instead"
        )
    noise = PerImageNoise(seed, indices, (model.in_channels, model.image_size, model.image_size), device)
    x_T = noise.draw()
    kwargs, net = dict(model_kwargs or {}), model
    if classes is not None:
        kwargs["y"] = classes.to(device)
        if guidance_scale != 1.0:
            net = GUIDANCE_STYLES[guidance_style](model, guidance_scale, model.null_class)
    with autocast if autocast is not None else contextlib.nullcontext():
        x = solver(net, diffusion, x_T, model_kwargs=kwargs, noise=noise, callback=callback, cond_fn=cond_fn)
    return x.float()


def unclipped(solver: Solver) -> Solver:
    """``solver`` without clamping its x0 predictions to [-1, 1]: latents are not bounded (DiT samples with
    clip_denoised=False); a copy, the given solver is left as it is."""
    if not getattr(solver, "clip_denoised", False):
        return solver
    unclipped = copy.copy(solver)
    unclipped.clip_denoised = False
    return unclipped
