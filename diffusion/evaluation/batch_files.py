"""Image batch files in the format of OpenAI's guided-diffusion evaluator: reading, checking and writing them.

A batch is an ``.npz`` whose ``arr_0`` holds uint8 [N x H x W x C] images (C = 1 or 3). A sample batch may
carry ``arr_1``, the class labels. A reference batch may also carry precomputed feature statistics: ``mu``,
``sigma`` (pool features) and ``mu_s``, ``sigma_s`` (spatial features), as OpenAI's published reference
batches do; :func:`write_reference_batch` writes one, plus a ``feature_set`` entry naming the features the
statistics are of (OpenAI's evaluator ignores entries it does not know).

Images are read in batches straight out of the zip member, so a batch larger than memory can be evaluated.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from diffusion.data.images import UINT8_FROM_FLOATS
from diffusion.errors import UserError
from diffusion.evaluation.metrics import FeatureStatistics, feature_statistics
from diffusion.runtime.files import fsync_path


class FeatureSource(Protocol):
    """What writing a reference batch needs of an evaluator: features of uint8 images, and their set's name."""

    feature_set: object  # has a ``name``

    def extract(self, images: np.ndarray) -> dict[str, torch.Tensor]: ...


STATISTICS_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}
# Precision and recall need each image's 3 nearest neighbours besides itself.
MIN_IMAGES = 4


class BatchFileError(UserError):
    """A batch file that cannot be evaluated as it is; the message names the file and what to change."""


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) of an open .npy stream, left at the data; None for a header version this
    reader does not stream (the caller then loads the array whole)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


def _member_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    with zf.open(f"{name}.npy") as f:
        return _read_header(f)


@dataclass
class BatchFile:
    """A checked batch file; its images stay on disk until :meth:`batches` reads them.

    :param path: the file.
    :param role: "reference batch" or "sample batch", for messages.
    :param shape: arr_0's shape, (N, H, W, C).
    :param statistics: the precomputed {"pool": ..., "spatial": ...} statistics, or None.
    :param feature_set: the ``feature_set`` entry of a batch :func:`write_reference_batch` wrote, or None.
    :param has_labels: whether ``arr_1`` is there.
    """

    path: Path
    role: str
    shape: tuple[int, int, int, int]
    statistics: dict[str, FeatureStatistics] | None
    feature_set: str | None
    has_labels: bool

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """The images in order, as uint8 [B x H x W x C] arrays of ``batch_size`` (the last may be smaller)."""
        image_bytes = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            header = _read_header(f)
            if header is None or header[1]:  # a rare header version or Fortran order: read it whole
                images = np.load(self.path)["arr_0"]
                for start in range(0, len(images), batch_size):
                    yield np.ascontiguousarray(images[start : start + batch_size])
                return
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                data = f.read(count * image_bytes)
                if len(data) != count * image_bytes:
                    raise BatchFileError(f"{self.role} {self.path}: arr_0 is truncated; write the file again")
                yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(count, *self.shape[1:])

    def images(self) -> np.ndarray:
        """All images, uint8 [N x H x W x C]."""
        return np.concatenate(list(self.batches(max(len(self), 1))))

    def labels(self) -> np.ndarray | None:
        """``arr_1`` (the class labels of a sample batch), or None."""
        if not self.has_labels:
            return None
        with np.load(self.path) as npz:
            return npz["arr_1"]


def open_batch(path: str | Path, role: str = "sample batch", min_images: int = MIN_IMAGES) -> BatchFile:
    """
    Check a batch file and read its header (and statistics) without loading the images.

    :param role: "reference batch" or "sample batch", for messages.
    :param min_images: the fewest images the file may hold.
    :raises BatchFileError: one line naming the file and what to change.
    :raises OSError: the file cannot be read.
    """
    path = Path(path)
    where = f"{role} {path}"
    if not path.is_file():
        raise BatchFileError(f"{where}: No such file; check the path")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise BatchFileError(
            f"{where} is not an .npz file; save batches with numpy.savez(path, arr_0=images)"
        ) from None
    with zf:
        names = [n.removesuffix(".npy") for n in zf.namelist()]
        if "arr_0" not in names:
            raise BatchFileError(f"{where} has no arr_0 (the uint8 [N x H x W x C] images); it holds {names}")
        header = _member_header(zf, "arr_0")
    if header is None:
        with np.load(path) as npz:
            array = npz["arr_0"]
            header = (array.shape, False, array.dtype)
    shape, _, dtype = header
    if dtype != np.uint8:
        raise BatchFileError(
            f"{where}: arr_0 has dtype {dtype}; store uint8 images in 0..255 (from [-1, 1] floats as the "
            f"reference converts them: {UINT8_FROM_FLOATS})"
        )
    if len(shape) == 3:
        raise BatchFileError(
            f"{where}: arr_0 has shape {shape} with no channel axis; store it as [N x H x W x C] (arr_0[..., None])"
        )
    if len(shape) == 4 and shape[1] in (1, 3) and shape[3] not in (1, 3):
        raise BatchFileError(
            f"{where}: arr_0 has shape {shape}, channels first; store it as [N x H x W x C] "
            f"(arr_0.transpose(0, 2, 3, 1))"
        )
    if len(shape) != 4 or shape[3] not in (1, 3):
        raise BatchFileError(f"{where}: arr_0 must be [N x H x W x C] with C = 1 or 3, got shape {shape}")
    if shape[0] < min_images:
        raise BatchFileError(
            f"{where} holds {shape[0]} images; the statistics need at least {min_images} (precision and recall "
            f"use each image's 3 nearest neighbours): write more images into it"
        )
    statistics, feature_set = _read_statistics(path, names, where)
    return BatchFile(
        path=path,
        role=role,
        shape=tuple(int(s) for s in shape),
        statistics=statistics,
        feature_set=feature_set,
        has_labels="arr_1" in names,
    )


def _read_statistics(
    path: Path, names: list[str], where: str
) -> tuple[dict[str, FeatureStatistics] | None, str | None]:
    keys = [k for pair in STATISTICS_KEYS.values() for k in pair]
    present = [k for k in keys if k in names]
    feature_set = None
    with np.load(path) as npz:
        if "feature_set" in names:
            feature_set = str(npz["feature_set"])
        if not present:
            return None, feature_set
        if len(present) != len(keys):
            missing = [k for k in keys if k not in names]
            raise BatchFileError(
                f"{where} has {present} but not {missing}: store all of {keys} or none (then they are computed)"
            )
        statistics = {}
        for kind, (mu_key, sigma_key) in STATISTICS_KEYS.items():
            mu, sigma = npz[mu_key], npz[sigma_key]
            if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                raise BatchFileError(
                    f"{where}: {mu_key} must be [D] and {sigma_key} [D x D], got {mu.shape} and {sigma.shape}; "
                    f"write the statistics again"
                )
            statistics[kind] = FeatureStatistics(mu=mu.astype(np.float64), sigma=sigma.astype(np.float64))
    return statistics, feature_set


def check_same_format(reference: BatchFile, sample: BatchFile) -> None:
    """
    Both batches must hold images of one size and channel count: comparing 32x32 samples with a 64x64
    reference, or grayscale samples with a colour reference, measures the mismatch, not the model.

    :raises BatchFileError: naming the sample file and what to change.
    """
    (h, w, c), (rh, rw, rc) = sample.shape[1:], reference.shape[1:]
    if (h, w) != (rh, rw):
        raise BatchFileError(
            f"{sample.role} {sample.path} holds {h}x{w} images but {reference.role} {reference.path} holds "
            f"{rh}x{rw}: sample at {rh}x{rw} (or make a reference batch at {h}x{w})"
        )
    if c != rc:
        raise BatchFileError(
            f"{sample.role} {sample.path} has {c} channel(s) but {reference.role} {reference.path} has {rc}: "
            f"sample with {rc} channel(s) (or make a reference batch with {c})"
        )


def _as_batches(images: Iterable[np.ndarray | torch.Tensor]) -> Iterator[np.ndarray]:
    for item in images:
        array = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
        if array.ndim == 3:  # one [H x W x C] image
            array = array[None]
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
            raise BatchFileError(
                f"reference images must be uint8 [H x W x C] or [N x H x W x C] with C = 1 or 3, got "
                f"{array.dtype} {array.shape}"
            )
        yield array


def write_sample_batch(
    path: str | Path, images: np.ndarray, labels: np.ndarray | None = None, **metadata
) -> Path:
    """
    Write a sample batch atomically: ``arr_0`` the uint8 [N x H x W x C] images, ``arr_1`` their labels (when
    given), as OpenAI's evaluator reads them, plus ``metadata`` entries (strings and numbers, e.g. the solver).
    The file appears under its name only when complete.
    """
    path = Path(path)
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels
    arrays.update({k: np.array(v) for k, v in metadata.items()})
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_npz(
    path: Path, raw, shape: tuple[int, ...], stats: dict[str, FeatureStatistics], feature_set: str
) -> None:
    """An uncompressed .npz as numpy.savez writes it, with arr_0 copied from the raw uint8 bytes in ``raw``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
            np.lib.format.write_array_header_1_0(member, {**header, "shape": shape})
            while block := raw.read(1 << 24):
                member.write(block)
        extras = {"feature_set": np.array(feature_set)}
        for kind, (mu_key, sigma_key) in STATISTICS_KEYS.items():
            extras[mu_key], extras[sigma_key] = stats[kind].mu, stats[kind].sigma
        for name, array in extras.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


def write_reference_batch(
    path: str | Path,
    images: Iterable[np.ndarray | torch.Tensor],
    evaluator: FeatureSource,
    max_images: int | None = None,
) -> BatchFile:
    """
    Write a reference batch in OpenAI's format: ``arr_0`` (the images) and the statistics of the evaluator's
    features (``mu``, ``sigma``, ``mu_s``, ``sigma_s``), plus ``feature_set``.

    The images are streamed: each chunk is turned into features and appended to a temporary file, so the
    batch need not fit in memory.

    :param images: uint8 [H x W x C] images or [N x H x W x C] chunks of them (arrays or Tensors), C = 1 or 3,
        all of one size.
    :param evaluator: supplies the features (e.g. :class:`diffusion.evaluation.evaluator.Evaluator`).
    :param max_images: stop after this many images.
    :return: the written file, opened with :func:`open_batch`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    features: dict[str, list[torch.Tensor]] = {"pool": [], "spatial": []}
    count, image_shape = 0, None
    with tempfile.TemporaryFile(dir=path.parent) as raw:
        for chunk in _as_batches(images):
            if max_images is not None:
                chunk = chunk[: max_images - count]
            if image_shape is None:
                image_shape = chunk.shape[1:]
            elif chunk.shape[1:] != image_shape:
                raise BatchFileError(
                    f"reference images must all be {image_shape} (H x W x C), got a chunk of {chunk.shape[1:]}"
                )
            for kind, value in evaluator.extract(chunk).items():
                if kind in features:
                    features[kind].append(value.cpu())
            raw.write(np.ascontiguousarray(chunk).tobytes())
            count += len(chunk)
            if max_images is not None and count >= max_images:
                break
        if count < MIN_IMAGES:
            raise BatchFileError(f"a reference batch needs at least {MIN_IMAGES} images, got {count}")
        stats = {kind: feature_statistics(torch.cat(values)) for kind, values in features.items()}
        raw.seek(0)
        partial = path.with_name(path.name + ".partial")
        try:
            _write_npz(partial, raw, (count, *image_shape), stats, evaluator.feature_set.name)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, path)  # only a complete file ever appears under the real name
    return open_batch(path, role="reference batch")
