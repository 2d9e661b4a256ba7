"""ADM's Inception features through torch-fidelity, checked offline with a seeded random-weights state dict.

Inception at 299x299 takes about 0.12 s per image on one CPU thread, so every test here uses a few small images.
"""

import os
import urllib.error

import numpy as np
import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

import diffusion.evaluation.inception as inception
from diffusion.evaluation.inception import (
    PYTORCH_FID_WEIGHTS_FILENAME,
    WEIGHTS_FILENAME,
    WEIGHTS_URL,
    InceptionFeatures,
    InceptionWeightsError,
    find_inception_weights,
    random_inception_state_dict,
)


@pytest.fixture(scope="module")
def ours(weights):
    return InceptionFeatures(weights, download=False)


@pytest.fixture(scope="module")
def theirs(weights):
    """torch-fidelity's own module from the same file, with the Mixed_6d.branch1x1 output caught by a hook."""
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], str(weights))
    caught = {}
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: caught.update(spatial=out.clone()))
    return net, caught


def _images(n: int, size: int = 16, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_features_are_bit_identical_to_torch_fidelitys_module(ours, theirs):
    images = _images(3, size=21)
    net, caught = theirs
    pool, logits = net(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
    spatial_nchw = caught["spatial"]
    got = ours(torch.from_numpy(images))

    assert {k: tuple(v.shape) for k, v in got.items()} == {
        "pool": (3, 2048),
        "spatial": (3, 2023),
        "logits": (3, 1008),
    }
    assert torch.equal(got["pool"], pool) and torch.equal(got["logits"], logits)
    assert spatial_nchw.shape == (3, 192, 17, 17)
    # ADM's layout: the [N x 17 x 17 x 192] NHWC map, channels 0..6, flattened row-major.
    spatial = got["spatial"].reshape(3, 17, 17, 7)
    for n, h, w, c in [(0, 0, 0, 0), (1, 5, 11, 6), (2, 16, 3, 2), (2, 16, 16, 6)]:
        assert spatial[n, h, w, c] == spatial_nchw[n, c, h, w]
    assert torch.equal(spatial, spatial_nchw[:, :7].permute(0, 2, 3, 1))
    # logits_unbiased is ADM's softmax input: pool features times fc.weight, no bias.
    torch.testing.assert_close(got["logits"], pool @ net.fc.weight.T, rtol=1e-5, atol=1e-5)
    # Random weights that still make features worth comparing: not constant, not all zero.
    for value in got.values():
        assert value.std() > 0.1 and torch.isfinite(value).all()


def test_one_channel_images_are_repeated_to_rgb(ours):
    gray = _images(2, channels=1, seed=1)
    rgb = np.repeat(gray, 3, axis=-1)
    a, b = ours(torch.from_numpy(gray)), ours(torch.from_numpy(rgb))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _tf1_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """TF1's ResizeBilinear with align_corners=False and no half-pixel centres, in float64: output pixel i reads
    input position i * in / out, between floor() and the next pixel (clamped to the edge)."""

    def weights(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    (y0, y1, fy), (x0, x1, fx) = weights(image.shape[0]), weights(image.shape[1])
    rows = image[y0] * (1 - fy)[:, None, None] + image[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


@pytest.mark.parametrize("height, width", [(16, 16), (37, 23)])
def test_torch_fidelitys_resize_is_tf1_bilinear(height, width):
    image = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    resized = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    expected = _tf1_bilinear(image.astype(np.float64), 299)
    np.testing.assert_allclose(resized[0].permute(1, 2, 0).numpy(), expected, atol=1e-3, rtol=0)


def test_the_network_sees_the_tf_style_resize_scaled_as_the_graph(ours):
    images = _images(2, size=19, seed=4)
    seen = {}
    handle = ours.net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].clone()))
    try:
        ours(torch.from_numpy(images))
    finally:
        handle.remove()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    expected = (
        interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128
    ) / 128
    assert seen["x"].shape == (2, 3, 299, 299) and torch.equal(seen["x"], expected)


def test_batch_norm_stays_in_inference_mode(ours):
    images = torch.from_numpy(_images(2, seed=5))
    before = ours(images)
    ours.train()
    assert not ours.net.training and not ours.net.Mixed_6d.branch1x1.bn.training
    after = ours(images)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_images_are_named(ours):
    with pytest.raises(ValueError, match="uint8"):
        ours(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        ours(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_missing_weights_give_one_line_with_the_url_and_the_path(hub):
    with pytest.raises(InceptionWeightsError) as error:
        find_inception_weights(download=False)
    message = str(error.value)
    assert "\n" not in message and WEIGHTS_URL in message and str(hub / WEIGHTS_FILENAME) in message

    missing = hub.parent / "elsewhere.pth"
    with pytest.raises(InceptionWeightsError) as error:
        InceptionFeatures(missing)
    assert "\n" not in str(error.value) and f"put it at {missing} " in str(error.value)


def test_a_failed_download_gives_the_same_line(hub, monkeypatch):
    def offline(url, path, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(inception, "_download", offline)
    with pytest.raises(InceptionWeightsError) as error:
        InceptionFeatures()  # download=True: tries, fails, says what to do
    message = str(error.value)
    assert "\n" not in message and "download failed" in message and "name resolution" in message
    assert WEIGHTS_URL in message and str(hub / WEIGHTS_FILENAME) in message


def test_weights_are_found_in_torch_hubs_cache_under_either_name(hub, weights):
    hub.mkdir(parents=True)
    os.symlink(weights, hub / PYTORCH_FID_WEIGHTS_FILENAME)
    assert find_inception_weights(download=False) == hub / PYTORCH_FID_WEIGHTS_FILENAME
    os.symlink(weights, hub / WEIGHTS_FILENAME)  # torch-fidelity's name wins
    assert find_inception_weights(download=False) == hub / WEIGHTS_FILENAME
    assert find_inception_weights(weights) == weights  # an explicit path wins over the cache


def test_a_file_that_is_not_the_inception_weights_is_named(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, other)
    with pytest.raises(InceptionWeightsError, match="not the FID Inception-v3 state dict") as error:
        InceptionFeatures(other)
    assert "\n" not in str(error.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InceptionWeightsError, match="not a readable PyTorch state dict"):
        InceptionFeatures(garbage)
    incomplete = tmp_path / "incomplete.pth"
    state = random_inception_state_dict(seed=1)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, incomplete)
    with pytest.raises(InceptionWeightsError, match="does not fit torch-fidelity") as error:
        InceptionFeatures(incomplete)
    assert "\n" not in str(error.value)
