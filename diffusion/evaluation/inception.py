"""The Inception-v3 features ADM's evaluator measures samples with, through torch-fidelity's port of the network.

torch-fidelity's ``FeatureExtractorInceptionV3`` is the 2015 TensorFlow graph (``classify_image_graph_def.pb``)
that ADM's evaluator imports, converted to PyTorch: it resizes to 299x299 as TF1's bilinear resize does and
scales pixels as the graph does. :class:`InceptionFeatures` wraps it and returns, per image:

- ``"pool"``: the 2048-d ``pool_3`` features (FID, precision and recall);
- ``"spatial"``: ``mixed_6/conv`` (the ``Mixed_6d.branch1x1`` output, [192 x 17 x 17]) in NHWC order, first 7
  channels, flattened to 17 * 17 * 7 = 2023 values (sFID);
- ``"logits"``: the 1008 class logits without the bias (torch-fidelity's ``logits_unbiased``, ADM's
  ``pool_3 @ W`` softmax input; Inception Score).

Weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``, or pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (the same state dict), from an explicit path or torch hub's cache.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion.errors import UserError

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILENAME}"
PYTORCH_FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_SHAPE = (17, 17, 7)  # ADM keeps mixed_6/conv[..., :7] of the [17 x 17 x 192] map
SPATIAL_DIM = SPATIAL_SHAPE[0] * SPATIAL_SHAPE[1] * SPATIAL_SHAPE[2]
# Two entries of the state dict whose shapes say "this is the FID Inception" (the 1008-class head is unusual).
_SIGNATURE = {"fc.weight": (NUM_CLASSES, POOL_DIM), "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1)}


class InceptionWeightsError(UserError):
    """The Inception weights file is missing or is not the FID Inception's state dict."""


def hub_weights_paths() -> list[Path]:
    """Where torch hub's cache keeps the weights: torch-fidelity's file name first, then pytorch-fid's."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    return [checkpoints / WEIGHTS_FILENAME, checkpoints / PYTORCH_FID_WEIGHTS_FILENAME]


def _missing(path: Path, why: str) -> InceptionWeightsError:
    return InceptionWeightsError(
        f"{why}: download {WEIGHTS_URL} and put it at {path} (or pass --inception-weights PATH / "
        f"eval.inception_weights=PATH)"
    )


def _download(url: str, path: Path, timeout: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)
    os.replace(partial, path)  # only a complete file ever appears under the real name


def find_inception_weights(
    path: str | Path | None = None, download: bool = True, timeout: float = 30.0
) -> Path:
    """
    The weights file to use: ``path`` when given (it must exist), else the first of :func:`hub_weights_paths`
    that exists, else (``download=True``) torch-fidelity's release downloaded into torch hub's cache.

    :raises InceptionWeightsError: one line with the download URL and the path to put the file at.
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise _missing(path, f"Inception weights file {path} does not exist")
        return path
    candidates = hub_weights_paths()
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    target = candidates[0]
    if not download:
        raise _missing(target, "Inception weights not found in torch hub's cache")
    try:
        _download(WEIGHTS_URL, target, timeout)
    except OSError as error:  # URLError, timeouts and a full disk are all OSErrors
        reason = getattr(error, "reason", None) or error
        raise _missing(target, f"Inception weights not found and the download failed ({reason})") from None
    return target


def _check_state_dict(path: Path) -> None:
    """Open the file as plain tensors (no pickled code runs) and check it is the FID Inception."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, a pickle with objects: the message says what and where
        raise _missing(
            path, f"{path} is not a readable PyTorch state dict ({type(error).__name__})"
        ) from None
    shapes = {k: tuple(state[k].shape) for k in _SIGNATURE if isinstance(state, dict) and k in state}
    if shapes != _SIGNATURE:
        raise _missing(
            path, f"{path} is not the FID Inception-v3 state dict (expected {_SIGNATURE}, got {shapes})"
        )


class InceptionFeatures(nn.Module):
    """
    ADM's Inception features of uint8 images (see the module docstring for the three kinds).

    :param weights: the weights file, or None to look in torch hub's cache (see :func:`find_inception_weights`).
    :param download: fetch the weights into torch hub's cache when they are nowhere to be found.
    """

    name = "inception"
    dims = {"pool": POOL_DIM, "spatial": SPATIAL_DIM, "logits": NUM_CLASSES}
    precision_recall_on = "pool"

    def __init__(self, weights: str | Path | None = None, download: bool = True) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = find_inception_weights(weights, download=download)
        _check_state_dict(path)
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
            )
        except RuntimeError as error:  # load_state_dict: missing or unexpected keys, wrong shapes
            first = str(error).splitlines()[0]
            raise _missing(path, f"{path} does not fit torch-fidelity's Inception-v3 ({first})") from None
        self.weights_path = path
        self._spatial: Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def default_reference(self) -> None:
        """No built-in reference: Inception features are compared with a reference batch."""
        return None

    def train(self, mode: bool = True) -> InceptionFeatures:
        """A fixed feature extractor: batch norm keeps its running statistics even under ``.train()``."""
        return super().train(False)

    def _keep_spatial(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        c = SPATIAL_SHAPE[2]
        # [N x 192 x 17 x 17] -> NHWC [N x 17 x 17 x 192] -> first 7 channels, flattened as TF lays them out.
        self._spatial = output.permute(0, 2, 3, 1)[..., :c].reshape(len(output), -1).float()

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """
        :param images: a uint8 [N x H x W x C] Tensor, C = 1 (repeated to RGB) or 3, on the module's device.
        :return: {"pool": [N x 2048], "spatial": [N x 2023], "logits": [N x 1008]} float32 Tensors.
        """
        x = nchw_rgb(images)
        try:
            pool, logits = self.net(x)
            spatial = self._spatial
        finally:
            self._spatial = None
        return {"pool": pool, "spatial": spatial, "logits": logits}


def nchw_rgb(images: Tensor) -> Tensor:
    """uint8 [N x H x W x C] (C = 1 or 3) -> uint8 [N x 3 x H x W], a single channel repeated to RGB."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must be uint8 [N x H x W x C] with C = 1 or 3, got {images.dtype} {tuple(images.shape)}"
        )
    x = images.permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def random_inception_state_dict(seed: int = 0) -> dict[str, Tensor]:
    """
    A state dict with the FID Inception file's keys and shapes (pytorch-fid builds the network as torchvision's
    Inception3 with 1008 classes and no auxiliary head) and seeded random values scaled so that activations
    neither vanish nor explode through the 94 convolutions: for offline tests and benchmarks only.
    """
    from torchvision.models.inception import Inception3

    template = Inception3(num_classes=NUM_CLASSES, aux_logits=False, init_weights=False).state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in template.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(value)
        elif key.endswith("conv.weight") or key == "fc.weight":
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif key.endswith("bn.weight") or key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=g)
        else:  # bn.bias, running_mean, fc.bias
            state[key] = 0.1 * torch.randn(value.shape, generator=g)
    return state
