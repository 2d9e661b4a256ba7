"""``solver=flow_sde``: SiT's SDE sampler for flow-matching models (``diffusion=flow``/``sit``).

Euler–Maruyama from noise (t = 0) to data (t = 1) with SiT's diffusion coefficient w_t = ``diffusion_norm`` *
sigma_t, then one deterministic last step (diffusion/process/flow.py ``sample_flow_sde``, checked against SiT's own
numbers). It needs the network's velocity and score at t = 0, where the denoiser seam's sigma is infinite, so it
calls the network (with classifier-free guidance, which wraps the network) through the formulation directly;
guidance that wraps the denoiser (classifier guidance, autoguidance, the guidance interval) is refused in one line.
The Brownian increments are the per-image noise: an image does not depend on the batch size or the ranks.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from diffusion.errors import ConfigError, check_choice
from diffusion.process.flow import LAST_STEPS, sample_flow_sde


class FlowSDE:
    """SiT's SDE sampler as a solver (same call signature as the others).

    :param steps: grid points of the Euler–Maruyama integration (SiT's ``num_sampling_steps``; 250 in SiT).
    :param diffusion_norm: SiT's ``diffusion_norm``, the scale of w_t = norm * sigma_t.
    :param last_step: SiT's ``last_step``: "mean", "tweedie", "euler" or "none".
    :param last_step_size: SiT's ``last_step_size``.
    """

    name = "flow_sde"
    classifier_form = "score"
    clip_denoised = False

    def __init__(
        self,
        steps: int = 250,
        diffusion_norm: float = 1.0,
        last_step: str = "mean",
        last_step_size: float = 0.04,
    ) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ConfigError(f"solver.steps={steps!r}: must be an integer >= 2")
        if not diffusion_norm >= 0:
            raise ConfigError(f"solver.diffusion_norm={diffusion_norm}: must be >= 0")
        check_choice("solver.last_step", last_step, LAST_STEPS)
        if not 0 <= last_step_size < 1:
            raise ConfigError(f"solver.last_step_size={last_step_size}: must be in [0, 1)")
        self.steps, self.diffusion_norm = steps, float(diffusion_norm)
        self.last_step, self.last_step_size = last_step, float(last_step_size)

    @property
    def network_evaluations(self) -> int:
        """steps - 1 stochastic steps and, unless last_step=none, the last one."""
        return self.steps - 1 + (self.last_step != "none")

    def describe(self) -> dict:
        options = {"steps": self.steps, "diffusion_norm": self.diffusion_norm, "last_step": self.last_step,
                   "last_step_size": self.last_step_size}  # fmt: skip
        return {"solver": self.name, "options": options, "network_evaluations": self.network_evaluations}

    def check(self, formulation) -> None:
        """ConfigError now unless the model is a flow-matching one."""
        if getattr(formulation, "name", None) != "flow":
            raise ConfigError(
                f"solver=flow_sde is SiT's sampler for flow-matching models; this model was trained with "
                f"diffusion={getattr(formulation, 'name', '?')}: use solver=auto or another sampler"
            )

    def __call__(
        self,
        denoiser,
        x_T: Tensor,
        extra_args: dict | None = None,
        noise=None,
        progress: bool = False,
        callback: Callable | None = None,
    ) -> Tensor:
        """
        :param denoiser: the flow model's denoiser (``formulation.denoiser(net)``); ``x_T`` standard normal noise,
            the state at t = 0; ``noise``: the per-image noise (``noise.draw()``).
        """
        formulation = getattr(denoiser, "formulation", None)
        self.check(formulation)
        if not hasattr(denoiser, "net") or getattr(denoiser, "inner", None) is not None:
            raise ConfigError(
                "solver=flow_sde steps the network itself: classifier guidance, autoguidance and the guidance "
                "interval wrap the denoiser, so use another sampler with them (classifier-free guidance works)"
            )
        if noise is None:
            raise ConfigError(
                "solver=flow_sde draws fresh noise: give it the per-image noise (generate does)"
            )
        return sample_flow_sde(
            formulation,
            denoiser.net,
            x_T,
            steps=self.steps,
            diffusion_norm=self.diffusion_norm,
            last_step=self.last_step,
            last_step_size=self.last_step_size,
            model_kwargs=extra_args,
            noise=noise.draw,
        )

    def __repr__(self) -> str:
        return (
            f"FlowSDE(steps={self.steps}, diffusion_norm={self.diffusion_norm}, last_step={self.last_step!r})"
        )
