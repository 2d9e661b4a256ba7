"""EDM: the preconditioned denoiser, loss weighting and noise-level density of Karras et al. (2022).

The formulation's noise level is sigma itself (variance-exploding: x = x0 + sigma * eps), so its denoiser is the
sampling seam's D(x, sigma) directly:

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))
    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma * sd / sqrt(sigma^2 + sd^2),  c_in = 1 / sqrt(sigma^2 + sd^2)
    c_noise = ln(sigma) / 4

Training draws ln(sigma) ~ N(P_mean, P_std^2) and weights the squared error by
lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2, which makes the effective target of F unit-variance.

With ``uncertainty=True`` the loss becomes EDM2's ``lambda / exp(u) * err + u`` where u(sigma) is a learned
log-variance (:class:`UncertaintyWeight`); its parameters are NOT part of the network, so the engine must add
``formulation.parameters()`` to its optimiser (and checkpoint ``formulation.modules()``).

Network time input: ``network_time(sigma) = time_scale * c_noise``. EDM's reference passes c_noise unscaled
(time_scale=1, used by the fixtures). The default 250 is for the platform's ADM/DiT sinusoidal embeddings, which
were trained on t in [0, 1000): it maps the sampling range [0.002, 80] (c_noise in [-1.55, 1.10]) onto a span of
about 660 embedding units, comparable to ADM's 1000, so both high and low frequencies of the embedding vary.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffusion.process._common import (
    append_dims,
    check_float,
    check_output_channels,
    mean_flat,
    per_example,
)
from diffusion.process.denoiser import Denoiser
from diffusion.process.formulation import Formulation

# Standard-normal quantiles at 0.25, 0.5 and 0.75: the quartile edges of ln(sigma) ~ N(P_mean, P_std^2).
_NORMAL_QUARTILES = (-0.6744897501960817, 0.0, 0.6744897501960817)


class UncertaintyWeight(nn.Module):
    """EDM2's learned per-noise-level log-variance u(sigma): fixed random Fourier features of c_noise + a linear map.

    The frequencies and phases are fixed buffers drawn from ``seed`` (not trained, as in EDM2); only the linear
    layer learns. Its weight starts at zero so that u == 0 at initialisation and the loss starts out equal to plain
    EDM's; the gradient of the ``+ u`` term makes it move from there.
    """

    def __init__(self, channels: int = 128, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c_noise: Tensor) -> Tensor:
        """c_noise [N] -> u [N] (float32 parameters; the result is cast back to c_noise's dtype)."""
        # sqrt(2) makes each cosine feature unit-variance over random phases, so the linear layer sees O(1) inputs.
        feats = torch.cos(c_noise.float()[:, None] * self.freqs[None] + self.phases[None]) * math.sqrt(2)
        return self.linear(feats)[:, 0].to(c_noise.dtype)


class EDMDenoiser(Denoiser):
    """The seam's denoiser D(x, sigma, **extra) -> x0 estimate for a network trained under :class:`EDM`.

    ``extra`` (e.g. ``y=labels``) is passed to the network unchanged; ``clip_denoised`` clamps the estimate to
    [-1, 1].
    """

    def __init__(self, formulation: EDM, net: Callable[..., Tensor], clip_denoised: bool = False):
        self.formulation = formulation
        self.net = net
        self.clip_denoised = clip_denoised
        self.sigma_min = formulation.sigma_min
        self.sigma_max = formulation.sigma_max
        self.sigma_data = formulation.sigma_data

    def __call__(self, x: Tensor, sigma: Tensor | float, **extra) -> Tensor:
        """x [N, ...] (x0 + sigma*eps), sigma scalar or [N] -> x0 estimate [N, ...] in x's dtype."""
        denoised = self.formulation.precondition(self.net, x, per_example(sigma, x), extra)
        return denoised.clamp(-1, 1) if self.clip_denoised else denoised

    def input_scale(self, sigma: Tensor) -> Tensor:
        return 1 / (self.sigma_data**2 + sigma**2).sqrt()

    def network_input(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        sigma = per_example(sigma, x)
        return x * append_dims(self.input_scale(sigma).to(x.dtype), x.ndim), self.formulation.network_time(
            sigma
        )


class EDM(Formulation):
    """The EDM formulation (Karras et al. 2022); see the module docstring for the formulas.

    Args:
        sigma_data: expected standard deviation of the data (0.5 for images scaled to [-1, 1]).
        P_mean, P_std: training density ln(sigma) ~ N(P_mean, P_std^2).
        sigma_min, sigma_max: the sampling range reported by the denoiser.
        time_scale: multiplier of c_noise in the network's time input (see module docstring).
        uncertainty: use EDM2's learned log-variance weighting (the formulation then owns trainable parameters).
    """

    name = "edm"

    def __init__(
        self,
        sigma_data: float = 0.5,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        time_scale: float = 250.0,
        uncertainty: bool = False,
        uncertainty_channels: int = 128,
    ):
        self.sigma_data = check_float("sigma_data", sigma_data, positive=True)
        self.P_mean = check_float("P_mean", P_mean)
        self.P_std = check_float("P_std", P_std, positive=True)
        self.sigma_min = check_float("sigma_min", sigma_min, positive=True)
        self.sigma_max = check_float("sigma_max", sigma_max, positive=True)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"diffusion.sigma_max={sigma_max}: must be > sigma_min={sigma_min}")
        self.time_scale = check_float("time_scale", time_scale, positive=True)
        if not isinstance(uncertainty, bool):
            raise ValueError(f"diffusion.uncertainty={uncertainty!r}: must be true or false")
        if (
            isinstance(uncertainty_channels, bool)
            or not isinstance(uncertainty_channels, int)
            or uncertainty_channels < 1
        ):
            raise ValueError(
                f"diffusion.uncertainty_channels={uncertainty_channels!r}: must be an integer >= 1"
            )
        self.uncertainty = UncertaintyWeight(uncertainty_channels) if uncertainty else None

    # ---- trainable state owned by the formulation --------------------------------------------------------------

    def modules(self) -> list[nn.Module]:
        """Modules the engine must move to the device, optimise and checkpoint (empty without uncertainty)."""
        return [self.uncertainty] if self.uncertainty is not None else []

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters to add to the optimiser (empty without uncertainty)."""
        return [p for m in self.modules() for p in m.parameters()]

    # ---- preconditioning ----------------------------------------------------------------------------------------

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """sigma [N] -> (c_skip, c_out, c_in, c_noise), each [N] in sigma's dtype."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def network_time(self, levels: Tensor) -> Tensor:
        """sigma [N] -> the network's time input [N]: time_scale * ln(sigma) / 4."""
        return self.time_scale * (levels.log() / 4)

    def precondition(
        self, net: Callable[..., Tensor], x: Tensor, sigma: Tensor, model_kwargs: dict | None
    ) -> Tensor:
        """D(x, sigma): x [N, ...], sigma [N] -> x0 estimate [N, ...]. Coefficients are computed in x's dtype."""
        sigma = sigma.to(device=x.device, dtype=x.dtype)
        c_skip, c_out, c_in, _ = (append_dims(c, x.ndim) for c in self.coefficients(sigma))
        F_x = net(c_in * x, self.network_time(sigma), **(model_kwargs or {}))
        check_output_channels(F_x, x, "EDM")
        return c_skip * x + c_out * F_x.to(x.dtype)

    def denoiser(
        self, net: Callable[..., Tensor], clip_denoised: bool = False, quantize: bool = True
    ) -> EDMDenoiser:
        """The seam's D(x, sigma, **extra) for ``net``, with ``sigma_min``/``sigma_max`` attributes (``quantize``
        has no meaning for a continuous formulation)."""
        return EDMDenoiser(self, net, clip_denoised)

    # ---- training ------------------------------------------------------------------------------------------------

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2, [N] -> [N]."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_levels(self, n: int, generator: torch.Generator, device=None) -> Tensor:
        """n sigmas [n] float64 from ln(sigma) ~ N(P_mean, P_std^2), drawn with ``generator`` on its device."""
        z = torch.randn(n, generator=generator, dtype=torch.float64, device=generator.device)
        return (z * self.P_std + self.P_mean).exp().to(device)

    def quartile(self, levels: Tensor) -> Tensor:
        """sigma [N] -> LongTensor [N] in 0..3; 0 = the least-noisy quarter of the training density."""
        z = (levels.double().log() - self.P_mean) / self.P_std
        edges = torch.tensor(_NORMAL_QUARTILES, dtype=torch.float64, device=levels.device)
        return torch.bucketize(z, edges, right=True).long()

    def training_losses(
        self,
        net: Callable[..., Tensor],
        x0: Tensor,
        levels: Tensor,
        noise: Tensor | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """Per-example losses for data x0 [N, ...] at sigmas ``levels`` [N] with standard-normal ``noise`` [N, ...].

        Returns "loss" [N]: mean over non-batch dims of lambda * (D - x0)^2 (EDM2: lambda/exp(u) * err + u),
        "mse" [N]: unweighted mean squared error of D, "weight" [N]: lambda, and "logvar" [N] with uncertainty.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        sigma = levels.to(device=x0.device, dtype=x0.dtype)
        denoised = self.precondition(net, x0 + append_dims(sigma, x0.ndim) * noise, sigma, model_kwargs)
        mse = mean_flat((denoised - x0) ** 2)
        weight = self.loss_weight(sigma)
        out = {"mse": mse, "weight": weight}
        if self.uncertainty is None:
            out["loss"] = weight * mse
        else:
            u = self.uncertainty(sigma.log() / 4).to(x0.dtype)
            out["loss"] = weight / u.exp() * mse + u
            out["logvar"] = u
        return out
