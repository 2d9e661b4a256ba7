"""Training on latents: a latent cache on disk that training reads back, or latents encoded on the fly by the VAE
of diffusion/models/vae.py.

A latent cache encodes a data set once. It stores each image's posterior -- the mean and standard deviation of
the VAE's diagonal Gaussian, unscaled -- not one sample of it: :class:`LatentDataset` draws
``(mean + std * noise) * 0.18215`` per item with the loader's (seed, epoch, index) generator, so every epoch sees a
fresh latent sample exactly as DiT's on-the-fly encoding does, and a resumed run sees the same ones. With
``sample=False`` it returns the posterior mean instead (deterministic; for evaluation or inspection).

Flips: a VAE is not mirror-equivariant (encoding the mirrored image is not the mirrored latent), so a cache made
with ``flips=True`` encodes each image twice, as is and mirrored left-right, and the dataset picks one of the two
with probability 1/2 per item; a cache made with ``flips=False`` holds unflipped latents only and cannot flip.
Random crops cannot be cached (one crop would be frozen); DiT uses the center crop.

The cache is a directory (``meta.json``, ``mean.npy``, ``std.npy``, ``labels.npy``), memory-mapped by readers,
so several ranks share one copy. It is written aside and renamed into place, so a reader sees either no cache or a
complete one. ``meta.json`` identifies the VAE (name and a fingerprint of its config and weights), the image size
and the data set (class, root, class names, length, a digest of its content); a cache that differs in any of them
is refused with one line (or rebuilt on request), never reused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diffusion.data.datasets import SeededItems
from diffusion.models.vae import LatentError, LatentVAE
from diffusion.runtime.files import fsync_path

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_META = "meta.json"
_ARRAYS = ("mean.npy", "std.npy", "labels.npy")
STORAGE_DTYPES = ("float32", "float16")


class LatentCacheMismatch(LatentError):
    """A latent cache made with another VAE, image size, data set or flip setting."""


# ---------------------------------------------------------------------------------------------------------
# The VAE


def _digest(chunks: Sequence[bytes] | Any) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def dataset_identity(dataset: Dataset) -> dict[str, Any]:
    """
    What identifies an image data set for a latent cache: its class, length, class names, image size and
    channels, its root directory when it has one, and digests of its content -- the image tensor of an in-memory
    data set (digits, CIFAR-10) or the file list of a folder, and the labels.
    """
    kind = type(dataset)
    identity: dict[str, Any] = {
        "class": f"{kind.__module__}.{kind.__qualname__}",
        "length": len(dataset),
        "class_names": [str(n) for n in getattr(dataset, "class_names", [])],
        "num_classes": int(getattr(dataset, "num_classes", 0)),
        "image_size": getattr(dataset, "image_size", None),
        "channels": getattr(dataset, "channels", None),
    }
    for attr in ("root", "dir", "train"):
        value = getattr(dataset, attr, None)
        if isinstance(value, str | int | bool | float):
            identity[attr] = value
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor):
        flat = images.detach().cpu().contiguous().reshape(-1)
        identity["images_sha256"] = _digest([flat.view(torch.uint8).numpy().tobytes()])
    files = getattr(dataset, "files", None)
    if isinstance(files, list):
        identity["files_sha256"] = _digest(f"{f}\n".encode() for f in files)
    labels = getattr(dataset, "targets", getattr(dataset, "labels", None))
    if isinstance(labels, torch.Tensor | np.ndarray | list):
        identity["labels_sha256"] = _digest([np.asarray(labels, dtype=np.int64).tobytes()])
    return identity


def latent_cache_metadata(dataset: Dataset, vae: LatentVAE, flips: bool) -> dict[str, Any]:
    """The metadata a cache of ``dataset`` encoded by ``vae`` must have (compared field by field on reading)."""
    image_size = dataset.image_size
    return {
        "format": CACHE_FORMAT,
        "vae": {
            "name": vae.name,
            "fingerprint": vae.fingerprint,
            "scale_factor": vae.scale_factor,
            "latent_channels": vae.latent_channels,
            "downsample": vae.downsample,
        },
        "image_size": image_size,
        "latent_size": vae.latent_size(image_size),
        "dataset": dataset_identity(dataset),
        "flips": bool(flips),
    }


# Recorded for people, not compared: the same weights moved to another directory are the same VAE.
_NOT_COMPARED = {"vae.name"}


def _show(key: str, value: Any) -> str:
    if isinstance(value, str) and (key.endswith("sha256") or key.endswith("fingerprint")):
        return value[:12]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(cached: dict, expected: dict, prefix: str = "") -> list[str]:
    """One "field cached-value (cache) vs expected-value (now)" per differing field of ``expected``."""
    out = []
    for key in expected:
        name = f"{prefix}{key}"
        a, b = cached.get(key), expected[key]
        if name in _NOT_COMPARED:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name} {_show(key, a)} (cache) vs {_show(key, b)} (now)")
            if name == "vae.fingerprint":
                out[-1] += f", VAE {cached.get('name')!r} (cache) vs {expected.get('name')!r} (now)"
    return out


def _unaugmented(dataset: Dataset) -> Dataset:
    """The data set with its flips off (a shallow copy), refusing random crops, which a cache would freeze."""
    if getattr(dataset, "random_crop", False):
        raise LatentError(
            "a latent cache cannot hold random crops (it would freeze one crop per image): set "
            "data.random_crop=false (DiT's center crop) or encode on the fly"
        )
    if getattr(dataset, "random_flip", False):
        dataset = copy.copy(dataset)
        dataset.random_flip = False
    return dataset


def _write_cache(
    dataset: Dataset,
    vae: LatentVAE,
    tmp: Path,
    meta: dict,
    batch_size: int,
    num_workers: int,
    storage_dtype: str,
    progress: Callable[[int, int], None] | None,
) -> None:
    n, c, s = len(dataset), vae.latent_channels, meta["latent_size"]
    views = 2 if meta["flips"] else 1
    shape = (views, n, c, s, s)
    mean = np.lib.format.open_memmap(tmp / "mean.npy", mode="w+", dtype=storage_dtype, shape=shape)
    std = np.lib.format.open_memmap(tmp / "std.npy", mode="w+", dtype=storage_dtype, shape=shape)
    labels = np.lib.format.open_memmap(tmp / "labels.npy", mode="w+", dtype=np.int64, shape=(n,))
    loader = DataLoader(SeededItems(_unaugmented(dataset)), batch_size=batch_size, num_workers=num_workers)
    done = 0
    for x, y in loader:
        expected = (vae.image_channels, meta["image_size"], meta["image_size"])
        if tuple(x.shape[1:]) != expected:
            raise LatentError(
                f"the data set gives images of shape {list(x.shape[1:])}, the VAE {vae.name!r} takes "
                f"{list(expected)}: set data.channels={vae.image_channels}"
            )
        for view, images in enumerate((x, x.flip(-1))[:views]):
            m, sd = vae.posterior(images)
            mean[view, done : done + len(x)] = m.float().cpu().numpy()
            std[view, done : done + len(x)] = sd.float().cpu().numpy()
        labels[done : done + len(x)] = y.numpy()
        done += len(x)
        if progress is not None:
            progress(done, n)
    for array in (mean, std, labels):
        array.flush()
    del mean, std, labels
    for name in _ARRAYS:
        fsync_path(tmp / name)
    # meta.json last: a directory with it is complete.
    (tmp / _META).write_text(json.dumps(meta, indent=1))
    fsync_path(tmp / _META)


def build_latent_cache(
    dataset: Dataset,
    vae: LatentVAE,
    path: str | os.PathLike,
    flips: bool | None = None,
    rebuild: bool = False,
    batch_size: int = 32,
    num_workers: int = 0,
    storage_dtype: str = "float32",
    sample: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> LatentDataset:
    """
    Encode ``dataset`` once into the cache directory ``path`` and open it; a matching cache is reused as is.

    :param dataset: a data set of (x, y) items, x a float [C x H x W] Tensor in [-1, 1] (e.g.
        ``diffusion.data.datasets.Digits``); its own flips are turned off for encoding.
    :param vae: the VAE to encode with.
    :param flips: also encode every image mirrored left-right; None: as the data set's ``random_flip`` (False
        when it has none).
    :param rebuild: replace a cache at ``path`` that does not match (otherwise it is refused with one line).
    :param batch_size: images per encoder call.
    :param num_workers: DataLoader workers decoding the images.
    :param storage_dtype: "float32" or "float16" (half the disk; the posterior's precision is ample for it).
    :param sample: the returned dataset's ``sample`` (see :class:`LatentDataset`).
    :param progress: called as progress(done, total) after each batch.
    :raises LatentCacheMismatch: a cache at ``path`` was made otherwise and ``rebuild`` is False.
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise LatentError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
    if batch_size < 1:
        raise LatentError(f"batch_size must be >= 1, got {batch_size}")
    path = Path(path).expanduser().absolute()
    flips = bool(getattr(dataset, "random_flip", False)) if flips is None else flips
    _check_image_channels(dataset, vae)
    meta = latent_cache_metadata(dataset, vae, flips)
    if (path / _META).is_file():
        try:
            return LatentDataset(path, expect=meta, sample=sample)
        except LatentCacheMismatch:
            if not rebuild:
                raise
    elif path.exists() and any(path.iterdir()):
        raise LatentError(
            f"{path} exists and is not a latent cache (no {_META}): choose an empty or new directory"
        )

    replacing = path.exists()  # a cache that did not match (rebuild=True), or an empty directory
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir()
    try:
        _write_cache(dataset, vae, tmp, {**meta, "storage_dtype": storage_dtype}, batch_size, num_workers,
                     storage_dtype, progress)  # fmt: skip
        _move_into_place(tmp, path, replacing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return LatentDataset(path, expect=meta, sample=sample)


def _move_into_place(tmp: Path, path: Path, replacing: bool) -> None:
    """Rename the finished cache to ``path``. When ``replacing``, what was there is renamed away first and deleted
    after; otherwise a cache that another process put there meanwhile is kept (and checked by the caller)."""
    old = None
    if replacing and path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        # Another process put a cache there in the meantime; the caller's reading it checks that it matches.
        if not (path / _META).is_file():
            raise
    if old is not None:
        # Readers that opened the old arrays keep their memory maps until they close them.
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(path.parent)


class LatentDataset(Dataset):
    """
    A latent cache read back with the item contract of the project's data sets.

    Items are (x, y): x an [latent_channels x latent_size x latent_size] float32 Tensor of scaled latents
    (``(mean + std * noise) * scale_factor``, the noise from the item's generator), y an int64 scalar. Attributes:
    ``num_classes``, ``class_names``, ``image_size`` (the latent side), ``channels`` (latent channels),
    ``pixel_image_size``, ``vae_name``, ``scale_factor``, ``flips``, ``meta``.

    :param path: the cache directory written by :func:`build_latent_cache`.
    :param expect: the metadata this run needs (:func:`latent_cache_metadata`); a cache that differs in any
        field is refused with LatentCacheMismatch naming the fields. None: no check.
    :param random_flip: pick the mirrored image's latent with probability 1/2; None: when the cache holds them.
    :param sample: draw from the posterior (DiT's training); False returns the posterior mean.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        expect: dict[str, Any] | None = None,
        random_flip: bool | None = None,
        sample: bool = True,
    ):
        self.path = Path(path).expanduser().absolute()
        meta_file = self.path / _META
        if not meta_file.is_file():
            raise LatentError(
                f"no latent cache at {self.path} (no {_META}): write it first with build_latent_cache"
            )
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != CACHE_FORMAT:
            raise LatentCacheMismatch(
                f"latent cache {self.path} has format {self.meta.get('format')}, this code reads "
                f"{CACHE_FORMAT}: rebuild it"
            )
        if expect is not None:
            diffs = _differences(self.meta, expect)
            if diffs:
                raise LatentCacheMismatch(
                    f"latent cache {self.path} was made with another setting ({'; '.join(diffs)}): rebuild it "
                    "(`python -m diffusion.latent_cache ... rebuild=true`) or use another cache directory"
                )
        self.flips = bool(self.meta["flips"])
        if random_flip and not self.flips:
            raise LatentError(
                f"latent cache {self.path} holds unflipped latents only: rebuild it with flips=True, or set "
                "random_flip=False"
            )
        self.random_flip = self.flips if random_flip is None else random_flip
        self.sample = sample
        self._open()
        data = self.meta["dataset"]
        self.class_names = list(data["class_names"])
        self.num_classes = int(data["num_classes"])
        self.image_size = int(self.meta["latent_size"])
        self.channels = int(self.meta["vae"]["latent_channels"])
        self.pixel_image_size = int(self.meta["image_size"])
        self.vae_name = self.meta["vae"]["name"]
        self.scale_factor = float(self.meta["vae"]["scale_factor"])
        self.downsample = int(self.meta["vae"]["downsample"])
        self.vae: LatentVAE | None = None  # the VAE that decodes these latents, where the reader attached it

    def _open(self) -> None:
        # Memory maps: every rank and DataLoader worker shares the page cache instead of holding a copy.
        self.mean = np.load(self.path / "mean.npy", mmap_mode="r")  # (views, N, C, h, w)
        self.std = np.load(self.path / "std.npy", mmap_mode="r")
        self.labels = np.load(self.path / "labels.npy", mmap_mode="r")  # (N,)

    def __getstate__(self) -> dict:
        # Pickling a memory map copies its data; workers started by spawn map the files themselves instead.
        return {k: v for k, v in self.__dict__.items() if k not in ("mean", "std", "labels")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """
        :param index: which image.
        :param rng: the source of the flip choice and the posterior sample.
        :return: (x, y): a float32 [latent_channels x latent_size x latent_size] Tensor and an int64 label.
        """
        view = 1 if self.random_flip and rng.random() < 0.5 else 0
        mean = self.mean[view, index].astype(np.float32)
        if self.sample:
            noise = rng.standard_normal(mean.shape, dtype=np.float32)
            mean = mean + self.std[view, index].astype(np.float32) * noise
        x = torch.from_numpy(mean * np.float32(self.scale_factor))
        return x, torch.tensor(int(self.labels[index]), dtype=torch.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(index, np.random.default_rng())


class EncodedDataset(Dataset):
    """
    A pixel data set's latents, encoded image by image as the loader reads them (``data.latent=true`` without a
    cache).

    Items are those of :class:`LatentDataset`: ``(mean + std * noise) * scale_factor`` of the VAE's posterior,
    the noise drawn from the item's generator after the data set's own augmentation drew from it (a flip) -- the
    same draws in the same order as a LatentDataset makes on a cache of the same data, so both give the same
    latents (up to the encoder's rounding in another batch size), and a resumed run sees the same ones.

    Encoding runs on the CPU in the loader's processes: right for small images and trials. For ImageNet-size
    data, encode once on a GPU into a cache (``python -m diffusion.latent_cache``).

    :param dataset: a data set of (x, y) items, x a float [C x H x W] Tensor in [-1, 1].
    :param vae: the VAE (on the CPU).
    """

    def __init__(self, dataset: Dataset, vae: LatentVAE):
        _check_image_channels(dataset, vae)
        self.dataset = dataset
        self.vae = vae
        self.pixel_image_size = int(dataset.image_size)
        self.image_size = vae.latent_size(self.pixel_image_size)
        self.channels = vae.latent_channels
        self.downsample = vae.downsample
        self.scale_factor = vae.scale_factor
        self.num_classes = int(getattr(dataset, "num_classes", 0))
        self.class_names = list(getattr(dataset, "class_names", []))

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """
        :return: (x, y): a float32 [latent_channels x latent_size x latent_size] Tensor and an int64 label.
        """
        load = getattr(self.dataset, "load", None)
        x, y = load(index, rng) if load is not None else self.dataset[index]
        mean, std = (v[0].float().cpu().numpy() for v in self.vae.posterior(x[None]))
        noise = rng.standard_normal(mean.shape, dtype=np.float32)
        return torch.from_numpy((mean + std * noise) * np.float32(self.scale_factor)), y

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(index, np.random.default_rng())


def _check_image_channels(dataset: Dataset, vae: LatentVAE) -> None:
    channels = getattr(dataset, "channels", vae.image_channels)
    if channels != vae.image_channels:
        raise LatentError(
            f"the data set has {channels}-channel images, the VAE {vae.name!r} encodes {vae.image_channels}: "
            f"set data.channels={vae.image_channels}"
        )


def latent_training_data(dataset: Dataset, vae: LatentVAE | Any, cache: str | os.PathLike | None) -> Dataset:
    """
    What ``data.latent=true`` trains on: the latents of ``dataset``, read from the cache directory ``cache``
    (written by ``python -m diffusion.latent_cache``) or, without one, encoded on the fly (:class:`EncodedDataset`).
    The result has the VAE as its ``vae`` attribute, so that samples can be decoded.

    :param vae: the VAE, or the ``vae`` group's config that loads it (on the CPU).
    :raises LatentError: no cache at ``cache``, or one made with another VAE, image size, data set or flip
        setting (:class:`LatentCacheMismatch`); the message names the fields and the command that (re)writes it.
    """
    if vae is None:
        raise LatentError("data.latent=true needs a VAE: add vae=sd_vae_ft_ema (or vae=sd_vae_ft_mse)")
    if not isinstance(vae, LatentVAE):
        from diffusion.config import build

        vae = build(vae)
    _check_image_channels(dataset, vae)
    if cache is None:
        log.info("latents encoded on the fly by the VAE %s (no data.latent_cache)", vae.name)
        return EncodedDataset(dataset, vae)
    path = Path(cache).expanduser().absolute()
    if not (path / _META).is_file():
        raise LatentError(
            f"no latent cache at {path}: write it first with `python -m diffusion.latent_cache` and the same data and "
            f"vae overrides plus data.latent_cache={cache}, or drop data.latent_cache to encode on the fly"
        )
    _unaugmented(dataset)  # a cache cannot hold random crops: refused with one line
    flips = bool(getattr(dataset, "random_flip", False))
    latents = LatentDataset(path, expect=latent_cache_metadata(dataset, vae, flips))
    latents.vae = vae
    log.info("latents of %d images from the cache %s (VAE %s)", len(latents), path, vae.name)
    return latents
