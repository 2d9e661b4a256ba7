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


class AutoGuidance(DenoiserWrapper):
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): the model is
    guided by a weaker version of itself -- an earlier checkpoint, or a smaller model trained on the same data --
    as ``D = D_guide + w (D_main - D_guide)``, computed as ``lerp(D_guide, D_main, w)`` so that w = 1 is the main
    model's estimate exactly (and the guide is then not called). Unconditional models are guided too.

    :param inner: the main model's denoiser; ``guide``: the guiding model's, on the same noise levels.
    """

    def __init__(self, inner: Denoiser, guide: Denoiser, weight: float) -> None:
        super().__init__(inner)
        self.guide = guide
        self.weight = float(weight)

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args) -> Tensor:
        main = self.inner(x, sigma, **extra_args)
        if self.weight == 1.0:
            return main
        return torch.lerp(self.guide(x, sigma, **extra_args), main, self.weight)

    def predict(self, x: Tensor, t: Tensor, **extra_args) -> Prediction:
        main = self.inner.predict(x, t, **extra_args)
        if self.weight == 1.0:
            return main
        weak = self.guide.predict(x, t, **extra_args)
        # Both estimates are linear in the output, so eps follows the same mix; the variance is the main model's.
        return main.with_(
            denoised=torch.lerp(weak.denoised, main.denoised, self.weight),
            eps=torch.lerp(weak.eps, main.eps, self.weight),
        )

    def respaced(self, timesteps: list[int]) -> Denoiser:
        return AutoGuidance(self.inner.respaced(timesteps), self.guide.respaced(timesteps), self.weight)


class GuidanceInterval(DenoiserWrapper):
    """Guidance only at noise levels in [sigma_lo, sigma_hi] (Kynkäänniemi et al. 2024, "Applying Guidance in a
    Limited Interval Improves Sample and Distribution Quality"): the guided denoiser inside the interval, the
    plain (conditional) one outside it. An interval that covers every level is the guided denoiser exactly.

    :param inner: the guided denoiser (classifier-free guidance or autoguidance).
    :param plain: the unguided denoiser of the same network.
    """

    def __init__(self, inner: Denoiser, plain: Denoiser, sigma_lo: float, sigma_hi: float) -> None:
        super().__init__(inner)
        self.plain = plain
        self.sigma_lo, self.sigma_hi = float(sigma_lo), float(sigma_hi)

    def _inside(self, sigma: Tensor) -> Tensor:
        return (sigma >= self.sigma_lo) & (sigma <= self.sigma_hi)

    def _either(self, inside: Tensor, guided: Callable[[], object], plain: Callable[[], object]):
        if bool(inside.all()):
            return guided()
        if not bool(inside.any()):
            return plain()
        return None  # some images of the batch inside, some outside: both are needed

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args) -> Tensor:
        sigma = sigma_tensor(sigma, x)
        inside = self._inside(sigma)
        one = self._either(
            inside, lambda: self.inner(x, sigma, **extra_args), lambda: self.plain(x, sigma, **extra_args)
        )
        if one is not None:
            return one
        mask = append_dims(inside, x.dim())
        return torch.where(mask, self.inner(x, sigma, **extra_args), self.plain(x, sigma, **extra_args))

    def predict(self, x: Tensor, t: Tensor, **extra_args) -> Prediction:
        inside = self._inside(self.inner.sigma_at(t).to(x.device))
        one = self._either(
            inside,
            lambda: self.inner.predict(x, t, **extra_args),
            lambda: self.plain.predict(x, t, **extra_args),
        )
        if one is not None:
            return one
        a, b = self.inner.predict(x, t, **extra_args), self.plain.predict(x, t, **extra_args)
        mask = append_dims(inside, x.dim())
        return a.with_(
            denoised=torch.where(mask, a.denoised, b.denoised), eps=torch.where(mask, a.eps, b.eps)
        )

    def respaced(self, timesteps: list[int]) -> Denoiser:
        return GuidanceInterval(
            self.inner.respaced(timesteps), self.plain.respaced(timesteps), self.sigma_lo, self.sigma_hi
        )


def guided(
    model: Callable[..., Tensor], scale: float, null_class: int, rescale: float = 0.0
) -> Callable[..., Tensor]:
    """Classifier-free guidance in one batched forward pass.

    Returns a function with the network's signature that runs the conditional and the null-label halves as one
    batch of 2N and combines them as ``uncond + scale * (cond - uncond)`` on the prediction channels;
    learned-variance channels are taken from the conditional half. The combination is affine (weights 1 - scale
    and scale), so mixing the raw outputs gives the same x0 and eps whether the network predicts epsilon, x0 or v.

    With ``rescale`` = phi > 0, CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", eq. 15-16): the guided output is scaled to the conditional one's standard deviation per image,
    ``rescaled = guided * std(cond) / std(guided)``, and mixed back, ``phi * rescaled + (1 - phi) * guided``
    (computed on the network's own prediction, as diffusers computes it on the noise prediction).

    :param scale: the guidance weight; 1 returns the conditional prediction, 0 the unconditional one.
    :param null_class: the label index the model was trained with for "no label".
    :param rescale: phi in [0, 1]; 0 is plain classifier-free guidance.
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
        if rescale:
            dims = tuple(range(1, mixed.dim()))
            ratio = cond[:, :c].std(dim=dims, keepdim=True) / mixed.std(dim=dims, keepdim=True)
            mixed = torch.lerp(mixed, mixed * ratio, rescale)
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


def check_guidance(
    model: torch.nn.Module,
    guidance_scale: float,
    guidance_style: str = "all",
    guidance_interval=None,
    guidance_rescale: float = 0.0,
    autoguidance: bool = False,
    sigma_range: tuple[float, float] | None = None,
) -> None:
    """ConfigError unless the guidance settings are usable with ``model`` (1 = off always is).

    :param autoguidance: ``guidance_scale`` weighs a guide model (any model, conditional or not) rather than
        the null label.
    :param sigma_range: the model's trained noise levels, (sigma_min, sigma_max), to check the interval against.
    """
    if guidance_scale < 0:
        raise ConfigError(f"guidance_scale={guidance_scale}: must be >= 0 (1 = off, 0 = unconditional)")
    if guidance_style not in GUIDANCE_STYLES:
        raise ConfigError(f"guidance_style={guidance_style!r}: use one of {list(GUIDANCE_STYLES)}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ConfigError(
            f"guidance_rescale={guidance_rescale}: must be in [0, 1] (0 = off; Lin et al. use 0.7)"
        )
    if guidance_interval is not None:
        check_interval(guidance_interval, sigma_range)
    if guidance_rescale and (autoguidance or guidance_style != "all"):
        raise ConfigError(
            "guidance_rescale applies to classifier-free guidance with guidance_style=all: drop "
            f"guidance_rescale={guidance_rescale} or the {'guide' if autoguidance else 'guidance_style'} setting"
        )
    if guidance_scale == 1.0 or autoguidance:
        return
    if not model.num_classes:
        raise ConfigError(
            f"guidance_scale={guidance_scale} needs a class-conditional model trained with "
            f"{model.label_dropout_key} > 0; this model is unconditional: use guidance_scale=1 (or guide it with a "
            "weaker model: guide=CHECKPOINT)"
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


def check_interval(interval, sigma_range: tuple[float, float] | None = None) -> tuple[float, float]:
    """``guidance_interval`` as (sigma_lo, sigma_hi), or a one-line ConfigError: two levels, increasing, that
    meet the model's trained range [sigma_min, sigma_max] when it is known."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ConfigError(
            f"guidance_interval={interval}: give two noise levels [sigma_lo, sigma_hi], e.g. [0.3, 5.0]"
        ) from None
    if not 0 <= lo < hi:
        raise ConfigError(f"guidance_interval=[{lo}, {hi}]: needs 0 <= sigma_lo < sigma_hi")
    if sigma_range is not None and (hi < sigma_range[0] or lo > sigma_range[1]):
        raise ConfigError(
            f"guidance_interval=[{lo}, {hi}] lies outside the model's noise levels [{sigma_range[0]:.4g}, "
            f"{sigma_range[1]:.4g}]: no step would be guided"
        )
    return lo, hi


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
    guidance_interval: tuple[float, float] | None = None,
    guidance_rescale: float = 0.0,
    guide: nn.Module | None = None,
    guide_formulation=None,
    quantize: bool | None = None,
) -> Denoiser:
    """The denoiser a sampler runs on, guidance composed in this one place:

    1. classifier-free guidance of the network (when ``guidance_scale`` != 1 and the images are ``conditional``),
       with CFG rescale ``guidance_rescale``; or, with a ``guide`` model, autoguidance of weight
       ``guidance_scale`` instead (:class:`AutoGuidance`);
    2. as the formulation's denoiser;
    3. the guidance only inside ``guidance_interval`` = (sigma_lo, sigma_hi) (:class:`GuidanceInterval`);
    4. classifier guidance (when ``cond_fn``).

    :param formulation: what the network was trained with; its ``denoiser(net, clip_denoised=...)`` is used.
    :param classifier_form: how the sampler applies classifier guidance (its solver's ``classifier_form``).
    :param guide_formulation: what the guide was trained with (default: ``formulation``).
    :param quantize: the continuous face's sigma -> timestep (a continuous solver's ``quantize``: the nearest
        trained step, or interpolated); None keeps the formulation's default.
    """
    options = {} if quantize is None else {"quantize": quantize}
    plain = formulation.denoiser(model, clip_denoised=clip_denoised, **options)
    check_guidance(
        model,
        guidance_scale,
        guidance_style,
        guidance_interval,
        guidance_rescale,
        autoguidance=guide is not None,
        sigma_range=(plain.sigma_min, plain.sigma_max),
    )
    if guide is not None:
        weak = (guide_formulation or formulation).denoiser(guide, clip_denoised=clip_denoised, **options)
        denoiser = AutoGuidance(plain, weak, guidance_scale)
    elif conditional and guidance_scale != 1.0:
        style = GUIDANCE_STYLES[guidance_style]
        extra = {"rescale": guidance_rescale} if guidance_rescale else {}
        net = style(model, guidance_scale, model.null_class, **extra)
        denoiser = formulation.denoiser(net, clip_denoised=clip_denoised, **options)
    else:
        denoiser = plain
    if guidance_interval is not None and denoiser is not plain:
        denoiser = GuidanceInterval(denoiser, plain, *guidance_interval)
    if cond_fn is not None:
        denoiser = ClassifierGuidance(denoiser, cond_fn, classifier_form)
    return denoiser
