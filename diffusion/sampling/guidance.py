"""Classifier guidance ("Diffusion Models Beat GANs", section 4): a noisy-image classifier steers sampling.

With ``g = scale * grad_x log p(y | x_t)`` from the classifier, a reverse step is conditioned in one of two ways:

- :func:`condition_mean` (ancestral / DDPM steps, Sohl-Dickstein et al.): the Gaussian's mean moves by
  ``variance * g``; the variance is unchanged.
- :func:`condition_score` (DDIM and DPM-Solver++, Song et al.): ``g`` corrects the score, i.e. the noise
  prediction, ``eps' = eps - sqrt(1 - alpha_bar_t) * g``, and x_0 and the mean follow from eps'. For a
  solver that steps with the denoised estimate (DPM-Solver++), :func:`condition_xstart` gives the corrected
  x_0 directly.

``GaussianDiffusion.p_sample`` and ``ddim_sample`` take a ``cond_fn`` and apply these, as the reference's do.

A ``cond_fn`` is called as ``cond_fn(x, t_model)`` and returns the [N x C x H x W] float32 gradient. ``t_model``
is what the diffusion network itself is given: the ORIGINAL timestep indices of a respaced process (rescaled to
[0, 1000) when the process rescales timesteps), because the classifier was trained on the original steps.
Every function here takes respaced ``t`` and does that mapping through ``GaussianDiffusion.model_output``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # the process calls these functions from its steps
    from diffusion.process.gaussian import GaussianDiffusion

CondFn = Callable[[Tensor, Tensor], Tensor]


def classifier_cond_fn(classifier: nn.Module, y: Tensor, scale: float = 1.0) -> CondFn:
    """
    The guidance gradient of a noisy-image classifier for fixed labels.

    The returned ``cond_fn(x, t)`` computes ``scale * d/dx sum_n log_softmax(classifier(x, t))[n, y_n]`` in
    float32 with autograd enabled, so it works inside ``torch.no_grad()`` sampling and under autocast (which it
    turns off for the classifier: a bfloat16 gradient of a log-probability is too coarse to steer with). Only
    the gradient with respect to x is computed; the classifier's parameters get no ``.grad``.

    :param classifier: called as ``classifier(x, t)`` -> [N x K] logits (e.g. an EncoderUNetModel in eval mode).
    :param y: an [N] long Tensor of the requested classes.
    :param scale: the classifier scale s (the reference's ``classifier_scale``).
    :return: cond_fn taking an [N x C x H x W] Tensor x and the [N] timesteps the network sees.
    """
    num_classes = getattr(classifier, "num_classes", None)
    if y.dim() != 1:
        raise ValueError(f"y must be an [N] Tensor of class labels, got shape {list(y.shape)}")
    if num_classes is not None and len(y) and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise ValueError(
            f"classes {sorted(set(y.tolist()))} are out of range for a classifier of {num_classes} classes "
            f"(0..{num_classes - 1})"
        )

    def cond_fn(x: Tensor, t: Tensor) -> Tensor:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"cond_fn got {x.shape[0]} images for {y.shape[0]} labels")
        with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            x_in = x.detach().float().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
            selected = log_probs.gather(1, y.to(x.device).view(-1, 1))
            (grad,) = torch.autograd.grad(selected.sum(), x_in)
        return grad * scale

    return cond_fn


def guidance_gradient(process: GaussianDiffusion, cond_fn: CondFn, x: Tensor, t: Tensor) -> Tensor:
    """
    ``cond_fn`` at respaced timesteps, given the timesteps the network sees (original indices).

    :param x: an [N x C x H x W] Tensor x_t.
    :param t: a LongTensor [N] of the process's (respaced) timesteps.
    :return: the [N x C x H x W] gradient.
    """
    return process.model_output(cond_fn, x, t)


def condition_mean(
    process: GaussianDiffusion, out: dict[str, Tensor], x: Tensor, t: Tensor, cond_fn: CondFn
) -> dict[str, Tensor]:
    """
    Guidance for an ancestral step: mean' = mean + variance * g (variance = exp(log_variance)).

    :param out: the dict of ``process.p_mean_variance`` at (x, t).
    :param x: an [N x C x H x W] Tensor x_t.
    :param t: a LongTensor [N] of respaced timesteps.
    :return: a copy of ``out`` with the guided float32 "mean"; pred_xstart, eps and the variance are unchanged.
    """
    g = guidance_gradient(process, cond_fn, x, t)
    return {**out, "mean": out["mean"].float() + out["variance"].float() * g.float()}


def condition_xstart(
    process: GaussianDiffusion, pred_xstart: Tensor, x: Tensor, t: Tensor, cond_fn: CondFn
) -> tuple[Tensor, Tensor]:
    """
    The score correction as a corrected denoised estimate (what a data-prediction solver steps with).

    eps = the noise that takes ``pred_xstart`` to x_t, eps' = eps - sqrt(1 - alpha_bar_t) * g and
    x_0' = (x_t - sqrt(1 - alpha_bar_t) * eps') / sqrt(alpha_bar_t), i.e. x_0' = x_0 + (1 - alpha_bar_t) /
    sqrt(alpha_bar_t) * g. x_0' is NOT clipped again: clipping would undo part of the guidance.

    :param pred_xstart: an [N x C x H x W] Tensor, the step's x_0 estimate after its own processing (clipping).
    :param x: an [N x C x H x W] Tensor x_t.
    :param t: a LongTensor [N] of the process's (respaced) timesteps.
    :return: (pred_xstart', eps'), each [N x C x H x W]; eps' is re-derived from pred_xstart'.
    """
    g = guidance_gradient(process, cond_fn, x, t)
    eps = process._eps_from_xstart(x, t, pred_xstart)
    eps = eps - process._coef("sqrt_one_minus_alphas_cumprod", t, x) * g.to(x.dtype)
    guided = process._xstart_from_eps(x, t, eps)
    return guided, process._eps_from_xstart(x, t, guided)


def condition_score(
    process: GaussianDiffusion, out: dict[str, Tensor], x: Tensor, t: Tensor, cond_fn: CondFn
) -> dict[str, Tensor]:
    """
    Guidance through the score: the p_mean_variance output the classifier-corrected noise prediction gives.

    :param out: the dict of ``process.p_mean_variance`` at (x, t), its pred_xstart already clipped if asked.
    :param x: an [N x C x H x W] Tensor x_t.
    :param t: a LongTensor [N] of respaced timesteps.
    :return: a copy of ``out`` with pred_xstart' and eps' (see :func:`condition_xstart`) and "mean" the
        posterior mean of q(x_{t-1} | x_t, pred_xstart'); the variance is unchanged.
    """
    pred_xstart, eps = condition_xstart(process, out["pred_xstart"], x, t, cond_fn)
    mean, _, _ = process.q_posterior_mean_variance(pred_xstart, x, t)
    return {**out, "mean": mean, "pred_xstart": pred_xstart, "eps": eps}
