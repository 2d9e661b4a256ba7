"""The VAE loader, DiT's latent scaling and the latent cache, with a tiny random AutoencoderKL saved in diffusers'
format (no download: the real VAE is 8x with 4 latent channels; this one is 2x with 4)."""

import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from diffusion.data.datasets import Digits, InfiniteLoader
from diffusion.data.latent import LatentCacheMismatch, LatentDataset, build_latent_cache
from diffusion.models.dit import DiT
from diffusion.models.vae import (
    SCALE_FACTOR,
    LatentError,
    LatentVAE,
    VAENotFoundError,
    check_latent_channels,
    load_vae,
)


def save_tiny_vae(path, seed: int = 0, latent_channels: int = 4) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=8,
    )
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def other_vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae_other"), seed=1)


@pytest.fixture
def vae(vae_dir):
    return load_vae(vae_dir)


class Squares(Dataset):
    """A small in-memory labelled data set with the project's item contract and a random flip."""

    def __init__(self, n: int = 10, image_size: int = 8, seed: int = 0, random_flip: bool = True):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, image_size, image_size, generator=gen) * 2 - 1
        self.targets = torch.arange(n) % 3
        self.class_names = ["a", "b", "c"]
        self.num_classes = 3
        self.image_size = image_size
        self.channels = 3
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int, rng: np.random.Generator):
        x = self.images[index]
        if self.random_flip and rng.random() < 0.5:
            x = x.flip(-1)
        return x, self.targets[index]

    def __getitem__(self, index: int):
        return self.load(index, np.random.default_rng())


def count_encodes(vae: LatentVAE) -> list[int]:
    """Wrap the autoencoder's encode so that the test sees every call."""
    calls = [0]
    encode = vae.vae.encode

    def counted(*args, **kwargs):
        calls[0] += 1
        return encode(*args, **kwargs)

    vae.vae.encode = counted
    return calls


# ---------------------------------------------------------------------------------------------------------
# The VAE


def test_load_vae_from_a_directory(vae_dir):
    vae = load_vae(vae_dir)
    assert (vae.name, vae.image_channels, vae.latent_channels, vae.downsample) == (vae_dir, 3, 4, 2)
    assert vae.scale_factor == SCALE_FACTOR == 0.18215
    assert not vae.vae.training and not any(p.requires_grad for p in vae.vae.parameters())


def test_encode_decode_shapes_and_dits_scaling(vae):
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        dist = vae.vae.encode(x).latent_dist
        dits_latents = dist.sample(generator=torch.Generator().manual_seed(7)) * 0.18215
        dits_images = vae.vae.decode(dits_latents / 0.18215).sample
    z = vae.encode(x, generator=torch.Generator().manual_seed(7))
    assert z.shape == (2, 4, 4, 4)
    assert torch.allclose(z, dits_latents, rtol=1e-6, atol=1e-7)
    assert torch.allclose(vae.encode(x, sample=False), dist.mean * 0.18215)
    assert torch.equal(z, vae.encode(x, generator=torch.Generator().manual_seed(7)))  # reproducible
    images = vae.decode(z)
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
    assert torch.allclose(images, dits_images.clamp(-1, 1), rtol=1e-6, atol=1e-6)
    assert images.min() >= -1 and images.max() <= 1
    assert torch.allclose(vae.decode(z, batch_size=1), images, atol=1e-6)


def test_vae_input_errors(vae):
    with pytest.raises(LatentError, match="encodes \\[N, 3, H, W\\] images"):
        vae.encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(LatentError, match="not divisible by the VAE's downsampling factor 2"):
        vae.encode(torch.zeros(1, 3, 7, 7))
    with pytest.raises(LatentError, match="decodes \\[N, 4, h, w\\] latents"):
        vae.decode(torch.zeros(1, 3, 4, 4))


def test_missing_vae_directory_is_one_line(tmp_path):
    with pytest.raises(VAENotFoundError) as err:
        load_vae(str(tmp_path / "no_such_vae"))
    message = str(err.value)
    assert "\n" not in message
    assert "no_such_vae has no config.json" in message and "hf download stabilityai/sd-vae-ft-ema" in message


@pytest.mark.parametrize("name", ["stabilityai/sd-vae-ft-ema", "mse"])
def test_missing_hugging_face_vae_is_one_line(tmp_path, name):
    with pytest.raises(VAENotFoundError) as err:
        load_vae(name, cache_dir=str(tmp_path / "hf"))
    message = str(err.value)
    full = {"mse": "stabilityai/sd-vae-ft-mse"}.get(name, name)
    assert "\n" not in message
    assert f"`hf download {full}`" in message and str(tmp_path / "hf") in message


def test_latent_channels_must_match_the_model(vae):
    check_latent_channels(vae, 4)
    model = DiT(
        input_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=3
    )
    with pytest.raises(
        LatentError, match="makes 4-channel latents but model.in_channels=3: set model.in_channels=4"
    ):
        check_latent_channels(vae, model.in_channels)


def test_fingerprint_tells_vaes_apart(vae_dir, other_vae_dir):
    a, again, b = load_vae(vae_dir), load_vae(vae_dir), load_vae(other_vae_dir)
    assert a.fingerprint == again.fingerprint != b.fingerprint


# ---------------------------------------------------------------------------------------------------------
# The latent cache


def test_cache_is_written_once_and_reused(vae, tmp_path):
    data = Squares(n=10)
    calls = count_encodes(vae)
    cache = build_latent_cache(data, vae, tmp_path / "cache", batch_size=4)
    assert calls[0] == 3 * 2  # 3 batches, each encoded as is and mirrored (the data set flips)
    assert cache.flips and cache.random_flip
    again = build_latent_cache(data, vae, tmp_path / "cache", batch_size=4)
    assert calls[0] == 6  # reused, not re-encoded
    assert len(again) == 10
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # no temporary directory left behind


def test_cache_items_follow_the_dataset_contract(vae, tmp_path):
    data = Squares(n=6)
    cache = build_latent_cache(data, vae, tmp_path / "cache", batch_size=4)
    assert (cache.num_classes, cache.class_names, cache.image_size, cache.channels) == (
        3,
        ["a", "b", "c"],
        4,
        4,
    )
    assert cache.pixel_image_size == 8 and cache.vae_name == vae.name
    x, y = cache.load(5, np.random.default_rng(0))
    assert x.shape == (4, 4, 4) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.dim() == 0 and int(y) == 2
    # The same generator gives the same latent; another generator another posterior sample.
    assert torch.equal(x, cache.load(5, np.random.default_rng(0))[0])
    assert not torch.equal(x, cache.load(5, np.random.default_rng(1))[0])
    # Both views hold the encoded image: as is, and mirrored before encoding (not the mirrored latent).
    means = LatentDataset(tmp_path / "cache", sample=False)
    unflipped = vae.encode(data.images[:6], sample=False)
    flipped = vae.encode(data.images[:6].flip(-1), sample=False)
    seen = {0: 0, 1: 0}
    for seed in range(40):
        latent = means.load(3, np.random.default_rng(seed))[0]
        view = 1 if torch.allclose(latent, flipped[3], atol=1e-6) else 0
        assert torch.allclose(latent, (flipped if view else unflipped)[3], atol=1e-6)
        seen[view] += 1
    assert seen[0] > 5 and seen[1] > 5
    assert not torch.allclose(unflipped[3].flip(-1), flipped[3], atol=1e-3)
    # The samples are DiT's: (mean + std * noise) * 0.18215 around that mean.
    sampled = torch.stack([LatentDataset(tmp_path / "cache", random_flip=False).load(0, np.random.default_rng(s))[0]
                           for s in range(200)])  # fmt: skip
    mean, std = vae.posterior(data.images[:1])
    assert torch.allclose(
        sampled.mean(0), mean[0] * SCALE_FACTOR, atol=4 * std.max().item() * SCALE_FACTOR / 200**0.5
    )


def test_cache_without_flips(vae, tmp_path):
    data = Squares(n=4, random_flip=False)
    calls = count_encodes(vae)
    cache = build_latent_cache(data, vae, tmp_path / "cache", batch_size=4, sample=False)
    assert calls[0] == 1 and not cache.flips and not cache.random_flip
    assert torch.allclose(cache[2][0], vae.encode(data.images[2:3], sample=False)[0], atol=1e-6)
    with pytest.raises(LatentError, match="holds unflipped latents only"):
        LatentDataset(tmp_path / "cache", random_flip=True)


@pytest.mark.parametrize(
    "change, field",
    [
        ("vae", "vae.fingerprint"),
        ("image_size", "image_size"),
        ("dataset_content", "dataset.images_sha256"),
        ("dataset_length", "dataset.length"),
        ("dataset_class", "dataset.class"),
        ("flips", "flips"),
    ],
)
def test_mismatched_cache_is_refused_or_rebuilt(vae, other_vae_dir, tmp_path, change, field):
    path = tmp_path / "cache"
    build_latent_cache(Squares(n=6), vae, path, batch_size=8)
    data, other = Squares(n=6), vae
    if change == "vae":
        other = load_vae(other_vae_dir)
    elif change == "image_size":
        data = Squares(n=6, image_size=16)
    elif change == "dataset_content":
        data = Squares(n=6, seed=1)
    elif change == "dataset_length":
        data = Squares(n=5)
    elif change == "dataset_class":
        data = type("OtherSquares", (Squares,), {})(n=6)
    elif change == "flips":
        data = Squares(n=6, random_flip=False)
    calls = count_encodes(other)
    with pytest.raises(LatentCacheMismatch) as err:
        build_latent_cache(data, other, path, batch_size=8)
    assert "\n" not in str(err.value) and field in str(err.value) and "rebuild" in str(err.value)
    assert calls[0] == 0
    rebuilt = build_latent_cache(data, other, path, rebuild=True, batch_size=8)
    assert calls[0] >= 1 and len(rebuilt) == len(data)
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # the old cache is gone, no temporary left


def test_reading_checks_the_expected_metadata(vae, other_vae_dir, tmp_path):
    from diffusion.data.latent import latent_cache_metadata

    build_latent_cache(Squares(n=4), vae, tmp_path / "cache", batch_size=4)
    LatentDataset(tmp_path / "cache", expect=latent_cache_metadata(Squares(n=4), vae, flips=True))
    with pytest.raises(
        LatentCacheMismatch,
        match="vae.fingerprint [0-9a-f]{12} \\(cache\\) vs [0-9a-f]{12} \\(now\\), VAE .*vae_other0' \\(now\\)",
    ):
        LatentDataset(
            tmp_path / "cache", expect=latent_cache_metadata(Squares(n=4), load_vae(other_vae_dir), True)
        )
    with pytest.raises(LatentError, match="no latent cache at"):
        LatentDataset(tmp_path / "missing")


def test_failed_encoding_leaves_no_cache(vae, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("encoder died")

    vae.vae.encode = broken
    with pytest.raises(RuntimeError, match="encoder died"):
        build_latent_cache(Squares(n=4), vae, tmp_path / "cache")
    assert os.listdir(tmp_path) == []


def test_cache_refuses_what_it_cannot_hold(vae, tmp_path):
    cropped = Squares(n=4)
    cropped.random_crop = True
    with pytest.raises(LatentError, match="random crops"):
        build_latent_cache(cropped, vae, tmp_path / "a")
    with pytest.raises(LatentError, match="1-channel images, the VAE .* encodes 3: set data.channels=3"):
        build_latent_cache(Digits(image_size=8, channels=1), vae, tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(LatentError, match="is not a latent cache"):
        build_latent_cache(Squares(n=4), vae, tmp_path / "c")


def test_digits_cache_feeds_the_loader(vae, tmp_path):
    digits = Digits(image_size=8, channels=3)
    cache = build_latent_cache(digits, vae, tmp_path / "digits", batch_size=512, storage_dtype="float16")
    assert len(cache) == len(digits) and cache.num_classes == 10 and cache.class_names == digits.class_names
    assert np.array_equal(np.asarray(cache.labels), digits.targets.numpy())
    assert not cache.flips  # digits are never flipped
    assert cache.meta["dataset"]["class"] == "diffusion.data.datasets.Digits"
    loader = InfiniteLoader(cache, batch_size=16, seed=3)
    x, y = next(iter(loader))
    assert x.shape == (16, 4, 4, 4) and y.shape == (16,) and y.dtype == torch.int64
    x2, _ = next(iter(InfiniteLoader(cache, batch_size=16, seed=3)))
    assert torch.equal(x, x2)  # the posterior samples follow the loader's seed
    clone = pickle.loads(pickle.dumps(cache))  # what a spawned DataLoader worker gets: maps, not copies
    assert len(pickle.dumps(cache)) < 10_000 and torch.equal(clone.load(7, np.random.default_rng(0))[0],
                                                             cache.load(7, np.random.default_rng(0))[0])  # fmt: skip


def test_same_weights_in_another_directory_reuse_the_cache(vae, vae_dir, tmp_path):
    import shutil

    build_latent_cache(Squares(n=4), vae, tmp_path / "cache", batch_size=4)
    moved = load_vae(shutil.copytree(vae_dir, tmp_path / "moved_vae"))
    calls = count_encodes(moved)
    cache = build_latent_cache(Squares(n=4), moved, tmp_path / "cache", batch_size=4)
    assert calls[0] == 0 and cache.vae_name == vae.name  # the name is recorded, the fingerprint compared
