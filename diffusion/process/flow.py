"""Flow matching / stochastic interpolants (SiT, Ma et al. 2024) with SD3-style timestep densities and shift.

Time convention (SiT's, kept so the fixtures compare directly): t in [0, 1], **t = 0 is pure noise and t = 1 is
data**. With x1 the data and eps ~ N(0, I) the noise,

    x_t = alpha_t * x1 + sigma_t * eps,        u_t = d/dt x_t = alpha'_t * x1 + sigma'_t * eps  (the velocity)

    path "linear" (SiT's ICPlan):  alpha_t = t,            sigma_t = 1 - t
    path "gvp"    (SiT's GVPCPlan): alpha_t = sin(pi t/2), sigma_t = cos(pi t/2)

The network predicts the velocity u_t, the noise eps, or the score -eps / sigma_t (``prediction``); any one gives
(x1, eps) by solving the 2x2 system above, and from those every other parameterisation.

Sampling seam: the variance-exploding view of x_t is x = x_t / alpha_t = x1 + (sigma_t / alpha_t) eps, so
D(x, sigma) finds t with sigma_t / alpha_t = sigma (linear: t = 1 / (1 + sigma); gvp: t = (2/pi) atan(1/sigma)),
calls the network on x_t = alpha_t x and returns its x1 estimate. The probability-flow ODE is invariant under this
change of variables, so k-diffusion's ODE samplers solve SiT's ODE.

Timestep density (``density``), as diffusers' ``compute_density_for_timestep_sampling``: a draw ``u`` in [0, 1]
from uniform, logit-normal(logit_mean, logit_std) or SD3's "mode" density (mode_scale). ``u`` is read, as in the SD3
paper, as the NOISE fraction s (SD3: x = (1 - s) x1 + s eps), so logit_mean > 0 means noisier; the SD3 shift is
applied in that direction, s' = shift * s / (1 + (shift - 1) * s), so shift > 1 moves training towards noise (for
larger images); then t = 1 - s'. (diffusers' training scripts index a descending timestep table with u, i.e. they
read u as the data fraction; the two readings agree for uniform, mode and centred logit-normal, which are all
symmetric under u -> 1 - u, and differ only for logit_mean != 0.) Finally t is mapped affinely onto SiT's training
interval [train_eps, 1 - train_eps] (train_eps = 0 for velocity prediction, 1e-3 otherwise, as SiT).

Network time input: ``network_time(t) = time_scale * t`` (SiT direction, t = 1 is data). SiT passes t itself
(time_scale = 1, used by the fixtures); the default 1000 gives the platform's ADM/DiT sinusoidal embeddings the
[0, 1000] span they were built for (note ADM's t = 0 is data, the opposite end; irrelevant when training from
scratch).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffusion.process._common import (
    append_dims,
    check_choice,
    check_float,
    check_output_channels,
    config_error,
    mean_flat,
    per_example,
)
from diffusion.process.denoiser import Denoiser
from diffusion.process.formulation import Formulation

PATHS = ("linear", "gvp")
PREDICTIONS = ("velocity", "noise", "score")
DENSITIES = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTS = ("none", "velocity", "likelihood")
LAST_STEPS = ("mean", "tweedie", "euler", "none")
# Above this mode_scale SD3's mode map u -> 1 - u - s (cos^2(pi u / 2) - 1 + u) stops being monotone, so it is no
# longer a density transform with well-defined quartiles.
MAX_MODE_SCALE = 1 / (math.pi / 2 - 1)


class FlowDenoiser(Denoiser):
    """The seam's denoiser D(x, sigma, **extra) -> x1 (data) estimate for a network trained under :class:`Flow`.

    In the variance-exploding variables x = x_t / alpha_t and sigma = sigma_t / alpha_t; the network sees x_t.
    """

    def __init__(self, formulation: Flow, net: Callable[..., Tensor], clip_denoised: bool = False):
        self.formulation = formulation
        self.net = net
        self.clip_denoised = clip_denoised
        self.sigma_min = formulation.sigma_min
        self.sigma_max = formulation.sigma_max

    def input_scale(self, sigma: Tensor) -> Tensor:
        return self.formulation.coefficients(self.formulation.t_from_sigma(sigma))[0]

    def network_input(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        f = self.formulation
        t = f.t_from_sigma(per_example(sigma, x))
        return append_dims(f.coefficients(t)[0], x.ndim) * x, f.network_time(t)

    def __call__(self, x: Tensor, sigma: Tensor | float, **extra) -> Tensor:
        """x [N, ...] = x1 + sigma * eps, sigma scalar or [N] -> x1 estimate [N, ...]."""
        f = self.formulation
        sigma = per_example(sigma, x)
        t = f.t_from_sigma(sigma)
        alpha, _, _, _ = f.coefficients(t)
        xt = append_dims(alpha, x.ndim) * x
        out = f.call_net(self.net, xt, t, extra)
        denoised = f.convert(out, xt, t)[0]
        return denoised.clamp(-1, 1) if self.clip_denoised else denoised


class Flow(Formulation):
    """SiT's stochastic-interpolant formulation; see the module docstring for conventions.

    Args:
        path: "linear" (rectified flow / SiT Linear) or "gvp" (SiT GVP).
        prediction: what the network outputs: "velocity", "noise" or "score".
        loss_weight: SiT's --loss-weight for noise/score predictions: "none", "velocity" or "likelihood".
        density, logit_mean, logit_std, mode_scale: the timestep density (as diffusers).
        shift: SD3 time shift (>= 1 noisier), 1 = none.
        train_eps: margin of the training interval [eps, 1 - eps]; negative = SiT's default for the prediction.
        sigma_min, sigma_max: the VE sampling range the denoiser reports.
        time_scale: multiplier of t in the network's time input.
        learn_sigma: the network has learned-variance channels after its prediction (a DiT with learn_sigma, as
            SiT's released checkpoints): they are ignored, as SiT's forward drops them.
    """

    name = "flow"
    # Networks with learned-sigma channels (DiT's default, SiT's released checkpoints) are accepted: the extra
    # channels are dropped, as SiT's forward does.
    accepts_variance_channels = True

    def __init__(
        self,
        path: str = "linear",
        prediction: str = "velocity",
        loss_weight: str = "none",
        density: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
        train_eps: float = -1.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        time_scale: float = 1000.0,
        learn_sigma: bool = False,
    ):
        self.path = check_choice("path", path, PATHS)
        self.prediction = check_choice("prediction", prediction, PREDICTIONS)
        self.loss_weight = check_choice("loss_weight", loss_weight, LOSS_WEIGHTS)
        self.density = check_choice("density", density, DENSITIES)
        self.logit_mean = check_float("logit_mean", logit_mean)
        self.logit_std = check_float("logit_std", logit_std, positive=True)
        self.mode_scale = check_float("mode_scale", mode_scale, nonneg=True)
        if self.mode_scale >= MAX_MODE_SCALE:
            raise config_error(
                "mode_scale", mode_scale, f"must be < {MAX_MODE_SCALE:.4f} (monotone mode density)"
            )
        self.shift = check_float("shift", shift, positive=True)
        train_eps = check_float("train_eps", train_eps)
        if train_eps < 0:
            # SiT: velocity on linear/GVP is finite on all of [0, 1]; noise/score blow up at the ends.
            train_eps = 0.0 if self.prediction == "velocity" else 1e-3
        if train_eps >= 0.5:
            raise config_error("train_eps", train_eps, "must be < 0.5")
        self.train_eps = train_eps
        self.sigma_min = check_float("sigma_min", sigma_min, positive=True)
        self.sigma_max = check_float("sigma_max", sigma_max, positive=True)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"diffusion.sigma_max={sigma_max}: must be > sigma_min={sigma_min}")
        self.time_scale = check_float("time_scale", time_scale, positive=True)
        if not isinstance(learn_sigma, bool):
            raise config_error("learn_sigma", learn_sigma, "must be true or false")
        self.learns_sigma = learn_sigma

    def modules(self) -> list:
        """No trainable state of its own."""
        return []

    def parameters(self) -> list:
        return []

    # ---- the path ----------------------------------------------------------------------------------------------

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """t [N] -> (alpha_t, d alpha_t/dt, sigma_t, d sigma_t/dt), each [N] in t's dtype."""
        if self.path == "linear":
            return t, torch.ones_like(t), 1 - t, -torch.ones_like(t)
        half_pi = math.pi / 2
        return (
            torch.sin(t * half_pi),
            half_pi * torch.cos(t * half_pi),
            torch.cos(t * half_pi),
            -half_pi * torch.sin(t * half_pi),
        )

    def sigma_from_t(self, t: Tensor) -> Tensor:
        """t [N] -> VE noise level sigma_t / alpha_t [N] (inf at t = 0)."""
        alpha, _, sigma, _ = self.coefficients(t)
        return sigma / alpha

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """VE noise level [N] -> t [N], the inverse of :meth:`sigma_from_t`."""
        if self.path == "linear":
            return 1 / (1 + sigma)
        return torch.atan2(torch.ones_like(sigma), sigma) * (2 / math.pi)

    def network_time(self, levels: Tensor) -> Tensor:
        """t [N] -> the network's time input time_scale * t [N]."""
        return self.time_scale * levels

    def call_net(
        self, net: Callable[..., Tensor], xt: Tensor, t: Tensor, model_kwargs: dict | None
    ) -> Tensor:
        out = net(xt, self.network_time(t), **(model_kwargs or {}))
        if out.shape[1] == 2 * xt.shape[1]:
            out = out[:, : xt.shape[1]]  # a DiT with learned-sigma channels: SiT's forward drops them too
        check_output_channels(out, xt, "Flow")
        return out

    # ---- conversions between parameterisations -------------------------------------------------------------------

    def convert(self, out: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Network output [N, ...] (in ``prediction``'s parameterisation) at x_t, t [N] -> (x1, eps) estimates."""
        alpha, d_alpha, sigma, d_sigma = (append_dims(c, xt.ndim) for c in self.coefficients(t.to(xt.dtype)))
        if self.prediction == "velocity":
            # Solve [alpha sigma; alpha' sigma'] [x1; eps] = [x_t; u]; det = -1 (linear), -pi/2 (gvp), never 0.
            det = alpha * d_sigma - sigma * d_alpha
            return (d_sigma * xt - sigma * out) / det, (alpha * out - d_alpha * xt) / det
        eps = out if self.prediction == "noise" else -sigma * out
        return (xt - sigma * eps) / alpha, eps

    def velocity(self, out: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Network output -> velocity u_t = alpha' x1 + sigma' eps [N, ...]."""
        if self.prediction == "velocity":
            return out
        x1, eps = self.convert(out, xt, t)
        _, d_alpha, _, d_sigma = (append_dims(c, xt.ndim) for c in self.coefficients(t.to(xt.dtype)))
        return d_alpha * x1 + d_sigma * eps

    def noise(self, out: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Network output -> eps estimate [N, ...]."""
        return self.convert(out, xt, t)[1]

    def score(self, out: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Network output -> score of p_t, -eps / sigma_t [N, ...]."""
        if self.prediction == "score":
            return out
        sigma = append_dims(self.coefficients(t.to(xt.dtype))[2], xt.ndim)
        return -self.noise(out, xt, t) / sigma

    def denoiser(
        self, net: Callable[..., Tensor], clip_denoised: bool = False, quantize: bool = True
    ) -> FlowDenoiser:
        """The seam's D(x, sigma, **extra) for ``net``, with ``sigma_min``/``sigma_max`` attributes."""
        return FlowDenoiser(self, net, clip_denoised)

    # ---- timestep density ----------------------------------------------------------------------------------------

    def raw_draws(self, n: int, generator: torch.Generator) -> Tensor:
        """The density's underlying draws [n] float32 on the generator's device, made as diffusers makes them."""
        if self.density == "logit_normal":
            return torch.normal(
                mean=self.logit_mean,
                std=self.logit_std,
                size=(n,),
                generator=generator,
                device=generator.device,
            )
        return torch.rand(size=(n,), generator=generator, device=generator.device)

    def u_from_draws(self, raw: Tensor) -> Tensor:
        """Raw draws [n] -> diffusers' density value u in [0, 1] [n] (computed in raw's dtype)."""
        if self.density == "logit_normal":
            return torch.sigmoid(raw)
        if self.density == "mode":
            return 1 - raw - self.mode_scale * (torch.cos(math.pi * raw / 2) ** 2 - 1 + raw)
        return raw

    def t_from_draws(self, raw: Tensor) -> Tensor:
        """Raw draws [n] -> SiT time t [n] (float64): u read as noise fraction, shifted, flipped, squeezed."""
        s = self.u_from_draws(raw.double())
        s = self.shift * s / (1 + (self.shift - 1) * s)
        return self.train_eps + (1 - 2 * self.train_eps) * (1 - s)

    def sample_levels(self, n: int, generator: torch.Generator, device=None) -> Tensor:
        """n training times t [n] float64, drawn with ``generator`` (on its device), then moved to ``device``."""
        return self.t_from_draws(self.raw_draws(n, generator)).to(device)

    def quartile(self, levels: Tensor) -> Tensor:
        """t [N] -> LongTensor [N] in 0..3; 0 = the least-noisy quarter (t nearest 1) of the training density."""
        if self.density == "logit_normal":
            z = torch.tensor([-0.6744897501960817, 0.0, 0.6744897501960817], dtype=torch.float64)
            base = self.logit_mean + self.logit_std * z
        else:
            base = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
        # The draw -> t map is monotone (increasing or decreasing by density), so the images of the base
        # quartiles are the quartiles of t; counting edges at or above t orders bins from the data end.
        edges = self.t_from_draws(base).to(levels.device)
        return (levels.double()[:, None] <= edges[None]).sum(dim=1).long()

    # ---- training ------------------------------------------------------------------------------------------------

    def training_losses(
        self,
        net: Callable[..., Tensor],
        x0: Tensor,
        levels: Tensor,
        noise: Tensor | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """SiT's per-example loss for data x0 [N, ...] (SiT's x1) at times ``levels`` [N] with ``noise`` [N, ...].

        Returns "loss" [N] (SiT's weighted loss; weight 1 for velocity prediction), "mse" [N] (the same squared
        error unweighted: of the velocity, the noise, or sigma_t * score + eps) and "weight" [N].
        """
        if noise is None:
            noise = torch.randn_like(x0)
        t = levels.to(device=x0.device, dtype=x0.dtype)
        alpha, d_alpha, sigma, d_sigma = (append_dims(c, x0.ndim) for c in self.coefficients(t))
        xt = alpha * x0 + sigma * noise
        out = self.call_net(net, xt, t, model_kwargs)
        if self.prediction == "velocity":
            err = (out - (d_alpha * x0 + d_sigma * noise)) ** 2
        elif self.prediction == "noise":
            err = (out - noise) ** 2
        else:
            # SiT's score error is measured as sigma_t * score + eps, i.e. in noise units.
            err = (out * sigma + noise) ** 2
        mse = mean_flat(err)
        weight = torch.ones_like(t)
        if self.prediction != "velocity" and self.loss_weight != "none":
            a, da, s, ds = self.coefficients(t)
            # SiT's SDE diffusion g^2/2 = (alpha'/alpha) sigma^2 - sigma sigma'.
            drift_var = da / a * s**2 - s * ds
            weight = (drift_var / s) ** 2 if self.loss_weight == "velocity" else drift_var / s**2
        return {"loss": weight * mse, "mse": mse, "weight": weight}


def sample_flow_sde(
    flow: Flow,
    net: Callable[..., Tensor],
    x: Tensor,
    steps: int = 250,
    diffusion_norm: float = 1.0,
    last_step: str = "mean",
    last_step_size: float = 0.04,
    sample_eps: float = -1.0,
    generator: torch.Generator | None = None,
    model_kwargs: dict | None = None,
    noise: Callable[[], Tensor] | None = None,
) -> Tensor:
    """SiT's SDE sampler: Euler-Maruyama from t = 0 (noise) towards t = 1 (data) with SiT's "sigma" diffusion.

    dx = [u(x, t) + w_t * score(x, t)] dt + sqrt(2 w_t) dW,  w_t = diffusion_norm * sigma_t,

    on ``steps`` grid points linspace(t0, t1) (steps - 1 stochastic steps), then one deterministic last step of
    size ``last_step_size`` ("mean": the SDE drift, "euler": the ODE velocity, "tweedie": x1 = (x + sigma^2 score)
    / alpha, "none": stop at t1). As SiT: t0 = 0 for velocity prediction else sample_eps (default 1e-3);
    t1 = 1 - last_step_size, or 1 - sample_eps without a last step.

    Args:
        x: initial noise [N, ...] (x at t = 0).
        noise: returns the next standard normal [N, ...] draw (the platform's per-image noise); else
        generator: a CPU generator for the Brownian increments: one float32 [N, ...] draw per step, in order,
            then moved to x's device and dtype (SiT's order); None uses the global RNG as SiT does.
    Returns:
        The sample [N, ...] in x's dtype.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"sample_flow_sde steps={steps!r}: must be an integer >= 2")
    last_step = check_choice("last_step", last_step, LAST_STEPS)
    if sample_eps < 0:
        sample_eps = 0.0 if flow.prediction == "velocity" else 1e-3
    if last_step == "none":
        last_step_size = 0.0
    t0 = 0.0 if flow.prediction == "velocity" else sample_eps
    t1 = 1 - sample_eps if last_step_size == 0 else 1 - last_step_size
    grid = torch.linspace(t0, t1, steps)
    dt = grid[1] - grid[0]
    n = x.shape[0]

    def sde_drift(x: Tensor, t: Tensor) -> Tensor:
        out = flow.call_net(net, x, t, model_kwargs)
        w = diffusion_norm * append_dims(flow.coefficients(t)[2], x.ndim)
        return flow.velocity(out, x, t) + w * flow.score(out, x, t)

    for ti in grid[:-1]:
        z = noise() if noise is not None else torch.randn(x.shape, generator=generator)
        z = z.to(x)
        t = torch.ones(n).to(x) * ti
        w = diffusion_norm * append_dims(flow.coefficients(t)[2], x.ndim)
        x = x + sde_drift(x, t) * dt.to(x) + torch.sqrt(2 * w) * (z * torch.sqrt(dt).to(x))
    t = torch.ones(n, device=x.device, dtype=x.dtype) * t1
    if last_step == "mean":
        x = x + sde_drift(x, t) * last_step_size
    elif last_step == "euler":
        x = x + flow.velocity(flow.call_net(net, x, t, model_kwargs), x, t) * last_step_size
    elif last_step == "tweedie":
        alpha, _, sigma, _ = (append_dims(c, x.ndim) for c in flow.coefficients(t))
        x = x / alpha + sigma**2 / alpha * flow.score(flow.call_net(net, x, t, model_kwargs), x, t)
    return x
