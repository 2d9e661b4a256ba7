"""``solver=auto``: each formulation's own recommended sampler, so a recipe samples every formulation sensibly.

- ADM's process (``diffusion=adm``, ``ddpm``, ``improved``): DPM-Solver++(2M) on its own timesteps, 20 steps;
- EDM and flow matching: Heun on the Karras schedule (rho 7) over the formulation's sigma range ([0.002, 80] by
  default), 18 steps (35 network evaluations): EDM's own sampler.

``solver.steps`` replaces the step count. Choosing a solver explicitly (``solver=dpmpp_2m``...) always wins.
"""

from __future__ import annotations

from diffusion.errors import ConfigError
from diffusion.sampling.k_solver import KSampler
from diffusion.sampling.solvers import DPMSolverPP

# The formulations' defaults: (the solver, its step count).
DEFAULTS = {
    "adm": (lambda steps: DPMSolverPP(steps), 20),
    "edm": (lambda steps: KSampler("heun", steps, schedule="karras"), 18),
    "flow": (lambda steps: KSampler("heun", steps, schedule="karras"), 18),
}


class AutoSolver:
    """A placeholder for the formulation's default solver (see the module docstring); :meth:`resolve` makes it.

    :param steps: the step count; None: the formulation's default.
    """

    def __init__(self, steps: int | None = None) -> None:
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ConfigError(f"solver.steps={steps!r}: must be an integer >= 1 (or null: the default)")
        self.steps = steps

    def resolve(self, formulation, max_steps: int | None = None):
        """The solver for ``formulation``; ``max_steps`` caps a discrete solver's steps (short test processes)."""
        if formulation.name not in DEFAULTS:
            raise ConfigError(
                f"solver=auto knows no default for diffusion={formulation.name}: choose one, e.g. solver=heun"
            )
        make, steps = DEFAULTS[formulation.name]
        steps = self.steps or steps
        if max_steps is not None and formulation.discrete:
            steps = min(steps, max_steps)
        return make(steps)

    def __repr__(self) -> str:
        return f"AutoSolver(steps={self.steps})"
