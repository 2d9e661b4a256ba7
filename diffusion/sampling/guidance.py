"""Guidance: everything that changes what the network predicts on the way to a sampler, applied in one place.

- Classifier-free guidance (Ho & Salimans): :func:`guided` mixes the conditional and the null-label predictions of
  one batched forward pass, ``uncond + scale * (cond - uncond)``; :func:`dit_guided` is DiT's own
  ``forward_with_cfg`` (``guidance_style=dit``). Both wrap the network, so every formulation and sampler gets them.
- Classifier guidance ("Diffusion Models Beat GANs", section 4): with ``g = scale * grad_x log p(y | x_t)`` from a
  noisy-image classifier (:func:`classifier_cond_fn`), :class:`ClassifierGuidance` wraps the denoiser. In the
  score form (DDIM, DPM-Solver++, every continuous sampler) the noise prediction is corrected,
  ``eps' = eps - sqrt(1 - alpha_bar_t) * g``, i.e. ``D' = D + sigma^2 * grad_x log p``; in the mean form (DDPM's
  ancestral steps) the prediction carries g and the step moves its mean by ``variance * g``.

:func:`guided_denoiser` composes them for a network and the formulation it was trained with; ``generate`` calls it
and nothing else does. The classifier always sees what the diffusion network sees: its input scaling and its
ORIGINAL timesteps (a respaced process's indices would be the wrong ones, because the classifier was trained on
the original steps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.errors import ConfigError
from diffusion.process.denoiser import (
    CondFn,
    Denoiser,
    DenoiserWrapper,
    Prediction,
    append_dims,
    sigma_tensor,
)

CLASSIFIER_FORMS = ("score", "mean")


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


class ClassifierGuidance(DenoiserWrapper):
    """A denoiser steered by a classifier's gradient (see the module docstring).

    :param inner: the denoiser of the (possibly classifier-free guided) network.
    :param cond_fn: ``cond_fn(x, t)`` -> scale * d log p(y | x) / dx at the network's input and time values.
    :param form: "score" (correct the prediction) or "mean" (leave it, and hand the gradient to the ancestral
        step); the continuous face always corrects the score.
    """

    def __init__(self, inner: Denoiser, cond_fn: CondFn, form: str = "score") -> None:
        if form not in CLASSIFIER_FORMS:
            raise ValueError(f"form={form!r}: use one of {list(CLASSIFIER_FORMS)}")
        super().__init__(inner)
        self.cond_fn = cond_fn
        self.form = form

    def predict(self, x: Tensor, t: Tensor, **extra_args) -> Prediction:
        pred = self.inner.predict(x, t, **extra_args)
        grad = self.cond_fn(x, self.inner.network_timesteps(t))
        if self.form == "mean":
            return pred.with_(grad=grad)
        return self.inner.shift_by_score(pred, x, t, grad)

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args) -> Tensor:
        sigma = sigma_tensor(sigma, x)
        denoised = self.inner(x, sigma, **extra_args)
        x_in, t_net = self.inner.network_input(x, sigma)
        # d log p / dx through the network's input scaling x_in = c_in * x
        c_in = append_dims(self.inner.input_scale(sigma), x.dim())
        grad = self.cond_fn(x_in, t_net).to(x.dtype) * c_in.to(x.dtype)
        return denoised + append_dims(sigma.to(x.dtype) ** 2, x.dim()) * grad.to(x.dtype)


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


def check_guidance(model: torch.nn.Module, guidance_scale: float, guidance_style: str = "all") -> None:
    """ValueError unless ``guidance_scale`` (and ``guidance_style``) is usable with ``model`` (1 = off always
    is)."""
    if guidance_scale < 0:
        raise ConfigError(f"guidance_scale={guidance_scale}: must be >= 0 (1 = off, 0 = unconditional)")
    if guidance_style not in GUIDANCE_STYLES:
        raise ConfigError(f"guidance_style={guidance_style!r}: use one of {list(GUIDANCE_STYLES)}")
    if guidance_scale == 1.0:
        return
    if not model.num_classes:
        raise ConfigError(
            f"guidance_scale={guidance_scale} needs a class-conditional model trained with "
            f"{model.label_dropout_key} > 0; this model is unconditional: use guidance_scale=1"
        )
    if model.null_class is None:
        raise ConfigError(
            f"guidance_scale={guidance_scale} needs a model trained with classifier-free guidance "
            f"({model.label_dropout_key} > 0); this one has no null class: use guidance_scale=1"
        )
    if guidance_style != "all" and guidance_style not in model.guidance_styles:
        raise ConfigError(
            f"guidance_style=dit is DiT's forward_with_cfg, which {type(model).__name__} does not have: use "
            "guidance_style=all"
        )


def guided_denoiser(
    model: nn.Module,
    formulation,
    *,
    clip_denoised: bool = False,
    guidance_scale: float = 1.0,
    guidance_style: str = "all",
    conditional: bool = True,
    cond_fn: CondFn | None = None,
    classifier_form: str = "score",
    quantize: bool | None = None,
) -> Denoiser:
    """The denoiser a sampler runs on: the network with classifier-free guidance (when ``guidance_scale`` != 1 and
    the images are ``conditional``), as the formulation's denoiser, with classifier guidance (when ``cond_fn``).

    :param formulation: what the network was trained with; its ``denoiser(net, clip_denoised=...)`` is used.
    :param classifier_form: how the sampler applies classifier guidance (its solver's ``classifier_form``).
    :param quantize: the continuous face's sigma -> timestep (a continuous solver's ``quantize``: the nearest
        trained step, or interpolated); None keeps the formulation's default.
    """
    check_guidance(model, guidance_scale, guidance_style)
    net = model
    if conditional and guidance_scale != 1.0:
        net = GUIDANCE_STYLES[guidance_style](model, guidance_scale, model.null_class)
    options = {} if quantize is None else {"quantize": quantize}
    denoiser = formulation.denoiser(net, clip_denoised=clip_denoised, **options)
    if cond_fn is not None:
        denoiser = ClassifierGuidance(denoiser, cond_fn, classifier_form)
    return denoiser
