"""What every network offers: the one interface the engine, the tasks and the samplers may read.

A network class subclasses :class:`Network` next to ``nn.Module`` and sets the attributes in its constructor; code
outside ``models/`` reads nothing else of it (no ``hasattr`` probing, no ``isinstance`` against a family), so a
new backbone is one class that fills these in.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Network(Protocol):
    """The attributes and methods every network declares.

    ``role`` says what the network does for the platform: "denoiser" (trained by a diffusion formulation and
    sampled), "upsampler" (a denoiser that also takes ``low_res``, the image it refines) or "classifier" (a
    noisy-image classifier, ``net(x, t) -> [N x K]`` logits, for classifier guidance).
    """

    role: ClassVar[str]
    # Classifier-free guidance styles the network supports beyond the generic "all": DiT's "dit"
    # (forward_with_cfg, which guides only its first three channels, as DiT's published numbers were made).
    guidance_styles: ClassVar[tuple[str, ...]]
    # The config key of the label dropout that trains the null class, for messages that tell how to get one.
    label_dropout_key: ClassVar[str]

    image_size: int  # the side of the (square) input, in pixels or latent cells
    in_channels: int
    out_channels: int  # in_channels, or twice that with learned-variance channels (classifiers: the classes)
    num_classes: int | None  # None: unconditional
    null_class: int | None  # the "no label" index of classifier-free guidance; None: not trained for it

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, **kwargs: Any) -> Tensor: ...

    @classmethod
    def fit_to_data(cls, config: dict, data: Any, **runtime: Any) -> dict:
        """The constructor config completed with the values only the data and the task know (channels, classes,
        learned variance)."""
        ...


ROLES = ("denoiser", "upsampler", "classifier")


def declares_network(cls: type) -> bool:
    """Whether a class declares the protocol (subclasses :class:`Network`), so the platform may train it."""
    return isinstance(cls, type) and Network in cls.__mro__
