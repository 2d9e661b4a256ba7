"""Post-hoc EMA: track power-function EMAs while training, then rebuild any EMA length afterwards.

This follows Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2),
Section 3 and Appendix C. A power-function EMA at training time ``t`` averages the weights seen at times
``tau <= t`` with density proportional to ``tau**gamma``; its width relative to ``t`` is ``sigma_rel``
(``std`` below). During training a few such EMAs (e.g. ``std`` 0.05 and 0.10) are tracked and snapshotted
every few hundred steps; afterwards the EMA for any other ``std`` is approximated by the least-squares
combination of the snapshots' averaging profiles (the "response functions"), and the same combination of their
weights.

Units. The platform counts time in optimizer steps: ``t`` is the number of optimizer steps taken so far, and
the EMA update after step ``t`` (1-based: the first update is at ``t = 1``) uses
``beta_t = (1 - 1/t) ** (gamma + 1)``. EDM2 counts images: its update after a batch of ``B`` images runs with
``cur_nimg = t * B`` and ``batch_size = B``, which gives ``(1 - B/(t*B)) ** (gamma + 1)``, the same number
(``B/(t*B)`` and ``1/t`` are the same real number, so IEEE division rounds them identically). Snapshot times
(``ofs``) map the same way, ``nimg = step * B``, and the solved coefficients do not depend on that scale.

Snapshots live in ``RUN_DIR/phema/snapshot-{step:08d}.pt``; each holds the step, the tracked stds and the EMA
weights in the dtype the model trains in, nothing else.
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import brentq

from diffusion.engine.checkpoint import atomic_save

SNAPSHOT_DIR = "phema"
SNAPSHOT_FORMAT = 1
_SNAPSHOT_FILE = re.compile(r"^snapshot-(\d{8})\.pt$")

# sigma_rel of gamma = 0 (plain running average, uniform on [0, t]): 1/sqrt(12). Exponents gamma >= 0
# cover exactly (0, MAX_STD); EDM2 uses the same range (-1 < gamma < 0 would favour the earliest weights).
MAX_STD = 1.0 / math.sqrt(12.0)

# Largest relative L2 error of the reconstructed averaging profile against the requested one that
# reconstruct() accepts. Measured on the synthetic run of tests/test_phema.py (noisy random walk, 2000 steps,
# stds 0.05 and 0.10 snapshotted every 100 steps), error of the reconstructed weights against a directly
# tracked EMA, as a fraction of the distance between the 0.05 and 0.10 EMAs: std 0.03: profile 2.6%, weights
# 0.8%; 0.07: 0.25%, 0.05%; 0.20: 1.6%, 1.1%; but 0.02: 8.7%, 3.3% and 0.25: 6.0%, 7.9% (1.2% of the weights'
# norm). 5% keeps the first group and refuses the second; the criterion follows the snapshot grid, so it needs
# no per-run tuning.
MAX_PROFILE_ERROR = 0.05


# ----------------------------------------------------------------------------------------------------------
# The math (float64 numpy; arrays broadcast).


def exp_to_std(exp) -> np.ndarray:
    """sigma_rel of the power-function profile with exponent ``gamma`` (EDM2 Eq. 123); float64, same shape."""
    g = np.asarray(exp, dtype=np.float64)
    # Variance of the density (g+1) x**g on [0, 1] is (g+1)/((g+2)**2 (g+3)).
    return np.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def _one_std_to_exp(std: float) -> float:
    """The gamma >= 0 with (g+2)**2 (g+3) = (g+1)/std**2: g**3 + 7g**2 + (16-s)g + (12-s) = 0, s = std**-2."""
    s = std**-2.0
    cubic = lambda g: ((g + 7.0) * g + (16.0 - s)) * g + (12.0 - s)  # noqa: E731 - Horner form of the cubic
    # The cubic is negative at 0 (s > 12) and positive at s (every term then >= 0), with one root between:
    # on g >= 0 sigma_rel decreases monotonically from MAX_STD, so the root is unique.
    g = brentq(cubic, 0.0, s, xtol=1e-300, rtol=4 * np.finfo(np.float64).eps, maxiter=500)
    # One Newton step to land on the float nearest the root (brentq's tolerance is a few ulp).
    d = (3.0 * g + 14.0) * g + (16.0 - s)
    return float(g - cubic(g) / d) if d != 0.0 else float(g)


def std_to_exp(std) -> np.ndarray:
    """Exponent ``gamma`` of the power-function profile with relative width ``std`` (EDM2 Eq. 126); float64.

    ``std`` must lie in (0, MAX_STD) = (0, 1/sqrt(12)); anything else raises ValueError.
    """
    s = np.asarray(std, dtype=np.float64)
    if not np.all((s > 0) & (s < MAX_STD)):
        raise ValueError(
            f"ema std {std} outside (0, {MAX_STD:.4f}); pick a relative EMA width like 0.05-0.15"
        )
    return np.vectorize(_one_std_to_exp, otypes=[np.float64])(s)


def power_function_beta(std, t_next, t_delta=1) -> np.ndarray:
    """EMA decay for the update that brings the EMA from time ``t_next - t_delta`` to ``t_next`` (EDM2 Eq.
    127).

    ``beta = (1 - t_delta/t_next) ** (gamma + 1)``; the EMA becomes ``beta * ema + (1 - beta) * weights``.
    Times in optimizer steps on the platform (``t_delta = 1`` per step); EDM2 passes images (``t_next =
    cur_nimg``, ``t_delta = batch_size``) and gets the same value.
    """
    t_next = np.asarray(t_next, dtype=np.float64)
    return (1.0 - np.asarray(t_delta, dtype=np.float64) / t_next) ** (std_to_exp(std) + 1.0)


def power_function_correlation(a_ofs, a_std, b_ofs, b_std) -> np.ndarray:
    """Inner product of two power-function profiles (EDM2 Eq. 151), float64, broadcast over the inputs.

    Profile ``f(tau) = (g+1) tau**g / T**(g+1)`` on ``[0, T]`` with ``T = ofs``; the integral of ``f_a f_b``
    is ``(ga+1)(gb+1) / (ga+gb+1) * (T_min/T_max)**g_max / T_max`` where ``g_max`` is the exponent of the
    profile that ends later (it is the one whose normalisation the shorter interval does not cancel). Units of
    1/time.
    """
    a_ofs, b_ofs = np.asarray(a_ofs, dtype=np.float64), np.asarray(b_ofs, dtype=np.float64)
    ga, gb = std_to_exp(a_std), std_to_exp(b_std)
    t_max = np.maximum(a_ofs, b_ofs)
    g_late = np.where(a_ofs < b_ofs, gb, ga)
    return (ga + 1.0) * (gb + 1.0) / (ga + gb + 1.0) * (np.minimum(a_ofs, b_ofs) / t_max) ** g_late / t_max


def _column(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1, 1)


def _row(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(1, -1)


def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std) -> np.ndarray:
    """Weights ``[n_in, n_out]`` combining the input profiles into each output profile by least squares.

    ``in_ofs``/``in_std``: time (steps) and sigma_rel of each snapshot EMA, broadcast to ``[n_in]``;
    ``out_ofs``/``out_std``: the same for the wanted EMAs, ``[n_out]``. Normal equations ``A x = b`` with
    ``A = <f_i, f_j>`` and ``b = <f_i, g>`` (EDM2 Algorithm 3), then each column rescaled to sum to 1 so that
    the reconstruction is an average (a constant weight trajectory reconstructs exactly). float64.
    """
    in_ofs, in_std = np.broadcast_arrays(np.asarray(in_ofs, np.float64), np.asarray(in_std, np.float64))
    out_ofs, out_std = np.broadcast_arrays(np.asarray(out_ofs, np.float64), np.asarray(out_std, np.float64))
    gram = power_function_correlation(_column(in_ofs), _column(in_std), _row(in_ofs), _row(in_std))
    rhs = power_function_correlation(_column(in_ofs), _column(in_std), _row(out_ofs), _row(out_std))
    coefs = np.linalg.solve(gram, rhs)
    return coefs / coefs.sum(axis=0, keepdims=True)


def profile_error(in_ofs, in_std, out_ofs, out_std, coefs) -> np.ndarray:
    """Relative L2 error ``||sum_i x_i f_i - g|| / ||g||`` of each reconstructed profile, ``[n_out]``.

    ``||h - g||**2 = x'Ax - 2x'b + <g, g>`` with the same inner products as the solve, so it costs nothing.
    This is how far the averaging the reconstruction applies is from the one that was asked for.
    """
    in_ofs, in_std = (a.ravel() for a in np.broadcast_arrays(np.float64(in_ofs), np.float64(in_std)))
    out_ofs, out_std = (a.ravel() for a in np.broadcast_arrays(np.float64(out_ofs), np.float64(out_std)))
    gram = power_function_correlation(_column(in_ofs), _column(in_std), _row(in_ofs), _row(in_std))
    rhs = power_function_correlation(_column(in_ofs), _column(in_std), _row(out_ofs), _row(out_std))
    self_ = power_function_correlation(out_ofs, out_std, out_ofs, out_std)
    x = np.asarray(coefs, dtype=np.float64).reshape(len(in_ofs), len(out_ofs))
    sq = np.einsum("io,ij,jo->o", x, gram, x) - 2.0 * np.einsum("io,io->o", x, rhs) + self_
    return np.sqrt(np.maximum(sq, 0.0) / self_)


# ----------------------------------------------------------------------------------------------------------
# Tracking during training.


class PowerFunctionEMA:
    """One frozen copy of the model per tracked sigma_rel, updated with power-function betas.

    Call ``update(model, step)`` after each optimizer step with ``step`` = optimizer steps taken so far
    including this one (the platform's ``state.step + 1`` where ``update_ema`` is called). The first update
    (from step 0) copies the model, since beta is 0 there. Updating every k steps is allowed: the beta then
    covers the k steps (``t_delta = k``), exactly as EDM2 covers a batch of images.
    """

    def __init__(self, model: torch.nn.Module, stds=(0.05, 0.10)) -> None:
        self.stds = tuple(float(s) for s in stds)
        if len(set(self.stds)) != len(self.stds) or not self.stds:
            raise ValueError(f"stds {stds} must be distinct and non-empty; e.g. stds=(0.05, 0.10)")
        std_to_exp(self.stds)  # validates the range
        self.step = 0  # optimizer steps the EMAs have seen
        self.emas = [copy.deepcopy(model).requires_grad_(False).eval() for _ in self.stds]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold ``model``'s parameters in as of ``step`` (int >= 1, above the last one); buffers copied."""
        if step <= self.step:
            raise ValueError(
                f"phema update at step {step} after step {self.step}; pass the steps taken so far (1-based)"
            )
        params = [p.detach() for p in model.parameters()]
        buffers = [b.detach() for b in model.buffers()]
        for std, ema in zip(self.stds, self.emas):
            beta = float(power_function_beta(std, step, step - self.step))
            torch._foreach_lerp_(list(ema.parameters()), params, 1.0 - beta)
            if buffers:
                torch._foreach_copy_(list(ema.buffers()), buffers)
        self.step = int(step)

    def state_dict(self) -> dict:
        """Everything to resume bit-exactly: step, stds and each EMA's state (tensors by reference)."""
        return {"step": self.step, "stds": list(self.stds), "emas": [ema.state_dict() for ema in self.emas]}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``; the stds must be the ones this tracker was built with."""
        if tuple(float(s) for s in state["stds"]) != self.stds:
            raise ValueError(
                f"phema state tracks stds {state['stds']}, this run {list(self.stds)}; "
                "keep the stds on resume"
            )
        for ema, s in zip(self.emas, state["emas"]):
            ema.load_state_dict(s)
        self.step = int(state["step"])

    def snapshot(self) -> dict:
        """What a snapshot file stores: step, stds, parameter names and each EMA's weights on the CPU.

        Weights keep the dtype the model trains in (bf16 models give bf16 snapshots); no optimizer state.
        """
        names = [n for n, _ in self.emas[0].named_parameters()]
        emas = [
            {k: v.detach().to("cpu", copy=True) for k, v in ema.state_dict().items()} for ema in self.emas
        ]
        return {
            "format": SNAPSHOT_FORMAT,
            "step": self.step,
            "stds": list(self.stds),
            "params": names,
            "emas": emas,
        }


# ----------------------------------------------------------------------------------------------------------
# Snapshot files.


def _is_writer() -> bool:
    """Only rank 0 writes under DDP; every rank holds the same EMA weights."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_snapshot(run_dir: str | os.PathLike, step: int, ema: PowerFunctionEMA) -> Path | None:
    """Write ``run_dir/phema/snapshot-{step:08d}.pt`` atomically; returns the path, or None on ranks other
    than 0.

    ``step`` must be the step the EMA has been updated to (its ``ema.step``): the snapshot's time is what the
    reconstruction solves with, so a mismatch would silently give the wrong average.
    """
    if step != ema.step:
        raise ValueError(
            f"snapshot at step {step} but the EMA is at step {ema.step}; save right after update()"
        )
    if step < 1:
        raise ValueError(f"snapshot at step {step}; snapshots start after the first update (step >= 1)")
    if not _is_writer():
        return None
    out_dir = Path(run_dir) / SNAPSHOT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"snapshot-{step:08d}.pt"
    atomic_save(ema.snapshot(), path)
    return path


def list_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the complete snapshot files in ``run_dir/phema``, by step; temp files skipped."""
    d = Path(run_dir) / SNAPSHOT_DIR
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _SNAPSHOT_FILE.match(p.name)) and p.is_file()]
    return sorted(found)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def reconstruct(run_dir: str | os.PathLike, ema_std: float, step: int | None = None) -> tuple[dict, dict]:
    """The EMA weights with sigma_rel ``ema_std`` at the last snapshot at or before ``step`` (default: the
    last).

    Returns ``(state_dict, info)``: parameters are the coefficient-weighted sum of every (snapshot, std) EMA
    up to that step, accumulated in float32 (float64 for float64 models) and cast back to the training dtype;
    buffers come from the last snapshot. ``info`` holds plain values: ``ema_std``, ``step``,
    ``snapshot_steps``, ``stds``, ``coefficients`` (per snapshot, per std) and ``profile_error``.
    Raises ValueError when there are no snapshots, none at or before ``step``, or ``ema_std`` cannot be
    represented: outside (0, 1/sqrt(12)) or a reconstructed profile more than MAX_PROFILE_ERROR off.
    """
    snaps = [(s, p) for s, p in list_snapshots(run_dir)]
    if not snaps:
        raise ValueError(
            f"no post-hoc EMA snapshots in {Path(run_dir) / SNAPSHOT_DIR}; pass a run dir trained with phema"
        )
    if step is not None:
        snaps = [(s, p) for s, p in snaps if s <= step]
        if not snaps:
            raise ValueError(
                f"no phema snapshot at or before step {step}; "
                f"the first is at step {list_snapshots(run_dir)[0][0]}"
            )
    ema_std = float(ema_std)
    std_to_exp(ema_std)  # range check with its own message

    heads = []
    for s, p in snaps:  # first pass: times and stds only (mmap keeps this cheap)
        d = _load(p)
        if d.get("format") != SNAPSHOT_FORMAT or d.get("step") != s:
            raise ValueError(f"{p} is not a phema snapshot of step {s} (format {d.get('format')}); remove it")
        heads.append((s, tuple(d["stds"]), list(d["params"])))
        del d
    if any(h[2] != heads[0][2] for h in heads):
        raise ValueError(
            f"phema snapshots in {Path(run_dir) / SNAPSHOT_DIR} come from different models; keep one run's"
        )
    in_ofs = [s for s, stds, _ in heads for _ in stds]
    in_std = [x for _, stds, _ in heads for x in stds]
    out_step = snaps[-1][0]
    coefs = solve_posthoc_coefficients(in_ofs, in_std, out_step, ema_std)[:, 0]
    err = float(profile_error(in_ofs, in_std, out_step, ema_std, coefs)[0])
    if not np.isfinite(err) or err > MAX_PROFILE_ERROR:
        raise ValueError(
            f"ema_std={ema_std} is not representable by the snapshots (stds {sorted(set(in_std))}, "
            f"profile error {err:.1%} > {MAX_PROFILE_ERROR:.0%}); pick ema_std within the tracked stds "
            "or track a wider range"
        )

    params = set(heads[0][2])
    acc: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    k = 0
    for i, (_, p) in enumerate(snaps):  # second pass: accumulate one snapshot at a time
        d = _load(p)
        for ema_sd in d["emas"]:
            c = float(coefs[k])
            k += 1
            for name, t in ema_sd.items():
                if name not in params:
                    continue
                if name not in acc:
                    dtypes[name] = t.dtype
                    acc[name] = torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32))
                acc[name].add_(t.to(acc[name].dtype), alpha=c)
        if i == len(snaps) - 1:
            last = d["emas"][0]
            state = {n: (acc[n].to(dtypes[n]) if n in params else t.clone()) for n, t in last.items()}
        del d
    info = {
        "ema_std": ema_std,
        "step": out_step,
        "snapshot_steps": [s for s, _ in snaps],
        "stds": list(heads[-1][1]),
        "coefficients": [float(c) for c in coefs],
        "profile_error": err,
        "coef_l1": float(np.abs(coefs).sum()),  # noise amplification of the snapshots' rounding (1 = none)
    }
    return state, info


# ----------------------------------------------------------------------------------------------------------
# Command line: python -m diffusion.phema RUN_DIR ema_std=0.07 [step=N] [out=PATH]. It writes a checkpoint
# that sample.py takes; to sweep ema_std without writing files, sample.py reconstructs on the fly:
# python sample.py -m checkpoint=RUN_DIR ema_std=0.05,0.07,0.10


CHECKPOINT_KEY = "posthoc_ema"  # where a reconstructed checkpoint records how it was made


def posthoc_checkpoint(source: str | os.PathLike, ema_std: float, step: int | None = None) -> dict:
    """A project checkpoint whose weights are the post-hoc EMA of sigma_rel ``ema_std``.

    ``source``: a run directory (the EMA at its last snapshot, or at ``step``) or one of its checkpoint files
    (``RUN/checkpoints/step_*.pt`` or ``latest.pt``: the EMA at that checkpoint's step unless ``step`` is given).
    The run's config, model_config and class_names come from that checkpoint; the reconstructed weights are
    ``model`` with no constant-rate EMAs beside them, so ``model_weights(obj, use_ema=True)`` returns them and
    ``sample.py`` / ``nll`` read the file like any other. ``obj["posthoc_ema"]`` holds ``reconstruct``'s info
    (sigma_rel, step, snapshot steps, coefficients, profile error). Raises CheckpointError (one line) for a
    source that is not a run or has no snapshots, and for an ema_std or step the snapshots cannot give.
    """
    from diffusion.engine import checkpoint as ckpt

    source = Path(source)
    if source.is_dir():
        run_dir, base_path = source, source / "checkpoints" / ckpt.LATEST
        if not base_path.exists():
            raise ckpt.CheckpointError(
                f"{source} has no checkpoints/{ckpt.LATEST}: pass the directory of a training run "
                "(hydra.run.dir) or one of its checkpoint files"
            )
    else:
        # RUN/checkpoints/latest.pt is a link to RUN/checkpoints/step_*.pt: the run is two levels up.
        run_dir, base_path = source.resolve().parent.parent, source
    base = ckpt.load_checkpoint(base_path)
    if step is None and not source.is_dir():
        step = int(base["step"])
    try:
        state, info = reconstruct(run_dir, ema_std, step)
    except ValueError as e:
        raise ckpt.CheckpointError(f"ema_std={ema_std} from {run_dir}: {e}") from None
    if set(state) != set(base["model"]):
        raise ckpt.CheckpointError(
            f"the snapshots in {run_dir / SNAPSHOT_DIR} do not fit the network of {base_path}: "
            f"{ckpt.describe_mismatch_keys(base['model'], state)}; keep one run's snapshots in its directory"
        )
    return {
        "format_version": base["format_version"],
        "step": info["step"],
        "model": state,
        "ema": {},
        "config": base["config"],
        "model_config": base["model_config"],
        "class_names": base.get("class_names", []),
        CHECKPOINT_KEY: info,
    }


def write_reconstruction(path: str | os.PathLike, obj: dict) -> None:
    """Write a checkpoint of :func:`posthoc_checkpoint` atomically."""
    atomic_save(obj, path)


USAGE = (
    "usage: python -m diffusion.phema RUN_DIR ema_std=0.07 [step=N] [out=PATH] "
    "(RUN_DIR: a run directory or one of its checkpoint files)"
)


def main(argv: list[str] | None = None) -> int:
    """Reconstruct one EMA from a run's snapshots and write it; 0 on success, 2 with a one-line error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv or "=" in argv[0]:
            raise ValueError(f"the run directory comes first; {USAGE}")
        run_dir, opts = argv[0], {}
        for a in argv[1:]:
            key, sep, val = a.partition("=")
            if not sep or key not in ("ema_std", "step", "out"):
                raise ValueError(f"unknown argument {a!r}; {USAGE}")
            opts[key] = val
        if "ema_std" not in opts:
            raise ValueError(f"ema_std is required; {USAGE}")
        try:
            ema_std = float(opts["ema_std"])
            step = int(opts["step"]) if "step" in opts else None
        except ValueError as e:
            raise ValueError(f"ema_std must be a number and step an integer ({e}); {USAGE}") from None
        obj = posthoc_checkpoint(run_dir, ema_std, step)
        info = obj[CHECKPOINT_KEY]
        out = opts.get("out") or str(
            Path(run_dir) / SNAPSHOT_DIR / f"phema-{info['step']:08d}-{ema_std:.3f}.pt"
        )
        write_reconstruction(out, obj)
    except ValueError as e:  # UserError (CheckpointError) included
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {out}: ema_std={ema_std} at step {info['step']} from "
        f"{len(info['snapshot_steps'])} snapshots, profile error {info['profile_error']:.2%}"
    )
    return 0
