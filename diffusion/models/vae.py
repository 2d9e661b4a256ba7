"""Stable Diffusion's VAE with DiT's scaling, opened offline.

DiT trains on ``vae.encode(x).latent_dist.sample() * 0.18215`` and decodes samples with ``vae.decode(z /
0.18215)``. :func:`load_vae` opens the VAE with diffusers' ``AutoencoderKL`` offline (a local directory or the
user's Hugging Face cache; nothing is downloaded). :class:`LatentVAE` encodes and decodes with that scaling. The
latent cache that training reads back is diffusion/data/latent.py.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import warnings
from typing import Any

import torch

from diffusion.errors import ConfigError

log = logging.getLogger(__name__)

# DiT's (and Stable Diffusion v1's) latent scaling: unit-ish variance for the diffusion model.
SCALE_FACTOR = 0.18215
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
# DiT's two VAEs (sample_ddp.py uses ema, sample.py mse), also accepted by their short names.
VAE_NAMES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


class LatentError(ConfigError):
    """A user-fixable problem with the VAE or a latent cache; the message says what to change."""


class VAENotFoundError(LatentError):
    """The VAE is neither a local directory nor in the Hugging Face cache."""


class LatentVAE:
    """
    An ``AutoencoderKL`` with DiT's latent scaling.

    :param vae: the diffusers autoencoder (put in eval mode, gradients off).
    :param name: what it was loaded from (a Hugging Face name or a directory), recorded in latent caches.
    :param scale_factor: latents are the VAE's posterior times this (DiT: 0.18215).
    """

    def __init__(self, vae: torch.nn.Module, name: str, scale_factor: float = SCALE_FACTOR):
        self.vae = vae.eval().requires_grad_(False)
        self.name = name
        self.scale_factor = scale_factor
        self.image_channels: int = vae.config.in_channels
        self.latent_channels: int = vae.config.latent_channels
        # Each encoder level but the last halves the side (8 for Stable Diffusion's four levels).
        self.downsample: int = 2 ** (len(vae.config.block_out_channels) - 1)
        self._fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def on(self, device: torch.device | str) -> LatentVAE:
        """This VAE if it is on ``device``, else a copy there (the original stays where it is: the data loader
        may be encoding with it)."""
        if torch.device(device) == self.device:
            return self
        return LatentVAE(copy.deepcopy(self.vae).to(device), self.name, self.scale_factor)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LatentVAE:
        """Move the autoencoder (in place); a dtype change changes the fingerprint (the latents change too)."""
        self.vae.to(device=device, dtype=dtype)
        if dtype is not None:
            self._fingerprint = None
        return self

    @property
    def fingerprint(self) -> str:
        """A sha256 over the autoencoder's config and every tensor of its state dict (names, dtypes, shapes,
        bytes): two VAEs with the same fingerprint encode alike. Computed once (about a second for SD's VAE)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            config = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
            digest.update(json.dumps(config, sort_keys=True, default=str).encode())
            for key, tensor in sorted(self.vae.state_dict().items()):
                t = tensor.detach().cpu().contiguous()
                digest.update(f"{key}:{t.dtype}:{list(t.shape)}".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def latent_size(self, image_size: int) -> int:
        """The latent side for ``image_size`` px images; LatentError unless the VAE's downsampling divides it."""
        if image_size % self.downsample:
            raise LatentError(
                f"image_size={image_size} is not divisible by the VAE's downsampling factor {self.downsample}: "
                f"use a multiple of {self.downsample}"
            )
        return image_size // self.downsample

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        :param x: an [N x image_channels x H x W] Tensor of images in [-1, 1].
        :return: (mean, std) of the VAE's diagonal Gaussian posterior, unscaled: [N x latent_channels x h x w]
            Tensors with h = H / downsample, on the VAE's device and dtype.
        """
        if x.dim() != 4 or x.shape[1] != self.image_channels:
            raise LatentError(
                f"the VAE encodes [N, {self.image_channels}, H, W] images, got {list(x.shape)}: "
                f"use {self.image_channels}-channel data (data.channels={self.image_channels})"
            )
        self.latent_size(x.shape[-1])
        dist = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        return dist.mean, dist.std

    @torch.no_grad()
    def encode(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """
        DiT's latents: ``latent_dist.sample() * scale_factor`` (or the mean times it, with ``sample=False``).

        :param x: an [N x image_channels x H x W] Tensor of images in [-1, 1].
        :param generator: the source of the posterior sample's noise (reproducible encoding); its device is
            where the noise is drawn, so a CPU generator gives the same latents on any device.
        :return: an [N x latent_channels x H/downsample x W/downsample] Tensor on the VAE's device.
        """
        mean, std = self.posterior(x)
        if not sample:
            return mean * self.scale_factor
        where = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=where, dtype=mean.dtype).to(mean.device)
        return (mean + std * noise) * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """
        Latents back to images: ``vae.decode(z / scale_factor)``, clamped to [-1, 1].

        :param z: an [N x latent_channels x h x w] Tensor of scaled latents (a sampler's output).
        :param batch_size: decode this many at a time (the decoder's activations are large); None: all at once.
        :return: an [N x image_channels x h*downsample x w*downsample] float32 Tensor in [-1, 1], on z's device.
        """
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise LatentError(
                f"the VAE decodes [N, {self.latent_channels}, h, w] latents, got {list(z.shape)}"
            )
        step = batch_size or max(len(z), 1)
        parts = [
            self.vae.decode(chunk.to(self.device, self.dtype) / self.scale_factor).sample
            for chunk in z.split(step)
        ]
        return torch.cat(parts).float().clamp(-1.0, 1.0).to(z.device)


def _looks_like_path(name: str) -> bool:
    """A directory rather than a Hugging Face name ("org/name", or a bare legacy "name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.path.exists(name)


def _locate(name_or_path: str) -> tuple[str, bool]:
    """(what to open, whether it is a local directory) for a VAE name, short name or path."""
    name = VAE_NAMES.get(name_or_path, name_or_path)
    local = os.path.expanduser(name)
    if os.path.isdir(local) or _looks_like_path(name):
        return local, True
    return name, False


def _not_in_cache(name: str, cache_dir: str | None) -> VAENotFoundError:
    from huggingface_hub.constants import HF_HUB_CACHE

    where = cache_dir or HF_HUB_CACHE
    return VAENotFoundError(
        f"VAE {name!r} is not in the Hugging Face cache {where} (it is never downloaded during a run): run "
        f"`hf download {name}` (older clients: `huggingface-cli download {name}`) where there is internet "
        f"and copy {where} here, or `hf download {name} --local-dir DIR` and pass DIR as the VAE path "
        "(vae.name_or_path=DIR)"
    )


def _no_config(local: str) -> VAENotFoundError:
    return VAENotFoundError(
        f"VAE directory {local} has no config.json: point it at a folder written by diffusers' "
        f"AutoencoderKL.save_pretrained (config.json + diffusion_pytorch_model.safetensors), e.g. "
        f"`hf download {DEFAULT_VAE} --local-dir {local}`"
    )


@functools.lru_cache(maxsize=16)
def vae_config(name_or_path: str = DEFAULT_VAE, cache_dir: str | None = None) -> dict[str, Any]:
    """
    The VAE's ``config.json`` (diffusers' AutoencoderKL config), read offline without loading the weights: what
    the config needs before any work (the downsampling factor that turns a model's latent side into the data's
    image side).

    :raises VAENotFoundError: as :func:`load_vae`.
    """
    where, is_dir = _locate(name_or_path)
    if is_dir:
        path = os.path.join(where, "config.json")
        if not os.path.isfile(path):
            raise _no_config(where)
    else:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(where, "config.json", cache_dir=cache_dir)
        if not isinstance(path, str):
            raise _not_in_cache(where, cache_dir)
    with open(path) as f:
        return json.load(f)


def vae_downsample(name_or_path: str = DEFAULT_VAE, cache_dir: str | None = None) -> int:
    """How many pixels one latent covers per side: 2 ** (encoder levels - 1), 8 for Stable Diffusion's VAE."""
    return 2 ** (len(vae_config(name_or_path, cache_dir)["block_out_channels"]) - 1)


def load_vae(
    name_or_path: str = DEFAULT_VAE,
    cache_dir: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    scale_factor: float = SCALE_FACTOR,
) -> LatentVAE:
    """
    Open a VAE offline (``local_files_only=True``): a directory in diffusers' format (``config.json`` and
    ``diffusion_pytorch_model.safetensors``, as ``save_pretrained`` writes), or a Hugging Face name found in the
    cache. Nothing is downloaded. The ``vae`` config group builds it.

    :param name_or_path: a directory, a Hugging Face name (``stabilityai/sd-vae-ft-ema``, the default, or
        ``stabilityai/sd-vae-ft-mse``), or the short names ``ema`` / ``mse``.
    :param cache_dir: the Hugging Face cache to look in; None: the user's (``$HF_HUB_CACHE``, ``$HF_HOME/hub``).
    :param scale_factor: latents are the posterior times this (DiT: 0.18215).
    :raises VAENotFoundError: the VAE is not there; the message says what to download and where to put it.
    """
    from diffusers import AutoencoderKL

    where, is_dir = _locate(name_or_path)
    if is_dir and not os.path.isfile(os.path.join(where, "config.json")):
        raise _no_config(where)
    try:
        with warnings.catch_warnings():
            # diffusers passes huggingface_hub an argument it deprecated; not the user's concern.
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
            vae = AutoencoderKL.from_pretrained(
                where,
                local_files_only=True,
                cache_dir=cache_dir,
                torch_dtype=dtype,
                low_cpu_mem_usage=False,
            )
    except OSError as e:
        if is_dir:
            raise VAENotFoundError(f"VAE directory {where} could not be read: {e}".splitlines()[0]) from e
        raise _not_in_cache(where, cache_dir) from e
    return LatentVAE(vae.to(device), name=where, scale_factor=scale_factor)


def check_latent_channels(vae: LatentVAE, in_channels: int) -> None:
    """LatentError unless a model taking ``in_channels`` channels can be trained on this VAE's latents."""
    if vae.latent_channels != in_channels:
        raise LatentError(
            f"the VAE {vae.name!r} makes {vae.latent_channels}-channel latents but model.in_channels="
            f"{in_channels}: set model.in_channels={vae.latent_channels} (or use a VAE with {in_channels} latent "
            "channels)"
        )
