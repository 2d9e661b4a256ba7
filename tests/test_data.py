"""Datasets and the loader, on real image files written to temporary folders."""

import io
import json
import logging
import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from diffusion.data import datasets as data
from diffusion.data.datasets import CIFAR10, Digits, ImageFolder, InfiniteLoader
from diffusion.errors import UserError


def _picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A [height x width x 3] uint8 picture with gradients, a rectangle and noise: structured enough that
    every resize and crop changes it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], -1)
    arr[height // 4 : height // 2, width // 3 : width // 2] = rng.integers(0, 256, 3)
    arr = arr + rng.integers(-20, 21, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _save(path, image: Image.Image, **kwargs) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, **kwargs)
    return str(path)


def _reference_resize(image: Image.Image, short_side: int) -> np.ndarray:
    """The reference resize, written out step by step with PIL: box-halve while both sides are at least
    twice the target, then bicubic to the target short side."""
    while image.size[0] >= 2 * short_side and image.size[1] >= 2 * short_side:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), Image.BOX)
    short = min(image.size)
    size = (round(image.size[0] * short_side / short), round(image.size[1] * short_side / short))
    return np.array(image.resize(size, Image.BICUBIC))


def _reference_center_crop(path: str, size: int) -> np.ndarray:
    arr = _reference_resize(Image.open(path).convert("RGB"), size)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def _pixels(x: torch.Tensor) -> np.ndarray:
    """[C x H x W] in [-1, 1] back to uint8 [H x W x C]; exact because x = p / 127.5 - 1."""
    return np.rint((x.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)


@pytest.fixture
def mixed_folder(tmp_path):
    """Three classes named by prefix, in several formats, modes, sizes and sub-directories."""
    root = tmp_path / "images"
    _save(root / "cat_001.png", Image.fromarray(_picture(300, 200, 1)))
    _save(root / "cat_002.jpg", Image.fromarray(_picture(64, 48, 2)), quality=95)
    _save(root / "dog_a.webp", Image.fromarray(_picture(50, 70, 3)))
    _save(root / "dog_b.bmp", Image.fromarray(_picture(40, 40, 4)).convert("L"))
    _save(root / "sub" / "bird_1.gif", Image.fromarray(_picture(45, 33, 5)).convert("P"))
    _save(root / "sub" / "deep" / "bird_2.PNG", Image.fromarray(_picture(33, 45, 6)).convert("RGBA"))
    _save(root / "sub" / "bird_3.jpeg", Image.fromarray(_picture(20, 12, 7)))  # smaller than 16 on one side
    (root / "notes.txt").write_text("not an image and not an image extension")
    return root


# ---------------------------------------------------------------------------------------------------------
# Digits


def test_digits_are_the_real_scikit_learn_images_scaled_to_minus_one_one():
    ds = Digits()
    reference = load_digits()
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.class_names == [str(d) for d in range(10)]
    for i in (0, 500, 1796):
        x, y = ds[i]
        assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        np.testing.assert_allclose(x[0].numpy(), reference.images[i] / 8.0 - 1.0, atol=1e-6)
        assert int(y) == reference.target[i]
    assert np.bincount(ds.targets.numpy()).tolist() == np.bincount(reference.target).tolist()


def test_digits_resize_and_rgb():
    ds = Digits(image_size=16, channels=3)
    x, _ = ds[7]
    assert x.shape == (3, 16, 16) and ds.image_size == 16 and ds.channels == 3
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    # Upsampling keeps the mean brightness of the glyph (bilinear interpolation, no blur towards black).
    assert abs(float(x.mean()) - float(Digits()[7][0].mean())) < 0.05


def test_digits_are_never_flipped():
    ds = Digits()
    for seed in range(10):
        x, _ = ds.load(3, np.random.default_rng(seed))
        assert torch.equal(x, ds.images[3])


@pytest.mark.parametrize("kwargs", [{"image_size": 0}, {"image_size": 8.5}, {"channels": 2}])
def test_digits_reject_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="image_size|channels"):
        Digits(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# ImageFolder: labels, shapes, modes


def test_image_folder_labels_from_file_name_prefix(mixed_folder):
    ds = ImageFolder(str(mixed_folder), image_size=16, random_flip=False)
    assert ds.class_names == ["bird", "cat", "dog"] and ds.num_classes == 3
    assert len(ds) == 7  # notes.txt is ignored, every image extension in any case is found
    by_name = {os.path.basename(f): ds.labels[i] for i, f in enumerate(ds.files)}
    assert by_name == {
        "bird_1.gif": 0,
        "bird_2.PNG": 0,
        "bird_3.jpeg": 0,
        "cat_001.png": 1,
        "cat_002.jpg": 1,
        "dog_a.webp": 2,
        "dog_b.bmp": 2,
    }
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert y.dtype == torch.int64 and int(y) == ds.labels[i]


def test_image_folder_grayscale_and_unlabeled(mixed_folder):
    ds = ImageFolder(str(mixed_folder), image_size=8, channels=1, labels="none")
    assert ds.num_classes == 0 and ds.class_names == []
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (1, 8, 8) and int(y) == 0


def test_image_folder_labels_from_sub_directories(tmp_path):
    for name, seed in [("zebra", 1), ("ant", 2), ("ant", 3)]:
        _save(tmp_path / name / f"img{seed}.png", Image.fromarray(_picture(20, 20, seed)))
    _save(tmp_path / "ant" / "nested" / "img9.jpg", Image.fromarray(_picture(20, 20, 9)))
    ds = ImageFolder(str(tmp_path), image_size=8, labels="subdir")
    assert ds.class_names == ["ant", "zebra"]
    assert sorted(ds.labels) == [0, 0, 0, 1]
    assert [int(ds[i][1]) for i in range(len(ds))] == ds.labels


def test_labels_auto_follow_the_folder_layout(tmp_path):
    # ImageNet's layout: class folders whose files also carry the class as a prefix; the folder wins.
    for name, seed in [("n02", 1), ("n01", 2), ("n01", 3)]:
        _save(tmp_path / "net" / name / f"{name}_{seed}.png", Image.fromarray(_picture(20, 20, seed)))
    imagenet = ImageFolder(str(tmp_path / "net"), image_size=8)
    assert imagenet.label_mode == "subdir" and imagenet.class_names == ["n01", "n02"]
    # guided-diffusion's layout: one folder, the class before the first underscore.
    for name, seed in [("cat", 1), ("dog", 2)]:
        _save(tmp_path / "flat" / f"{name}_{seed}.png", Image.fromarray(_picture(20, 20, seed)))
    flat = ImageFolder(str(tmp_path / "flat"), image_size=8)
    assert flat.label_mode == "filename" and flat.class_names == ["cat", "dog"]
    # Neither (a loose file beside a folder, a name without a prefix): unlabeled.
    _save(tmp_path / "flat" / "sub" / "x.png", Image.fromarray(_picture(20, 20, 5)))
    _save(tmp_path / "flat" / "nounderscore.png", Image.fromarray(_picture(20, 20, 6)))
    plain = ImageFolder(str(tmp_path / "flat"), image_size=8)
    assert plain.label_mode == "none" and plain.num_classes == 0 and len(plain) == 4


def test_labels_that_cannot_be_read_are_an_error(tmp_path):
    _save(tmp_path / "nounderscore.png", Image.fromarray(_picture(20, 20)))
    with pytest.raises(ValueError, match="nounderscore.png.*labels='subdir' or 'none'"):
        ImageFolder(str(tmp_path), image_size=8, labels="filename")
    with pytest.raises(ValueError, match="sub-directory"):
        ImageFolder(str(tmp_path), image_size=8, labels="subdir")
    assert len(ImageFolder(str(tmp_path), image_size=8, labels="none")) == 1


def test_center_crop_matches_the_reference_pixel_for_pixel(mixed_folder):
    ds = ImageFolder(str(mixed_folder), image_size=32, random_flip=False)
    for i, path in enumerate(ds.files):
        if Image.open(path).mode in ("RGB", "L"):  # modes where plain convert("RGB") is the reference
            assert np.array_equal(_pixels(ds[i][0]), _reference_center_crop(path, 32)), path
    # The large picture exercises the box-halving loop twice (300x200 -> 150x100 -> 75x50).
    large = ds.files.index(str(mixed_folder / "cat_001.png"))
    assert np.array_equal(_pixels(ds[large][0]), _reference_center_crop(ds.files[large], 32))


def test_random_flip_mirrors_the_center_crop(mixed_folder):
    plain = ImageFolder(str(mixed_folder), image_size=16, random_flip=False)
    flipping = ImageFolder(str(mixed_folder), image_size=16, random_flip=True)
    x = plain[0][0]
    seen = set()
    for seed in range(20):
        y = flipping.load(0, np.random.default_rng(seed))[0]
        assert torch.equal(y, x) or torch.equal(y, x.flip(-1))
        seen.add(torch.equal(y, x))
    assert seen == {True, False}


def test_random_crop_is_a_window_of_an_image_resized_to_a_short_side_in_range(tmp_path):
    path = _save(tmp_path / "a_1.png", Image.fromarray(_picture(50, 40, 11)))
    size = 16
    ds = ImageFolder(str(tmp_path), image_size=size, random_crop=True, random_flip=False)
    image = Image.open(path).convert("RGB")
    candidates = []  # every window of every allowed resize, short side in [16, ceil(1.25 * 16) = 20]
    for short in range(size, math.ceil(1.25 * size) + 1):
        arr = _reference_resize(image, short)  # halves 50x40 to 25x20 first
        for top in range(arr.shape[0] - size + 1):
            for left in range(arr.shape[1] - size + 1):
                candidates.append(arr[top : top + size, left : left + size])
    crops = [_pixels(ds.load(0, np.random.default_rng(s))[0]) for s in range(12)]
    for crop in crops:
        assert any(np.array_equal(crop, c) for c in candidates)
    assert len({c.tobytes() for c in crops}) > 6  # the crops really vary
    again = _pixels(ds.load(0, np.random.default_rng(5))[0])
    assert np.array_equal(again, crops[5])  # and are a function of the generator only


def test_sixteen_bit_and_transparent_images_convert_sensibly(tmp_path):
    gray16 = np.full((20, 20), 128 * 257, dtype=np.uint16)
    _save(tmp_path / "a_16bit.png", Image.fromarray(gray16))
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent: shows the white background
    _save(tmp_path / "b_transparent.png", Image.fromarray(rgba, "RGBA"))
    la = np.stack([np.full((20, 20), 10, np.uint8), np.full((20, 20), 255, np.uint8)], -1)
    _save(tmp_path / "c_opaque_la.png", Image.fromarray(la, "LA"))
    assert Image.open(tmp_path / "a_16bit.png").mode.startswith("I")
    ds = ImageFolder(str(tmp_path), image_size=8, random_flip=False)
    expected = {"a_16bit.png": 128, "b_transparent.png": 255, "c_opaque_la.png": 10}
    for i, path in enumerate(ds.files):
        assert np.all(_pixels(ds[i][0]) == expected[os.path.basename(path)]), path


def test_small_images_are_upsampled_and_warned_about_once(mixed_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="diffusion.data.datasets"):
        ds = ImageFolder(str(mixed_folder), image_size=16)
        for i in range(len(ds)):
            assert ds[i][0].shape == (3, 16, 16)
    warnings = [r for r in caplog.records if "smaller than image_size" in r.getMessage()]
    assert len(warnings) == 1 and ds.num_upsampled == 1  # bird_3.jpeg is 20x12
    assert ImageFolder(str(mixed_folder), image_size=8).num_upsampled == 0


# ---------------------------------------------------------------------------------------------------------
# ImageFolder: bad input


@pytest.fixture
def folder_with_bad_files(tmp_path):
    root = tmp_path / "bad"
    for i in range(6):
        _save(root / f"ok_{i}.png", Image.fromarray(_picture(24, 24, i)))
    (root / "zero_bytes.png").write_bytes(b"")
    (root / "text_pretending.jpg").write_text("hello, I am not a JPEG")
    png = io.BytesIO()
    Image.fromarray(_picture(24, 24, 99)).save(png, "PNG")
    corrupt = bytearray(png.getvalue())
    corrupt[len(corrupt) // 2] ^= 0xFF  # damages the pixel data: the chunk checksum no longer matches
    (root / "corrupt_body.png").write_bytes(bytes(corrupt))
    jpeg = io.BytesIO()
    Image.fromarray(_picture(64, 64, 98)).save(jpeg, "JPEG")
    (root / "truncated_end.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    return root


def test_bad_files_are_skipped_and_reported(folder_with_bad_files, caplog):
    root = folder_with_bad_files
    with caplog.at_level(logging.WARNING, logger="diffusion.data.datasets"):
        ds = ImageFolder(str(root), image_size=8)
    scan_time = {"zero_bytes.png", "text_pretending.jpg", "corrupt_body.png"}
    assert {os.path.basename(p) for p, _ in ds.skipped} == scan_time
    assert all(reason for _, reason in ds.skipped)
    assert any("skipped 3 unreadable" in r.getMessage() for r in caplog.records)
    assert len(ds) == 7  # six good files and the truncated JPEG, whose header is fine
    # Load time: the truncated body is found, reported, and replaced by the next usable file.
    truncated = ds.files.index(str(root / "truncated_end.jpg"))
    x, y = ds.load(truncated, np.random.default_rng(0))
    substitute = (truncated + 1) % len(ds)
    x_sub, y_sub = ds.load(substitute, np.random.default_rng(0))
    assert torch.equal(x, x_sub) and int(y) == int(y_sub)
    assert "truncated_end.jpg" in {os.path.basename(p) for p, _ in ds.skipped}
    # Training over a whole epoch works.
    loader = InfiniteLoader(ds, batch_size=3)
    batches = [b for b, _ in zip(loader, range(loader.batches_per_epoch * 2))]
    assert all(x.shape == (3, 3, 8, 8) and torch.isfinite(x).all() for x, _ in batches)


def test_bad_files_raise_when_asked(folder_with_bad_files):
    with pytest.raises(ValueError, match=r"corrupt_body\.png.*on_error='skip'"):
        ImageFolder(str(folder_with_bad_files), image_size=8, on_error="raise")
    for name in ("zero_bytes.png", "text_pretending.jpg", "corrupt_body.png"):
        os.remove(folder_with_bad_files / name)
    ds = ImageFolder(str(folder_with_bad_files), image_size=8, on_error="raise")
    truncated = ds.files.index(str(folder_with_bad_files / "truncated_end.jpg"))
    with pytest.raises(ValueError, match="truncated_end.jpg"):
        ds[truncated]


def test_missing_or_empty_directories_say_where_and_what(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'nope'}.*jpg, jpeg, png, gif, webp, bmp"):
        ImageFolder(str(tmp_path / "nope"), image_size=8)
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"no images under '{tmp_path}'.*jpg, jpeg, png, gif, webp, bmp"):
        ImageFolder(str(tmp_path), image_size=8)
    (tmp_path / "a_0.png").write_bytes(b"")
    with pytest.raises(ValueError, match="all 1 image files .* unreadable"):
        ImageFolder(str(tmp_path), image_size=8)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"labels": "folder"}, "labels"), ({"on_error": "ignore"}, "on_error"), ({"channels": 4}, "channels")],
)
def test_image_folder_rejects_bad_options(mixed_folder, kwargs, name):
    with pytest.raises(ValueError, match=name):
        ImageFolder(str(mixed_folder), image_size=8, **kwargs)


def test_scan_is_cached_and_reused(mixed_folder, tmp_path, monkeypatch):
    cache_dir = tmp_path / "run"
    ds = ImageFolder(str(mixed_folder), image_size=8, cache_dir=str(cache_dir))
    (cache_file,) = cache_dir.iterdir()
    cached = json.loads(cache_file.read_text())
    assert (
        cached["dir"] == str(mixed_folder)
        and cached["labels"] == "auto"
        and cached["label_mode"] == "filename"
    )
    assert [os.path.join(cached["dir"], f[0]) for f in cached["files"]] == ds.files
    assert [f[1] for f in cached["files"]] == ["cat", "cat", "dog", "dog", "bird", "bird", "bird"]

    def no_rescan(*args):
        raise AssertionError("the cached scan should have been used")

    monkeypatch.setattr(data, "scan_image_folder", no_rescan)
    again = ImageFolder(str(mixed_folder), image_size=8, cache_dir=str(cache_dir))
    assert again.files == ds.files and again.labels == ds.labels
    # A cache for another labelling is a different file, so it does not answer for this one.
    with pytest.raises(AssertionError, match="cached scan"):
        ImageFolder(str(mixed_folder), image_size=8, labels="none", cache_dir=str(cache_dir))
    monkeypatch.undo()
    cache_file.write_text("{ not json")  # a damaged cache is rebuilt
    assert ImageFolder(str(mixed_folder), image_size=8, cache_dir=str(cache_dir)).files == ds.files
    assert json.loads(cache_file.read_text())["files"] == cached["files"]


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_cifar(folder, images_per_batch: int = 4) -> dict:
    """Write the python-batch layout: data_batch_1..5 and test_batch (uint8 [N x 3072], labels) and
    batches.meta, pickled with str keys as the original files read in Python 3 (encoding latin1)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, images_per_batch).tolist()
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": pixels, "labels": labels}, f)
        written[name] = (pixels, labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES}, f)
    return written


@pytest.fixture
def unchecked_cifar(monkeypatch):
    """torchvision checks the real files' MD5 sums; these test batches have their own bytes."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)


def test_cifar10_reads_local_batches_exactly(tmp_path, unchecked_cifar):
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    train = CIFAR10(str(tmp_path), random_flip=False)
    test = CIFAR10(str(tmp_path), train=False, random_flip=False)
    assert len(train) == 20 and len(test) == 4
    assert train.class_names == CIFAR10_CLASSES and train.num_classes == 10
    pixels, labels = written["data_batch_2"]
    x, y = train[5]  # second image of the second batch
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, torch.from_numpy(pixels[1].reshape(3, 32, 32)).float() / 127.5 - 1)
    assert int(y) == labels[1]
    assert int(test[3][1]) == written["test_batch"][1][3]


def test_cifar10_resize_grayscale_and_flip(tmp_path, unchecked_cifar):
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    root = tmp_path / "cifar-10-batches-py"  # root may be the batches folder itself
    ds = CIFAR10(str(root), image_size=16, channels=1, random_flip=True)
    x, _ = ds.load(0, np.random.default_rng(0))
    assert x.shape == (1, 16, 16) and -1 <= float(x.min()) and float(x.max()) <= 1
    rgb = written["data_batch_1"][0][0].reshape(3, 32, 32).astype(np.float64)
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    native = CIFAR10(str(root), channels=1, random_flip=False)[0][0]
    np.testing.assert_allclose(native[0].numpy(), luma / 127.5 - 1, atol=1e-5)
    assert abs(float(x.mean()) - float(native.mean())) < 2e-3  # shrinking keeps the mean brightness
    flips = {torch.equal(ds.load(0, np.random.default_rng(s))[0], x) for s in range(16)}
    assert flips == {True, False}


def test_cifar10_absent_or_corrupt_says_where_to_put_it(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=f"not found or corrupted .*{tmp_path}/cifar-10-batches-py.*data_batch_1"
    ):
        CIFAR10(str(tmp_path))
    _write_cifar(tmp_path / "cifar-10-batches-py")  # files whose checksums are not CIFAR-10's
    with pytest.raises(UserError, match="not found or corrupted"):
        CIFAR10(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# InfiniteLoader


class Traced(torch.utils.data.Dataset):
    """Item i is [i, a draw from the augmentation generator]; counts how many items were decoded."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.loads = 0

    def __len__(self) -> int:
        return self.n

    def load(self, index: int, rng: np.random.Generator):
        self.loads += 1
        return torch.tensor([float(index), rng.random()]), index


def _take(loader, count: int) -> list:
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


def test_two_ranks_get_disjoint_shards_that_cover_the_epoch():
    ds = Traced(10)
    ranks = [InfiniteLoader(ds, batch_size=2, rank=r, world_size=2, seed=7) for r in range(2)]
    for epoch in range(3):
        shards = [set(loader.shard_indices(epoch).tolist()) for loader in ranks]
        assert len(shards[0]) == len(shards[1]) == 5
        assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(10))
    assert not np.array_equal(ranks[0].shard_indices(0), ranks[0].shard_indices(1))  # reshuffled per epoch
    # An odd dataset drops one item (like DistributedSampler(drop_last=True)) so shards stay equal.
    odd = [InfiniteLoader(Traced(11), batch_size=2, rank=r, world_size=2) for r in range(2)]
    a, b = (set(loader.shard_indices(0).tolist()) for loader in odd)
    assert len(a) == len(b) == 5 and a.isdisjoint(b) and len(a | b) == 10


def test_batches_follow_the_shard_epoch_after_epoch_with_drop_last():
    loader = InfiniteLoader(Traced(10), batch_size=3, rank=1, world_size=2, seed=1)
    assert loader.batches_per_epoch == 1  # 5 items per rank, batches of 3, the last 2 are dropped
    batches = _take(loader, 3)
    for epoch, (x, y) in enumerate(batches):
        assert y.tolist() == loader.shard_indices(epoch)[:3].tolist()
        assert x[:, 0].long().tolist() == y.tolist() and y.dtype == torch.int64
    assert loader.state_dict() == {"epoch": 3, "batch": 0}


def test_order_depends_on_seed_and_shuffle():
    first = InfiniteLoader(Traced(50), batch_size=50, seed=0).shard_indices(0)
    assert sorted(first.tolist()) == list(range(50))
    assert not np.array_equal(first, InfiniteLoader(Traced(50), batch_size=50, seed=1).shard_indices(0))
    fixed = InfiniteLoader(Traced(50), batch_size=10, shuffle=False)
    assert fixed.shard_indices(3).tolist() == list(range(50))


def test_resume_continues_the_identical_sequence_without_decoding_skipped_items():
    reference = _take(InfiniteLoader(Traced(20), batch_size=4, seed=3), 12)  # 5 batches per epoch
    for stop in (3, 5, 7):  # mid-epoch, at an epoch boundary, in the second epoch
        first = InfiniteLoader(Traced(20), batch_size=4, seed=3)
        assert _same(_take(first, stop), reference[:stop])
        state = first.state_dict()
        assert state == {"epoch": stop // 5, "batch": stop % 5}
        dataset = Traced(20)
        resumed = InfiniteLoader(dataset, batch_size=4, seed=3)
        resumed.load_state_dict(state)
        assert _same(_take(resumed, 12 - stop), reference[stop:])
        assert dataset.loads == (12 - stop) * 4


def test_sequence_does_not_depend_on_workers(mixed_folder):
    ds = ImageFolder(str(mixed_folder), image_size=8, random_crop=True, random_flip=True)
    main = _take(InfiniteLoader(ds, batch_size=2, seed=5, num_workers=0), 6)
    workers = _take(InfiniteLoader(ds, batch_size=2, seed=5, num_workers=2), 6)
    assert _same(main, workers)
    crops = [x for x, _ in main]
    assert not all(torch.equal(crops[0][0], c[0]) for c in crops[1:])  # augmentation is active


def test_iterating_leaves_the_global_torch_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _take(InfiniteLoader(Traced(8), batch_size=2), 5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_size": 11}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2, "rank": 2, "world_size": 2}, "rank"),
        ({"batch_size": 2, "world_size": 0}, "world_size"),
        ({"batch_size": 2, "num_workers": -1}, "num_workers"),
        ({"batch_size": 2, "seed": -1}, "seed"),
    ],
)
def test_loader_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        InfiniteLoader(Traced(10), **kwargs)


def test_loader_rejects_a_state_outside_the_epoch():
    loader = InfiniteLoader(Traced(10), batch_size=2)
    with pytest.raises(ValueError, match="batch in"):
        loader.load_state_dict({"epoch": 0, "batch": 5})
