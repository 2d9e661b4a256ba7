"""The Gaussian diffusion process of DDPM, improved DDPM and ADM ("Diffusion Models Beat GANs").

Forward noising q(x_t | x_0), the reverse-process parameterisations (epsilon, x0, v; fixed or learned variance),
the ancestral and DDIM steps given a prediction, the training losses and the variational bound in bits/dim, and
:class:`ADMDenoiser`, the denoiser seam (diffusion/process/denoiser.py) for the process's networks.

Respacing is built in: a process made with ``timestep_respacing`` keeps a subset of the original timesteps,
recomputes its betas from the kept steps' alphas_cumprod, and always calls the network with the ORIGINAL
timestep indices (``timestep_map``), so a model trained on 1000 steps samples correctly with 50.

Schedule arrays are float64 numpy; they are indexed per batch and cast to the input's dtype and device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from diffusion.errors import ConfigError, check_choice
from diffusion.process.denoiser import Denoiser, Prediction, append_dims, sigma_tensor
from diffusion.process.discrete_schedule import DiscreteSchedule
from diffusion.process.formulation import Formulation
from diffusion.process.weighting import min_snr_weights

Model = Callable[..., Tensor]

MEAN_TYPES = ("epsilon", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
LOSS_WEIGHTINGS = ("none", "min_snr")
_MIN_SNR_TARGET = {"epsilon": "eps", "x0": "x0", "v": "v"}

# Schedule tables behind each fixed variance type: (variance, log-variance) attribute names.
_FIXED_VARIANCE_TABLES = {
    "fixed_small": ("posterior_variance", "posterior_log_variance_clipped"),
    "fixed_large": ("fixed_large_variance", "fixed_large_log_variance"),
}


# --------------------------------------------------------------------------------------------------------------
# Schedules and respacing
# --------------------------------------------------------------------------------------------------------------


def _linear_betas(num_steps: int) -> np.ndarray:
    # The endpoints scale with 1000/num_steps so that a shorter chain adds the same total noise as DDPM's 1000.
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def _cosine_alpha_bar(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    # Betas follow from a continuous alpha_bar(s), s in [0, 1]; capping them keeps the last step non-singular.
    betas = [
        min(1 - _cosine_alpha_bar((i + 1) / num_steps) / _cosine_alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return np.array(betas, dtype=np.float64)


_BETA_SCHEDULES = {"linear": _linear_betas, "cosine": _cosine_betas}


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """
    Betas of a named noise schedule.

    :param name: "linear" (DDPM, endpoints scaled by 1000/num_steps) or "cosine" (improved DDPM).
    :param num_steps: the number of diffusion steps T.
    :return: a float64 array of T betas.
    """
    _check_positive_int("num_steps", num_steps)
    if name not in _BETA_SCHEDULES:
        raise ConfigError(f"noise_schedule must be one of {sorted(_BETA_SCHEDULES)}, got {name!r}")
    return _BETA_SCHEDULES[name](num_steps)


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """
    Which of the original timesteps a respaced process keeps, exactly as guided-diffusion chooses them.

    :param num_timesteps: the number of steps of the original process.
    :param section_counts: either "ddimN" (the integer stride that gives exactly N steps, as in DDIM), or counts
        of steps per equal section, as a comma string ("10,15,20"), an int or a sequence of ints: the original
        steps are cut into len(counts) sections and each section is sampled evenly (its ends included).
    :return: the sorted list of kept original timesteps.
    """
    _check_positive_int("num_timesteps", num_timesteps)
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        return _ddim_timesteps(num_timesteps, section_counts)
    counts = _parse_section_counts(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ConfigError(
                f"timestep_respacing: section {i} covers {size} of the {num_timesteps} steps; "
                f"it cannot keep {count}"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulating the fractional index (rather than j * stride) reproduces the reference's rounding.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    if not kept:
        raise ConfigError(f"timestep_respacing {section_counts!r} keeps no timestep")
    return sorted(kept)


def _ddim_timesteps(num_timesteps: int, spec: str) -> list[int]:
    try:
        desired = int(spec[len("ddim") :])
    except ValueError:
        raise ConfigError(f"timestep_respacing {spec!r}: expected 'ddimN' with an integer N") from None
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
            return list(range(0, num_timesteps, stride))
    raise ConfigError(
        f"timestep_respacing {spec!r}: no integer stride takes exactly {desired} of {num_timesteps} steps"
    )


def _parse_section_counts(section_counts: str | int | Sequence[int]) -> list[int]:
    if isinstance(section_counts, numbers.Integral):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        try:
            section_counts = [int(part) for part in section_counts.split(",")]
        except ValueError:
            raise ConfigError(
                f"timestep_respacing {section_counts!r}: expected 'ddimN' or comma-separated integers"
            ) from None
    counts = list(section_counts)
    if not counts or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0 for c in counts):
        raise ConfigError(f"timestep_respacing: section counts must be non-negative integers, got {counts!r}")
    return [int(c) for c in counts]


def _respaced_betas(alphas_cumprod: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    # Keep alpha_bar at the kept steps unchanged: each new beta bridges one kept step to the next.
    kept_alphas_cumprod = alphas_cumprod[list(kept)]
    previous = np.append(1.0, kept_alphas_cumprod[:-1])
    return 1.0 - kept_alphas_cumprod / previous


# --------------------------------------------------------------------------------------------------------------
# Gaussian likelihood helpers
# --------------------------------------------------------------------------------------------------------------


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: [N x ...] -> [N]."""
    return x.mean(dim=list(range(1, x.dim())))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats; arguments broadcast."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF (used by the reference decoder)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """
    Log-likelihood of 8-bit data under a Gaussian discretised into 256 bins over [-1, 1].

    :param x: an [N x C x ...] Tensor of data scaled from uint8 to [-1, 1].
    :param means: the Gaussian means, same shape.
    :param log_scales: log standard deviations, same shape.
    :return: elementwise log-probabilities in nats, same shape.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    # The edge bins extend to +-infinity; clamps keep log() finite where the bin mass underflows.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin))


# --------------------------------------------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------------------------------------------


class GaussianDiffusion(Formulation):
    """
    A Gaussian diffusion process with its reverse-process parameterisation and losses.

    :param steps: number of steps T of the original (training) process.
    :param noise_schedule: "linear" or "cosine".
    :param model_mean_type: what the network predicts: "epsilon" (the noise), "x0" (the clean image) or
        "v" (sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0).
    :param model_var_type: "fixed_small" (posterior variance), "fixed_large" (beta_t), "learned" (the network
        outputs the log-variance) or "learned_range" (it outputs v in [-1, 1] interpolating between the two).
        Learned types make the network output twice the image channels.
    :param loss_type: "mse" (plus the bound for learned variances), "rescaled_mse" (bound scaled by T/1000),
        "kl" (the variational bound) or "rescaled_kl" (the bound times T).
    :param rescale_timesteps: call the network with float t * 1000 / steps (improved-DDPM models) instead of
        the integer original index.
    :param timestep_respacing: None for all steps, or the section counts of :func:`space_timesteps`.
    :param loss_weighting: "none", or "min_snr": Min-SNR-gamma (Hang et al. 2023) weights on the MSE term, for
        the network's target (epsilon, x0 or v; the authors' weights, diffusion/process/weighting.py).
    :param min_snr_gamma: the clamp of Min-SNR-gamma.
    """

    name = "adm"
    discrete = True

    def __init__(
        self,
        steps: int = 1000,
        noise_schedule: str = "linear",
        model_mean_type: str = "epsilon",
        model_var_type: str = "learned_range",
        loss_type: str = "mse",
        rescale_timesteps: bool = False,
        timestep_respacing: str | int | Sequence[int] | None = None,
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
    ):
        check_choice("diffusion.model_mean_type", model_mean_type, MEAN_TYPES)
        check_choice("diffusion.loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        if not min_snr_gamma > 0:
            raise ConfigError(f"diffusion.min_snr_gamma={min_snr_gamma}: must be > 0 (the paper's is 5)")
        if loss_weighting == "min_snr" and loss_type not in ("mse", "rescaled_mse"):
            raise ConfigError(
                f"diffusion.loss_weighting=min_snr weights the MSE term; loss_type={loss_type} has none: use "
                "loss_type=mse"
            )
        check_choice("diffusion.model_var_type", model_var_type, VAR_TYPES)
        check_choice("diffusion.loss_type", loss_type, LOSS_TYPES)
        self._settings = dict(
            steps=steps,
            noise_schedule=noise_schedule,
            model_mean_type=model_mean_type,
            model_var_type=model_var_type,
            loss_type=loss_type,
            rescale_timesteps=rescale_timesteps,
            loss_weighting=loss_weighting,
            min_snr_gamma=min_snr_gamma,
        )
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = bool(rescale_timesteps)
        self.original_num_steps = steps
        self.timestep_respacing = timestep_respacing

        betas = get_named_beta_schedule(noise_schedule, steps)
        if not ((betas > 0) & (betas < 1)).all():
            raise ConfigError(f"steps={steps} gives {noise_schedule} betas outside (0, 1); use more steps")
        self._set_schedule(betas)
        self.timestep_map = torch.arange(steps, dtype=torch.long)
        if _is_respaced(timestep_respacing):
            self._keep(
                space_timesteps(steps, timestep_respacing), f"timestep_respacing {timestep_respacing!r}"
            )
        self._xstart_eps_from_output = {
            "epsilon": self._from_epsilon,
            "x0": self._from_xstart,
            "v": self._from_v,
        }[model_mean_type]
        # Scale on the bound term: the MSE variants add it for learned variances, the KL variants are made of it.
        self._vb_scale = {
            "mse": 1.0,
            "rescaled_mse": self.num_timesteps / 1000.0,
            "kl": 1.0,
            "rescaled_kl": float(self.num_timesteps),
        }[loss_type]

    def _keep(self, kept: Sequence[int], what: str) -> None:
        """Keep only the original timesteps ``kept`` (sorted) of this full process: each new beta bridges one kept
        step to the next, so alpha_bar at the kept steps is unchanged."""
        if len(kept) < 2:
            raise ConfigError(f"{what} keeps {len(kept)} step; need at least 2")
        self.timestep_map = torch.tensor(kept, dtype=torch.long)
        self._set_schedule(_respaced_betas(self.alphas_cumprod, kept))

    def _set_schedule(self, betas: np.ndarray) -> None:
        self._device_tables: dict[tuple[str, torch.device], Tensor] = {}
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.log_betas = np.log(betas)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; borrow t=1's so its log stays finite.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        # beta_t bounds the reverse variance from above; its first entry is the posterior's, as in the reference,
        # so that the t=0 decoder is not as wide as beta_1 would make it.
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

    # --- the formulation interface (diffusion/process/formulation.py) -----------------------------------------

    def level_sampler(self, configured):
        """The ``sampler`` group's timestep sampler over this process's steps."""
        return configured(self.num_timesteps)

    def quartile(self, levels: Tensor) -> Tensor:
        """Respaced timesteps [N] -> the quarter of the ORIGINAL [0, T) each falls in, a LongTensor [N]."""
        return (self.original_timesteps(levels.long()) * 4 // self.original_num_steps).clamp(0, 3)

    @property
    def learns_sigma(self) -> bool:
        """Whether the network outputs variance channels after the mean channels."""
        return self.model_var_type in ("learned", "learned_range")

    def respace(self, section_counts: str | int | Sequence[int] | None) -> GaussianDiffusion:
        """The same process respaced over the ORIGINAL steps (not over this one's kept steps)."""
        return GaussianDiffusion(**self._settings, timestep_respacing=section_counts)

    def respace_to(self, timesteps: Sequence[int]) -> GaussianDiffusion:
        """The same process keeping exactly the given ORIGINAL timesteps (a solver's own choice of steps).

        :param timesteps: distinct original timestep indices in [0, T), any order; at least 2.
        """
        kept = sorted({int(t) for t in timesteps})
        if len(kept) != len(timesteps) or kept[0] < 0 or kept[-1] >= self.original_num_steps:
            raise ValueError(
                f"timesteps must be distinct indices in [0, {self.original_num_steps}), got {list(timesteps)}"
            )
        process = GaussianDiffusion(**self._settings)
        process._keep(kept, f"timesteps {list(timesteps)}")
        process.timestep_respacing = kept
        return process

    def original_timesteps(self, t: Tensor) -> Tensor:
        """
        :param t: a LongTensor [N] of respaced indices.
        :return: the original timestep indices [N] they stand for, on t's device.
        """
        return self._table("timestep_map", t.device)[t]

    # --- schedule lookups -------------------------------------------------------------------------------------

    def _table(self, name: str, device: torch.device) -> Tensor:
        key = (name, device)
        if key not in self._device_tables:
            table = torch.as_tensor(getattr(self, name))
            if device.type == "mps" and table.dtype == torch.float64:
                table = table.float()  # MPS has no float64
            self._device_tables[key] = table.to(device)
        return self._device_tables[key]

    def _coef(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """Schedule array `name` at timesteps t [N], as an [N x 1 x ...] Tensor in x's dtype and device."""
        values = self._table(name, x.device)[t.to(x.device)].to(x.dtype)
        return values.view(-1, *([1] * (x.dim() - 1)))

    # --- forward process --------------------------------------------------------------------------------------

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """
        Sample x_t ~ q(x_t | x_0).

        :param x_start: an [N x C x ...] Tensor of clean data.
        :param t: a LongTensor [N] of (respaced) timesteps.
        :param noise: optional standard normal noise, same shape as x_start.
        :return: x_t, same shape as x_start.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._coef("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """
        The Gaussian posterior q(x_{t-1} | x_t, x_0).

        :param x_start: an [N x C x ...] Tensor of x_0.
        :param x_t: an [N x C x ...] Tensor of x_t.
        :param t: a LongTensor [N] of timesteps.
        :return: (mean, variance, log_variance), each [N x C x ...].
        """
        mean = (
            self._coef("posterior_mean_coef1", t, x_t) * x_start
            + self._coef("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._coef("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._coef("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def v_from_xstart_eps(self, x_start: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The v-prediction target sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x_0, [N x C x ...]."""
        return (
            self._coef("sqrt_alphas_cumprod", t, x_start) * eps
            - self._coef("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start
        )

    # --- reverse-process parameterisation ---------------------------------------------------------------------

    def model_output(self, model: Model, x: Tensor, t: Tensor, model_kwargs: dict | None = None) -> Tensor:
        """
        Call the network at respaced timesteps t with the original timesteps it was trained on.

        :param x: an [N x C x ...] Tensor.
        :param t: a LongTensor [N] of respaced timesteps.
        :return: the raw network output, [N x C x ...] or [N x 2C x ...] when the variance is learned.
        """
        return model(x, self.network_timesteps(t), **(model_kwargs or {}))

    def network_timesteps(self, t: Tensor) -> Tensor:
        """The time values the network is given at respaced indices t [N]: the original indices, or, when the
        process rescales timesteps, floats on a [0, 1000) scale (improved-DDPM models, whatever the step count)."""
        model_t = self.original_timesteps(t)
        if self.rescale_timesteps:
            model_t = model_t.float() * (1000.0 / self.original_num_steps)
        return model_t

    def denoiser(self, net: Model, clip_denoised: bool = False, quantize: bool = True) -> ADMDenoiser:
        """The denoiser seam for a network trained on this process (see :class:`ADMDenoiser`)."""
        return ADMDenoiser(self, net, clip_denoised=clip_denoised, quantize=quantize)

    def _split_output(self, model_output: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        channels = x.shape[1] * (2 if self.learns_sigma else 1)
        if model_output.shape[:2] != (x.shape[0], channels):
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}; with model_var_type="
                f"{self.model_var_type!r} it must be [{x.shape[0]} x {channels} x ...]"
            )
        if not self.learns_sigma:
            return model_output, None
        mean_out, var_out = model_output.split(x.shape[1], dim=1)
        return mean_out, var_out

    def xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) at timesteps t [N], [N x C x ...]."""
        return (
            self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def eps_from_xstart(self, x_t: Tensor, t: Tensor, x_start: Tensor) -> Tensor:
        """The noise that takes x_0 to x_t at timesteps t [N], [N x C x ...]."""
        return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x_start) / self._coef(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def _from_epsilon(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.xstart_from_eps(x_t, t, out), out

    def _from_xstart(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return out, self.eps_from_xstart(x_t, t, out)

    def _from_v(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        sqrt_ab = self._coef("sqrt_alphas_cumprod", t, x_t)
        sqrt_one_minus_ab = self._coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        return sqrt_ab * x_t - sqrt_one_minus_ab * out, sqrt_one_minus_ab * x_t + sqrt_ab * out

    def predict_xstart_eps(
        self,
        model_output: Tensor,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """
        The x_0 and noise predictions implied by a network output, for any mean type.

        :param model_output: the raw network output [N x C x ...] (variance channels, if any, are ignored).
        :param x: the [N x C x ...] Tensor x_t the network saw.
        :param t: a LongTensor [N] of respaced timesteps.
        :param clip_denoised: clamp x_0 to [-1, 1].
        :param denoised_fn: applied to x_0 before clipping.
        :return: (pred_xstart, eps), each [N x C x ...]; when x_0 was processed, eps is recomputed from it.
        """
        mean_out, _ = self._split_output(model_output, x)
        return self._xstart_eps(mean_out, x, t, clip_denoised, denoised_fn)

    def _xstart_eps(
        self, mean_out: Tensor, x: Tensor, t: Tensor, clip_denoised: bool, denoised_fn: Callable | None
    ) -> tuple[Tensor, Tensor]:
        pred_xstart, eps = self._xstart_eps_from_output(mean_out, x, t)
        if denoised_fn is None and not clip_denoised:
            return pred_xstart, eps
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        # DDIM steps along eps: it must point from the processed x_0 to x_t, or the chain drifts off the data.
        return pred_xstart, self.eps_from_xstart(x, t, pred_xstart)

    def _model_variance(self, var_out: Tensor | None, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if var_out is None:
            variance_name, log_variance_name = _FIXED_VARIANCE_TABLES[self.model_var_type]
            return (
                self._coef(variance_name, t, x).expand_as(x),
                self._coef(log_variance_name, t, x).expand_as(x),
            )
        if self.model_var_type == "learned":
            return torch.exp(var_out), var_out
        # learned_range: var_out in [-1, 1] interpolates the log-variance between the posterior's and beta_t.
        frac = (var_out + 1) / 2
        log_variance = frac * self._coef("log_betas", t, x) + (1 - frac) * self._coef(
            "posterior_log_variance_clipped", t, x
        )
        return torch.exp(log_variance), log_variance

    def p_mean_variance(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """
        The reverse step p(x_{t-1} | x_t) and the network's x_0 / noise predictions.

        :param x: an [N x C x ...] Tensor x_t.
        :param t: a LongTensor [N] of respaced timesteps.
        :return: dict of [N x C x ...] Tensors: mean, variance, log_variance, pred_xstart, eps.
        """
        output = self.model_output(model, x, t, model_kwargs)
        return self._p_mean_variance_from_output(output, x, t, clip_denoised, denoised_fn)

    def _p_mean_variance_from_output(
        self, output: Tensor, x: Tensor, t: Tensor, clip_denoised: bool, denoised_fn: Callable | None
    ) -> dict[str, Tensor]:
        return self.p_mean_variance_from_prediction(
            self.prediction(output, x, t, clip_denoised, denoised_fn), x, t
        )

    def prediction(
        self,
        output: Tensor,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Prediction:
        """The :class:`~diffusion.process.denoiser.Prediction` a raw network output makes at (x_t, t)."""
        mean_out, var_out = self._split_output(output, x)
        pred_xstart, eps = self._xstart_eps(mean_out, x, t, clip_denoised, denoised_fn)
        return Prediction(pred_xstart, eps, var_out)

    def p_mean_variance_from_prediction(self, pred: Prediction, x: Tensor, t: Tensor) -> dict[str, Tensor]:
        """
        The reverse step p(x_{t-1} | x_t) given a prediction: the posterior mean of its x_0 and the variance of its
        variance channels (or the fixed one). A prediction that carries a guidance gradient (``pred.grad``, the
        ancestral form of classifier guidance) moves the mean by variance * grad, in float32 as the reference does.

        :return: dict of [N x C x ...] Tensors: mean, variance, log_variance, pred_xstart, eps.
        """
        variance, log_variance = self._model_variance(pred.var_values, x, t)
        mean, _, _ = self.q_posterior_mean_variance(pred.denoised, x, t)
        if pred.grad is not None:
            mean = mean.float() + variance.float() * pred.grad.float()
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred.denoised,
            "eps": pred.eps,
        }

    def ancestral_step(self, pred: Prediction, x: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_{t-1} ~ p(x_{t-1} | x_t) given a prediction and standard normal ``noise``; the mean where t == 0."""
        out = self.p_mean_variance_from_prediction(pred, x, t)
        return out["mean"] + _nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_step(self, pred: Prediction, x: Tensor, t: Tensor, eta: float, noise: Tensor | None) -> Tensor:
        """
        One DDIM step x_t -> x_{t-1} (Song et al. eq. 12) given a prediction; eta=0 is deterministic, eta=1 has
        DDPM's variance (``noise`` is used only when eta > 0).
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        alpha_bar = self._coef("alphas_cumprod", t, x)
        alpha_bar_prev = self._coef("alphas_cumprod_prev", t, x)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        sample = (
            pred.denoised * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * pred.eps
        )
        if eta > 0:
            if noise is None:
                noise = torch.randn_like(x)
            sample = sample + _nonzero_mask(t, x) * sigma * noise
        return sample

    # --- sampling ---------------------------------------------------------------------------------------------

    def p_sample(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """
        One ancestral step x_t -> x_{t-1} of a network; no noise is added where t == 0.

        :param x: an [N x C x ...] Tensor x_t.
        :param t: a LongTensor [N] of respaced timesteps.
        :param noise: optional standard normal noise like x.
        :return: dict with "sample" (x_{t-1}) and "pred_xstart", each [N x C x ...].
        """
        pred = self.prediction(self.model_output(model, x, t, model_kwargs), x, t, clip_denoised, denoised_fn)
        if noise is None:
            noise = torch.randn_like(x)
        return {"sample": self.ancestral_step(pred, x, t, noise), "pred_xstart": pred.denoised}

    def ddim_sample(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        eta: float = 0.0,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """
        One DDIM step x_t -> x_{t-1} of a network (see :meth:`ddim_step`).

        :param x: an [N x C x ...] Tensor x_t.
        :param t: a LongTensor [N] of respaced timesteps.
        :param noise: optional standard normal noise like x (drawn only when eta > 0).
        :return: dict with "sample" (x_{t-1}) and "pred_xstart", each [N x C x ...].
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        pred = self.prediction(self.model_output(model, x, t, model_kwargs), x, t, clip_denoised, denoised_fn)
        return {"sample": self.ddim_step(pred, x, t, eta, noise), "pred_xstart": pred.denoised}

    def ddim_reverse_sample(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """
        One deterministic DDIM inversion step x_t -> x_{t+1} (encoding an image into the noise it decodes from).

        :param x: an [N x C x ...] Tensor x_t.
        :param t: a LongTensor [N] of respaced timesteps.
        :return: dict with "sample" (x_{t+1}) and "pred_xstart", each [N x C x ...].
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        alpha_bar_next = self._coef("alphas_cumprod_next", t, x)
        sample = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * out["eps"]
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # --- losses and the variational bound ---------------------------------------------------------------------

    def _vb_terms_bpd(
        self, output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The bound's term at t in bits/dim, [N]: KL to the true posterior, or the decoder NLL where t == 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance_from_output(output, x_t, t, clip_denoised, None)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(
            2.0
        )
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        ) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl), out

    def training_losses(
        self,
        model: Model,
        x_start: Tensor,
        t: Tensor,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """
        Per-example training losses at timesteps t.

        :param x_start: an [N x C x ...] Tensor of clean data in [-1, 1].
        :param t: a LongTensor [N] of respaced timesteps.
        :param noise: optional standard normal noise like x_start.
        :return: dict of [N] Tensors: "loss" always; "mse" for the MSE losses; "vb" where the MSE loss also
            learns the variance through the bound (hybrid loss, loss = mse + vb).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        output = self.model_output(model, x_t, t, model_kwargs)
        if self.loss_type in ("kl", "rescaled_kl"):
            vb, _ = self._vb_terms_bpd(output, x_start, x_t, t, clip_denoised=False)
            return {"loss": vb * self._vb_scale}
        mean_out, var_out = self._split_output(output, x_t)
        terms = {"mse": mean_flat((self._mse_target(x_start, noise, t) - mean_out) ** 2)}
        if self.loss_weighting == "min_snr":
            # t indexes this process's own table: a respaced process keeps the kept steps' alpha_bar.
            weight = min_snr_weights(
                self.alphas_cumprod, t, _MIN_SNR_TARGET[self.model_mean_type], self.min_snr_gamma
            )
            terms["mse"] = terms["mse"] * weight.to(terms["mse"].dtype)
        if var_out is not None:
            # The bound trains only the variance: the mean is detached so the MSE alone shapes it.
            frozen = torch.cat([mean_out.detach(), var_out], dim=1)
            vb, _ = self._vb_terms_bpd(frozen, x_start, x_t, t, clip_denoised=False)
            terms["vb"] = vb * self._vb_scale
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _mse_target(self, x_start: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.model_mean_type == "epsilon":
            return noise
        if self.model_mean_type == "x0":
            return x_start
        return self.v_from_xstart_eps(x_start, noise, t)

    def _prior_bpd(self, x_start: Tensor) -> Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, [N]: the bound's term that no network can change."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        mean = self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
        log_variance = self._coef("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        zeros = torch.zeros_like(x_start)
        return mean_flat(normal_kl(mean, log_variance, zeros, zeros)) / math.log(2.0)

    def calc_bpd_loop(
        self,
        model: Model,
        x_start: Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
        noises: Sequence[Tensor] | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """
        The full variational bound in bits/dim, evaluating every timestep from T-1 down to 0.

        :param x_start: an [N x C x ...] Tensor of data in [-1, 1].
        :param noises: optional noise per evaluated timestep, noises[i] for t = T-1-i (T entries).
        :return: dict with "total_bpd" and "prior_bpd" [N]; "vb", "xstart_mse" and "mse" (of the noise
            prediction) [N x T], column i for t = T-1-i.
        """
        if noises is not None and len(noises) < self.num_timesteps:
            raise ValueError(f"noises holds {len(noises)} entries; the bound needs {self.num_timesteps}")
        vb, xstart_mse, mse = [], [], []
        for i, index in enumerate(range(self.num_timesteps - 1, -1, -1)):
            t = torch.full((x_start.shape[0],), index, dtype=torch.long, device=x_start.device)
            if noises is not None:
                noise = noises[i].to(x_start.device)
            else:
                noise = _randn(tuple(x_start.shape), generator, x_start.device).to(x_start.dtype)
            x_t = self.q_sample(x_start, t, noise)
            with torch.no_grad():
                output = self.model_output(model, x_t, t, model_kwargs)
                bits, out = self._vb_terms_bpd(output, x_start, x_t, t, clip_denoised)
            vb.append(bits)
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            mse.append(mean_flat((out["eps"] - noise) ** 2))
        vb_table = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_table.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_table,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }


class ADMDenoiser(Denoiser):
    """The denoiser seam for a network trained on a :class:`GaussianDiffusion` (epsilon, x0 or v prediction).

    Continuous face, k-diffusion's ``DiscreteEpsDDPMDenoiser`` / ``OpenAIDenoiser`` / ``DiscreteVDDPMDenoiser``:
    the process's levels are sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t); for x = x0 + sigma * eps the network
    sees x / sqrt(sigma^2 + 1) (the process's own x_t) at the timestep of sigma -- the nearest trained one when
    ``quantize``, else t interpolated linearly in log sigma -- and its learned-variance channels are dropped.

    Discrete face: :meth:`predict` at the process's own (respaced) timesteps with the process's arithmetic, so
    that ADM's DDPM, DDIM and DPM-Solver++ keep their numbers; the variance channels come with the prediction.

    :param process: the process the network was trained with (its respacing sets the trained levels).
    :param net: the network (or a wrapper with its signature, such as classifier-free guidance).
    :param clip_denoised: clamp the x0 estimate to [-1, 1] (the reference's clip_denoised).
    :param quantize: the continuous face's sigma -> t: the nearest trained step (True) or interpolated.
    """

    def __init__(
        self, process: GaussianDiffusion, net: Model, clip_denoised: bool = False, quantize: bool = True
    ):
        self.process = process
        self.net = net
        self.clip_denoised = clip_denoised
        self.quantize = quantize
        # The trained levels sigma_t (float64, ascending in t) and the sigma <-> t maps: k-diffusion's
        # DiscreteSchedule, one copy shared with the continuous samplers' "model" schedule.
        self.schedule = DiscreteSchedule(process.alphas_cumprod, quantize=quantize)
        self.sigmas = self.schedule.sigmas
        self.log_sigmas = self.schedule.log_sigmas
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])

    # --- continuous face -------------------------------------------------------------------------------------

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The respaced timestep of each sigma [N] on sigma's device: the nearest trained one (int64) when
        ``quantize``, else fractional, interpolated linearly in log sigma."""
        return self.schedule.sigma_to_t(sigma, quantize=self.quantize)

    def get_sigmas(self, n: int | None = None) -> Tensor:
        """``n`` trained levels evenly spaced in the timesteps, from sigma_max down, then 0: [n + 1] (float64)."""
        return self.schedule.get_sigmas(n)

    def input_scale(self, sigma: Tensor) -> Tensor:
        return (sigma**2 + 1).rsqrt()

    def network_input(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        sigma = sigma_tensor(sigma, x)
        c_in = append_dims(self.input_scale(sigma).to(x.dtype), x.dim())
        t_dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
        return x * c_in, self._continuous_network_time(self.sigma_to_t(sigma), t_dtype)

    def _continuous_network_time(self, t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Network time values of (fractional) respaced timesteps: the original index map interpolated linearly;
        float32, or float64 for float64 sigmas (k-diffusion passes t in the sigmas' precision)."""
        table = self.process._table("timestep_map", t.device).to(torch.float64)
        low = t.to(torch.float64).floor().long().clamp(0, len(table) - 1)
        high = (low + 1).clamp(max=len(table) - 1)
        w = t.to(torch.float64) - low
        model_t = (1 - w) * table[low] + w * table[high]
        if self.process.rescale_timesteps:
            model_t = model_t * (1000.0 / self.process.original_num_steps)
        return model_t.to(dtype)

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args) -> Tensor:
        sigma = sigma_tensor(sigma, x)
        x_in, t_net = self.network_input(x, sigma)
        out = self.net(x_in, t_net, **extra_args)
        out, _ = self.process._split_output(out, x)
        s = append_dims(sigma.to(x.dtype), x.dim())
        if self.process.model_mean_type == "epsilon":
            denoised = x - s * out
        elif self.process.model_mean_type == "x0":
            denoised = out
        else:  # v = sqrt(ab) eps - sqrt(1 - ab) x0 in the process's scaling: x0 = c_skip x + c_out v
            denoised = x / (s**2 + 1) - out * s / (s**2 + 1).sqrt()
        return denoised.clamp(-1, 1) if self.clip_denoised else denoised

    # --- discrete face ---------------------------------------------------------------------------------------

    def predict(self, x: Tensor, t: Tensor, **extra_args) -> Prediction:
        out = self.process.model_output(self.net, x, t, extra_args)
        return self.process.prediction(out, x, t, self.clip_denoised)

    def respaced(self, timesteps: list[int]) -> ADMDenoiser:
        return ADMDenoiser(self.process.respace_to(timesteps), self.net, self.clip_denoised, self.quantize)

    def network_timesteps(self, t: Tensor) -> Tensor:
        return self.process.network_timesteps(t)

    def sigma_at(self, t: Tensor) -> Tensor:
        return self.sigmas.to(t.device)[t.long()]

    def shift_by_score(self, prediction: Prediction, x: Tensor, t: Tensor, grad: Tensor) -> Prediction:
        """Score correction (Song et al.): eps' = eps - sqrt(1 - alpha_bar_t) * grad, x_0 and eps re-derived from
        it. x_0' is not clipped again: clipping would undo part of the guidance."""
        process = self.process
        eps = process.eps_from_xstart(x, t, prediction.denoised)
        eps = eps - process._coef("sqrt_one_minus_alphas_cumprod", t, x) * grad.to(x.dtype)
        guided = process.xstart_from_eps(x, t, eps)
        return prediction.with_(denoised=guided, eps=process.eps_from_xstart(x, t, guided))


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def _nonzero_mask(t: Tensor, x: Tensor) -> Tensor:
    """[N x 1 x ...] mask, 0 where t == 0: the last reverse step returns the mean."""
    return (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    # Draw on the generator's own device so that a seed gives the same numbers wherever the sample lives.
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device).to(device)


def _is_respaced(timestep_respacing: object) -> bool:
    return not (
        timestep_respacing is None or (isinstance(timestep_respacing, str) and not timestep_respacing)
    )


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
