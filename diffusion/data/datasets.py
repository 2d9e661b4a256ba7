"""Training data: the built-in digits, folders of images (the reference's preprocessing), CIFAR-10, and the
loader that feeds one rank an endless, resumable stream of batches.

Every dataset is built from Hydra config by ``_target_`` and has the attributes ``num_classes`` (0 when
unlabeled), ``class_names``, ``image_size`` and ``channels``, and ``held_out()``: the data a run validates on
(the digits' "val" split, an image folder's ``val_dir``, CIFAR-10's test set), or None. An item is ``(x, y)``: ``x`` a float32
[C x H x W] Tensor in [-1, 1], ``y`` an int64 scalar Tensor (0 when unlabeled).

Datasets also expose ``load(index, rng)``, which takes the random generator used for augmentation. The
loader derives that generator from (seed, epoch, index), so a batch sequence is a pure function of the seed
and the position in it: the same with any number of workers, and the same after a resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from diffusion.errors import ConfigError, UserError, check_choice

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp", "bmp")
LABEL_MODES = ("auto", "subdir", "filename", "none")
ON_ERROR_MODES = ("skip", "raise")
# Scan results are stored with this version; a cache written by an older layout is rescanned.
_CACHE_VERSION = 2


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset's files are not where the config points; the message says where to put them."""


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ConfigError(f"image_size must be a positive int, got {image_size!r}")


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


def _resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """
    Bilinear resize with antialiasing (which only matters when shrinking).

    :param x: an [N x C x H x W] float Tensor.
    :return: an [N x C x image_size x image_size] float Tensor.
    """
    if x.shape[-2:] == (image_size, image_size):
        return x
    return F.interpolate(
        x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
    )


def _label(y: int) -> torch.Tensor:
    return torch.tensor(y, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------
# Digits


DIGITS_SPLITS = ("all", "train", "val")


def digits_split(split: str) -> np.ndarray:
    """
    Indices into scikit-learn's 1,797 digits for a split of :class:`Digits`.

    "val" is a fixed, stratified quarter (450 digits, 44 to 46 of each class) and "train" the other 1,347; "all" is
    every digit. The quarter is the one the project's digit judge (``diffusion.evaluate``) holds out, so a
    model trained on "train" can be judged on digits neither it nor the judge has seen.

    :return: a sorted int64 array of indices.
    """
    check_choice("data.split", split, DIGITS_SPLITS)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    targets = load_digits().target
    everything = np.arange(len(targets))
    if split == "all":
        return everything
    train, val = train_test_split(everything, test_size=0.25, stratify=targets, random_state=0)
    return np.sort(train if split == "train" else val)


class Digits(Dataset):
    """
    scikit-learn's handwritten digits: 1,797 real 8x8 grayscale images (values 0..16) in 10 classes.

    Small enough to train a class-conditional model on a laptop CPU in minutes. Never flipped: a mirrored
    digit is a different glyph (or none).

    :param image_size: side of the square output; upsampled bilinearly (antialiased when shrinking).
    :param channels: 1 for grayscale, 3 to repeat the gray value into RGB.
    :param split: "all" (every digit), "train" or "val" (a fixed held-out quarter; see :func:`digits_split`).
        A "train" set's :meth:`held_out` is the "val" set, which a classifier run validates on.
    """

    def __init__(self, image_size: int = 8, channels: int = 1, split: str = "all") -> None:
        _check_image_size(image_size)
        _check_channels(channels)
        from sklearn.datasets import load_digits

        self.indices = digits_split(split)
        digits = load_digits()
        x = torch.from_numpy(digits.images[self.indices].astype(np.float32))[:, None]  # (N, 1, 8, 8), 0..16
        x = _resize(x / 8.0 - 1.0, image_size).clamp(-1.0, 1.0)
        self.images = x.expand(-1, channels, -1, -1).contiguous()  # (N, C, S, S)
        self.targets = torch.from_numpy(digits.target[self.indices].astype(np.int64))
        self.class_names = [str(d) for d in range(10)]
        self.num_classes = 10
        self.image_size = image_size
        self.channels = channels
        self.split = split

    def held_out(self) -> Digits | None:
        """The held-out digits of a "train" set (the "val" split, same size and channels); None otherwise."""
        if self.split != "train":
            return None
        return Digits(self.image_size, self.channels, split="val")

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return item ``index``; ``rng`` is unused because digits get no augmentation."""
        return self.images[index], self.targets[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(index, np.random.default_rng())


# ---------------------------------------------------------------------------------------------------------
# Folders of images, preprocessed as openai/guided-diffusion does


def _reduce_then_resize(image: Image.Image, short_side: int) -> Image.Image:
    """Halve with a box filter while the short side is at least twice ``short_side`` (cheap and alias-free),
    then resize bicubically so that the short side equals ``short_side``."""
    while min(image.size) >= 2 * short_side:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = short_side / min(image.size)
    new_size = (round(image.width * scale), round(image.height * scale))
    return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """
    The reference's center crop: box-halve, bicubic-resize the short side to ``image_size``, crop the middle.

    :return: a uint8 array of shape [image_size x image_size] or [image_size x image_size x C].
    """
    arr = np.asarray(_reduce_then_resize(image, image_size))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop(
    image: Image.Image,
    image_size: int,
    rng: np.random.Generator,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
) -> np.ndarray:
    """
    The reference's random crop: resize the short side to a random length in
    [image_size / max_crop_frac, image_size / min_crop_frac] (so [S, 1.25 S] by default), then crop a random
    ``image_size`` square.

    :return: a uint8 array of shape [image_size x image_size] or [image_size x image_size x C].
    """
    low = math.ceil(image_size / max_crop_frac)
    high = math.ceil(image_size / min_crop_frac)
    short_side = int(rng.integers(low, high + 1))
    arr = np.asarray(_reduce_then_resize(image, short_side))
    top = int(rng.integers(arr.shape[0] - image_size + 1))
    left = int(rng.integers(arr.shape[1] - image_size + 1))
    return arr[top : top + image_size, left : left + image_size]


def _sixteen_bit_to_gray(image: Image.Image) -> Image.Image:
    # PIL's own convert() clips 16-bit values at 255 instead of scaling them, which turns most pixels white.
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """
    Convert any PIL mode to "RGB" (channels 3) or "L" (channels 1).

    16-bit grayscale ("I;16", "I") is scaled down to 8 bits. Transparent modes (RGBA, LA, P with
    transparency) are composited over white: dropping alpha would expose whatever colour the encoder left
    under transparent pixels, often black.
    """
    if image.mode.startswith("I"):
        image = _sixteen_bit_to_gray(image)
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    target = "RGB" if channels == 3 else "L"
    return image if image.mode == target else image.convert(target)


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """
    :param arr: a uint8 array, [H x W] or [H x W x C].
    :return: a float32 [C x H x W] Tensor in [-1, 1].
    """
    x = torch.from_numpy(np.array(arr, dtype=np.float32)) / 127.5 - 1.0  # a writable copy of the crop
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


def _list_images(root: str) -> list[str]:
    """Relative POSIX paths of every file under ``root`` with an image extension, sorted."""
    found = []
    for parent, _dirs, files in os.walk(root):
        for name in files:
            if os.path.splitext(name)[1].lower().lstrip(".") in IMAGE_EXTENSIONS:
                found.append(os.path.relpath(os.path.join(parent, name), root).replace(os.sep, "/"))
    return sorted(found)


def _probe(path: str) -> tuple[int, int] | str:
    """Cheap check of one file: parse the header and let PIL verify what it can without decoding
    (PNG checks its chunk CRCs; JPEG bodies are only checked when decoded). Returns (width, height), or
    the reason the file is unusable."""
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
        return size
    except Exception as error:  # any failure means "not a usable image"; the reason goes to the report
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _class_of(relpath: str, labels: str) -> str:
    if labels == "none":
        return ""
    parts = relpath.split("/")
    if labels == "subdir":
        if len(parts) < 2:
            raise ConfigError(
                f"labels='subdir' needs every image inside a class sub-directory, but {relpath!r} lies "
                "directly in dir; move it into a sub-directory or use labels='filename' or 'none'"
            )
        return parts[0]
    name = parts[-1]
    if "_" not in name:
        raise ConfigError(
            f"labels='filename' needs file names like CLASS_anything.png, but {relpath!r} has no '_'; "
            "rename it or use labels='subdir' or 'none'"
        )
    return name.split("_")[0]


def infer_label_mode(relpaths: list[str]) -> str:
    """How a folder's layout labels its images (``labels="auto"``): "subdir" when every image lies in a class
    sub-directory (dir/<class>/...: the ImageNet / torchvision layout), else "filename" when every file name has
    a class prefix (dir/<class>_<anything>.png: guided-diffusion's convention), else "none" (unlabeled)."""
    if relpaths and all("/" in p for p in relpaths):
        return "subdir"
    if relpaths and all("_" in p.rsplit("/", 1)[-1] for p in relpaths):
        return "filename"
    return "none"


def scan_image_folder(root: str, labels: str) -> dict:
    """
    Find the images under ``root`` (recursively), probe each and label it.

    :param labels: "auto", "subdir", "filename" or "none" (see :class:`ImageFolder`).
    :return: a JSON-ready dict with keys dir, labels (as asked), label_mode (as applied), files ([relpath, class
        name, width, height] per usable image) and skipped ([relpath, reason] per unusable one).
    """
    relpaths = _list_images(root)
    mode = infer_label_mode(relpaths) if labels == "auto" else labels
    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        # Probing is mostly waiting on the file system, so threads overlap it well.
        probes = list(pool.map(_probe, [os.path.join(root, p) for p in relpaths]))
    files, skipped = [], []
    for relpath, probe in zip(relpaths, probes):
        if isinstance(probe, str):
            skipped.append([relpath, probe])
        else:
            files.append([relpath, _class_of(relpath, mode), probe[0], probe[1]])
    return {
        "version": _CACHE_VERSION,
        "dir": root,
        "labels": labels,
        "label_mode": mode,
        "files": files,
        "skipped": skipped,
    }


def _cache_path(cache_dir: str, root: str, labels: str) -> str:
    key = hashlib.sha1(f"{root}\n{labels}".encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"image_folder_{key}.json")


def _read_cache(path: str, root: str, labels: str) -> dict | None:
    try:
        with open(path) as f:
            scan = json.load(f)
    except (OSError, ValueError):
        return None
    if scan.get("version") != _CACHE_VERSION or scan.get("dir") != root or scan.get("labels") != labels:
        return None
    return scan


def _write_cache(path: str, scan: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # Several ranks may scan at once: write aside, then rename, so nobody reads half a file.
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(scan, f)
    os.replace(tmp, path)


class ImageFolder(Dataset):
    """
    Every image under a directory, preprocessed as openai/guided-diffusion does.

    Files with the extensions in IMAGE_EXTENSIONS (any case) are found recursively. Labels come from the
    top-level sub-directory ("subdir", the ImageNet / torchvision layout), from the file-name prefix before the
    first ``_`` ("filename", the reference's convention), or not at all ("none"); "auto" (the default) picks the
    one the folder's layout follows (:func:`infer_label_mode`). Sorted class names give the class indices.

    Bad files are caught twice. At scan time each file's header is parsed and verified (this catches
    zero-byte, non-image and most corrupt files cheaply); at load time a file whose body fails to decode
    (a truncated JPEG) is replaced by the next usable file in the list, so the dataset length and hence
    the loader's sharding never change. With on_error="raise" either case raises an error naming the file.
    ``skipped`` lists [path, reason] for every file skipped: all scan-time ones, plus the load-time ones met
    in this process (DataLoader workers report theirs in their own log warnings).

    The scan (file list, labels, image sizes, bad files) is stored as JSON in ``cache_dir`` when one is
    given, so a restarted run does not walk the directory again; delete the file to force a rescan.

    :param dir: directory to search.
    :param image_size: side of the square crops.
    :param channels: 3 for RGB, 1 for grayscale.
    :param labels: "auto", "subdir", "filename" or "none".
    :param random_crop: random-resized crop instead of the center crop.
    :param random_flip: mirror left-right with probability 1/2.
    :param on_error: "skip" or "raise" for unreadable files.
    :param cache_dir: where to store the scan, e.g. the run directory; None to rescan every time.
    :param val_dir: a folder of held-out images in the same layout (the reference's ``val_data_dir``), read by
        :meth:`held_out` with center crops and no flips; None: no held-out data.
    """

    def __init__(
        self,
        dir: str,
        image_size: int,
        channels: int = 3,
        labels: str = "auto",
        random_crop: bool = False,
        random_flip: bool = True,
        on_error: str = "skip",
        cache_dir: str | None = None,
        val_dir: str | None = None,
    ) -> None:
        _check_image_size(image_size)
        _check_channels(channels)
        check_choice("data.labels", labels, LABEL_MODES)
        check_choice("data.on_error", on_error, ON_ERROR_MODES)
        self.root = os.path.abspath(os.path.expanduser(str(dir)))
        self.image_size = image_size
        self.channels = channels
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.on_error = on_error
        self.cache_dir = cache_dir
        self.val_dir = val_dir
        scan = self._scan(labels, cache_dir)
        self._apply_scan(scan, labels)

    def held_out(self) -> ImageFolder | None:
        """The images of ``val_dir`` (center-cropped, not flipped), labelled with this set's class indices;
        None without a ``val_dir``.

        :raises ConfigError: when ``val_dir`` holds a class this set does not have.
        """
        if not self.val_dir:
            return None
        val = ImageFolder(
            self.val_dir,
            self.image_size,
            self.channels,
            labels=self.label_mode,  # read as the training folder was, whatever its own layout suggests
            random_crop=False,
            random_flip=False,
            on_error=self.on_error,
            cache_dir=self.cache_dir,
        )
        if val.class_names == self.class_names:
            return val
        unknown = [c for c in val.class_names if c not in self.class_names]
        if unknown:
            raise ConfigError(
                f"data.val_dir={self.val_dir} has {len(unknown)} classes that data.dir does not "
                f"({', '.join(unknown[:5])}): the held-out images must use the training classes' names"
            )
        # A held-out folder with fewer classes: index its labels by the training classes' names.
        index_of = {name: i for i, name in enumerate(self.class_names)}
        val.labels = [index_of[val.class_names[label]] for label in val.labels]
        val.class_names, val.num_classes = list(self.class_names), self.num_classes
        return val

    def _scan(self, labels: str, cache_dir: str | None) -> dict:
        if not os.path.isdir(self.root):
            raise ConfigError(
                f"ImageFolder dir does not exist or is not a directory: looked at {self.root!r} for images "
                f"with extensions {', '.join(IMAGE_EXTENSIONS)} (any case)"
            )
        cache = _cache_path(cache_dir, self.root, labels) if cache_dir else None
        scan = _read_cache(cache, self.root, labels) if cache else None
        if scan is None:
            scan = scan_image_folder(self.root, labels)
            if cache:
                _write_cache(cache, scan)
        return scan

    def _apply_scan(self, scan: dict, labels: str) -> None:
        if not scan["files"] and not scan["skipped"]:
            raise ConfigError(
                f"ImageFolder found no images under {self.root!r} (searched recursively for extensions "
                f"{', '.join(IMAGE_EXTENSIONS)}, any case)"
            )
        self.skipped = [[os.path.join(self.root, p), reason] for p, reason in scan["skipped"]]
        if self.skipped and self.on_error == "raise":
            path, reason = self.skipped[0]
            raise ConfigError(f"unreadable image {path!r} ({reason}); pass on_error='skip' to leave it out")
        if not scan["files"]:
            raise ConfigError(f"all {len(self.skipped)} image files under {self.root!r} are unreadable")
        if self.skipped:
            log.warning(
                "ImageFolder skipped %d unreadable file(s) under %s: %s",
                len(self.skipped),
                self.root,
                ", ".join(p for p, _ in self.skipped[:10]) + (" ..." if len(self.skipped) > 10 else ""),
            )
        self.files = [os.path.join(self.root, f[0]) for f in scan["files"]]
        names = [f[1] for f in scan["files"]]
        self.label_mode = scan["label_mode"]
        self.class_names = sorted(set(names)) if self.label_mode != "none" else []
        self.num_classes = len(self.class_names)
        index_of = {name: i for i, name in enumerate(self.class_names)}
        self.labels = [index_of.get(name, 0) for name in names]
        self.num_upsampled = sum(min(f[2], f[3]) < self.image_size for f in scan["files"])
        if self.num_upsampled:
            log.warning(
                "ImageFolder: %d of %d images under %s are smaller than image_size=%d and will be upsampled",
                self.num_upsampled,
                len(self.files),
                self.root,
                self.image_size,
            )

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, path: str) -> Image.Image:
        with Image.open(path) as image:
            image.load()  # decodes the body: a truncated file fails here, not at scan time
            return to_channels(image, self.channels)

    def _decode_or_substitute(self, index: int) -> tuple[Image.Image, int]:
        """Decode file ``index``, or (on_error="skip") the first decodable file after it, wrapping around."""
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                return self._decode(self.files[i]), i
            except Exception as error:  # whatever PIL raises, the file is unusable
                if self.on_error == "raise":
                    raise ConfigError(f"unreadable image {self.files[i]!r}: {error}") from error
                self._report_load_failure(self.files[i], error)
        raise ConfigError(f"no image under {self.root!r} could be decoded")

    def _report_load_failure(self, path: str, error: Exception) -> None:
        if all(p != path for p, _ in self.skipped):
            self.skipped.append([path, f"{type(error).__name__}: {error}"])
            log.warning("ImageFolder skipped unreadable image %s (%s)", path, error)

    def load(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """
        :param index: which file.
        :param rng: the source of crop and flip randomness.
        :return: (x, y): a float32 [C x image_size x image_size] Tensor in [-1, 1] and an int64 label.
        """
        image, used = self._decode_or_substitute(index)
        if self.random_crop:
            arr = random_crop(image, self.image_size, rng)
        else:
            arr = center_crop(image, self.image_size)
        if self.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return _to_tensor(arr), _label(self.labels[used])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(index, np.random.default_rng())


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10


class CIFAR10(Dataset):
    """
    CIFAR-10 from the python batches in a local ``root``, read by ``torchvision.datasets.CIFAR10`` (which checks
    the files' checksums and never downloads here).

    :param root: folder that contains ``cifar-10-batches-py`` (or that folder itself).
    :param image_size: side of the output; 32 is native, others are resized bilinearly.
    :param channels: 3 for RGB, 1 for grayscale (ITU-R 601 luma, as PIL's "L").
    :param train: the 50,000 training images, or the 10,000 test images.
    :param random_flip: mirror left-right with probability 1/2.
    """

    FOLDER = "cifar-10-batches-py"

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        channels: int = 3,
        train: bool = True,
        random_flip: bool = True,
    ) -> None:
        from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

        _check_image_size(image_size)
        _check_channels(channels)
        root = os.path.abspath(os.path.expanduser(str(root)))
        if os.path.basename(root) == self.FOLDER:
            root = os.path.dirname(root)
        try:
            batches = TorchvisionCIFAR10(root, train=train, download=False)
        except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
            raise DatasetNotFoundError(
                f"CIFAR-10 not found or corrupted ({e}): expected {os.path.join(root, self.FOLDER)}/ holding "
                "data_batch_1..5, test_batch and batches.meta. Download cifar-10-python.tar.gz from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html and run `tar -xzf cifar-10-python.tar.gz -C {root}` "
                "(this dataset never downloads by itself)"
            ) from None
        self.images = torch.from_numpy(batches.data).permute(
            0, 3, 1, 2
        )  # uint8 (N, 3, 32, 32), decoded per item
        self.targets = torch.tensor(batches.targets, dtype=torch.int64)
        self.class_names = list(batches.classes)
        self.num_classes = len(self.class_names)
        self.root = root
        self.train = train
        self.image_size = image_size
        self.channels = channels
        self.random_flip = random_flip

    def held_out(self) -> CIFAR10 | None:
        """The 10,000 test images (not flipped) for a training set; None for the test set itself."""
        if not self.train:
            return None
        return CIFAR10(self.root, self.image_size, self.channels, train=False, random_flip=False)

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """
        :param index: which image.
        :param rng: the source of flip randomness.
        :return: (x, y): a float32 [C x image_size x image_size] Tensor in [-1, 1] and an int64 label.
        """
        x = self.images[index].float()  # (3, 32, 32), 0..255
        if self.channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
        x = _resize(x[None] / 127.5 - 1.0, self.image_size)[0].clamp(-1.0, 1.0)
        if self.random_flip and rng.random() < 0.5:
            x = x.flip(-1)
        return x, _label(int(self.targets[index]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(index, np.random.default_rng())


# ---------------------------------------------------------------------------------------------------------
# The loader


class SeededItems(Dataset):
    """Items of a dataset, each augmented (crop, flip) by its own generator seeded with (*seed, [epoch,] index):
    an item is the same whichever worker loads it, or when, and in every run.

    :param seed: the leading keys of every item's generator, e.g. (run seed,); () for (index,) alone.
    :param indices: the dataset indices to serve, in order (None: all of them); item i is ``indices[i]``.

    An item is asked for by position ``i`` or by ``(epoch, i)`` (the training loader's keys). A dataset without
    ``load(index, rng)`` is served as it is (its own augmentation, if any, is not controlled).
    """

    def __init__(self, dataset: Dataset, seed: tuple[int, ...] = (), indices=None) -> None:
        self.dataset, self.seed = dataset, tuple(int(s) for s in seed)
        self.indices = None if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]):
        *epoch, i = key if isinstance(key, tuple) else (key,)
        index = int(i) if self.indices is None else self.indices[int(i)]
        load = getattr(self.dataset, "load", None)
        if load is None:
            return self.dataset[index]
        return load(index, np.random.default_rng([*self.seed, *epoch, index]))


class InfiniteLoader:
    """
    Endless iterator of (x, y) batches for one rank.

    Each epoch is a permutation of the dataset fixed by (seed, epoch), cut like DistributedSampler with
    drop_last (the first ``len // world_size * world_size`` indices, every world_size-th from ``rank``) and
    batched with drop_last, so every rank takes the same number of equal batches. DataLoader workers decode
    in parallel; they live as long as the iterator, which never ends, so they persist across epochs.

    :param dataset: a Dataset; if it has ``load(index, rng)`` its augmentation is reproducible.
    :param batch_size: items per batch on this rank.
    :param rank: this process's rank.
    :param world_size: number of ranks.
    :param seed: fixes the order and the augmentation.
    :param num_workers: DataLoader worker processes (0 decodes in the main process).
    :param pin_memory: page-lock batches for faster host-to-GPU copies.
    :param shuffle: False keeps dataset order in every epoch (augmentation still varies by epoch).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        shuffle: bool = True,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        per_rank = len(dataset) // world_size
        if not 1 <= batch_size <= per_rank:
            raise ConfigError(
                f"batch_size must be in [1, {per_rank}] (the {len(dataset)} items split over "
                f"{world_size} rank(s)), got {batch_size}"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.shuffle = shuffle
        self.batches_per_epoch = per_rank // batch_size
        self._epoch = 0
        self._batch = 0

    def shard_indices(self, epoch: int) -> np.ndarray:
        """This rank's dataset indices for ``epoch``, in order (before batching)."""
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        usable = n // self.world_size * self.world_size
        return order[:usable][self.rank :: self.world_size]

    def _batches(self, epoch: int, start: int) -> Iterator[list[tuple[int, int]]]:
        """Keys of every batch from (epoch, start) on, forever."""
        while True:
            indices = self.shard_indices(epoch)
            for b in range(start, self.batches_per_epoch):
                chunk = indices[b * self.batch_size : (b + 1) * self.batch_size]
                yield [(epoch, int(i)) for i in chunk]
            epoch, start = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) batches forever, from the position in ``state_dict()``: x an [N x C x H x W] float
        Tensor, y an [N] int64 Tensor. Only one iterator should be live at a time: they share the position."""
        loader = DataLoader(
            SeededItems(self.dataset, (self.seed,)),
            batch_sampler=self._batches(self._epoch, self._batch),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # DataLoader draws a worker base seed each time it is iterated; a private generator keeps that
            # draw off the global torch RNG, which the training loop's noise depends on.
            generator=torch.Generator().manual_seed(self.seed),
        )
        for batch in loader:
            # Advance before yielding: state_dict() names the batch after the one just handed out.
            self._batch += 1
            if self._batch == self.batches_per_epoch:
                self._epoch, self._batch = self._epoch + 1, 0
            yield batch

    def state_dict(self) -> dict:
        """The position of the next batch: {"epoch": int, "batch": int}."""
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state`` on the next ``iter()``; skipped batches are never decoded."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ConfigError(
                f"loader state must have epoch >= 0 and batch in [0, {self.batches_per_epoch}), got {state}"
            )
        self._epoch, self._batch = epoch, batch
