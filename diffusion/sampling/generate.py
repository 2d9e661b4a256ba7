"""``generate``: the images with given global indices, from noise to [-1, 1], reproducibly.

It is where sampling is put together, once for every caller (sample.py, the training grids, in-training
evaluation): per-image noise (noise.py), the denoiser of the network with its guidance (guidance.py), the solver.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from diffusion.process.denoiser import CondFn
from diffusion.sampling.guidance import guided_denoiser
from diffusion.sampling.noise import PerImageNoise


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    diffusion,
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
    guidance_interval: tuple[float, float] | None = None,
    guidance_rescale: float = 0.0,
    guide: torch.nn.Module | None = None,
    guide_formulation=None,
) -> Tensor:
    """Generate the images with the given global indices: a float [N x C x H x W] Tensor in [-1, 1].

    :param model: the network; its ``in_channels``, ``image_size`` and ``null_class`` attributes are read.
    :param diffusion: the formulation the model was trained with (its ``denoiser(net)`` is sampled).
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
    :param guidance_interval: (sigma_lo, sigma_hi): guide only at those noise levels; None: at every step.
    :param guidance_rescale: CFG rescale's phi (0: off).
    :param guide: autoguidance: a weaker model of the same data (``guidance_scale`` is then its weight, and the
        null label is not used); ``guide_formulation``: what it was trained with (default: ``diffusion``).
    """
    indices = list(indices)
    if classes is not None and len(classes) != len(indices):
        raise ValueError(f"classes has {len(classes)} labels for {len(indices)} images")
    if classes is not None and not model.num_classes:
        raise ValueError(
            "classes given for an unconditional model: steer it with a classifier's cond_fn instead"
        )
    denoiser = guided_denoiser(
        model,
        diffusion,
        clip_denoised=getattr(solver, "clip_denoised", False),
        guidance_scale=guidance_scale,
        guidance_style=guidance_style,
        conditional=classes is not None,
        cond_fn=cond_fn,
        classifier_form=getattr(solver, "classifier_form", "score"),
        guidance_interval=guidance_interval,
        guidance_rescale=guidance_rescale,
        guide=guide,
        guide_formulation=guide_formulation,
        quantize=getattr(solver, "quantize", None),
    )
    noise = PerImageNoise(seed, indices, (model.in_channels, model.image_size, model.image_size), device)
    x_T = noise.draw()
    extra_args = dict(model_kwargs or {})
    if classes is not None:
        extra_args["y"] = classes.to(device)
    with autocast if autocast is not None else contextlib.nullcontext():
        x = solver(denoiser, x_T, extra_args=extra_args, noise=noise, callback=callback)
    return x.float()
