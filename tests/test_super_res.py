"""Super-resolution through the platform: task=super_res trains a SuperResModel on area-downsampled pairs, and
sample.py upsamples the images of base_samples=BASE.npz; bad inputs are one line before any sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from PIL import Image

import diffusion.sample as sampling
from diffusion.data.datasets import Digits
from diffusion.data.images import to_uint8
from diffusion.engine import training as training
from diffusion.engine.training import train
from diffusion.errors import UserError
from diffusion.sample import load_model, sample
from diffusion.sampling.generate import generate

from conftest import compose_cfg, load_ckpt, tiny_cfg

UPSAMPLER = [
    "experiment=digits_upsampler",
    "data.batch_size=8",
    "hardware=cpu",
    "logger=none",
    "log_every=1",
    "save_every=0",
    "sample_every=0",
    "num_grid_samples=4",
    "solver.steps=2",
]


def upsampler_cfg(*overrides: str):
    return compose_cfg([*UPSAMPLER, *overrides])


class Recorder(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.kwargs = net, []

    def forward(self, x, t, **kwargs):
        self.kwargs.append(kwargs)
        return self.net(x, t, **kwargs)


def test_the_loss_is_the_diffusion_loss_given_the_area_downsampled_image():
    cfg = upsampler_cfg()
    task = training.build_task(cfg)
    model, config = task.build_model(cfg.model, Digits(split="train"))
    assert (config["small_size"], config["in_channels"], config["num_classes"]) == (4, 1, 10)
    data = Digits(split="train")
    x, y = data.images[:4], data.targets[:4]
    t, noise = torch.tensor([0, 10, 500, 999]), torch.randn(4, 1, 8, 8)
    net = Recorder(model)
    terms = task.losses(net, x, y, t, noise)
    (kwargs,) = net.kwargs
    # The reference loader's low-resolution image: each 2x2 block's mean.
    blocks = x.reshape(4, 1, 4, 2, 4, 2).mean(dim=(3, 5))
    assert torch.allclose(kwargs["low_res"], blocks, atol=1e-6) and torch.equal(kwargs["y"], y)
    expected = task.diffusion.training_losses(
        model, x, t, model_kwargs={"low_res": blocks, "y": y}, noise=noise
    )
    assert set(terms) == set(expected) == {"loss", "mse", "vb"}
    for key in terms:
        assert torch.allclose(terms[key], expected[key], rtol=1e-5, atol=1e-7), key


def test_the_right_network_for_each_task(tmp_path):
    with pytest.raises(UserError, match="task=diffusion does not train .*SuperResModel.*task=super_res"):
        train(upsampler_cfg("task=diffusion", "max_steps=1"), tmp_path / "a")
    with pytest.raises(UserError, match="task=super_res does not train .*UNetModel"):
        train(upsampler_cfg("model=unet_digits", "max_steps=1"), tmp_path / "b")
    with pytest.raises(UserError, match="task=super_res needs model.small_size"):
        train(upsampler_cfg("model.small_size=null", "max_steps=1"), tmp_path / "c")


@pytest.fixture(scope="module")
def upsampler(tmp_path_factory) -> str:
    """An engine checkpoint of the digits upsampler (2 steps), its EMA perturbed so that it matters."""
    run = tmp_path_factory.mktemp("upsampler")
    train(upsampler_cfg("max_steps=2"), run)
    path = run / "checkpoints" / "latest.pt"
    state = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(0)
    state["ema"] = {r: {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
                    for r, sd in state["ema"].items()}  # fmt: skip
    torch.save(state, path)
    return str(path)


def test_training_grids_pair_each_held_out_input_with_its_upsampling(upsampler):
    run = upsampler.rsplit("/checkpoints/", 1)[0]
    grid = np.asarray(Image.open(f"{run}/samples/step_00000002.png"))
    # 8 tiles of 8 px (4 inputs, 4 outputs) on a 3 x 3 grid with 2 px gaps: 32 px, scaled by 256 // 32 = 8.
    assert grid.shape == (32 * 8, 32 * 8, 3)
    tiles = [grid[(2 + 10 * r) * 8 : (10 + 10 * r) * 8 : 8, (2 + 10 * c) * 8 : (10 + 10 * c) * 8 : 8, 0]
             for r in range(3) for c in range(3)][:8]  # fmt: skip
    held_out = Digits(split="val").images[:4]
    low = F.interpolate(F.interpolate(held_out, size=(4, 4), mode="area"), size=(8, 8), mode="nearest")
    for k in range(4):  # tiles 0, 2, 4, 6 are the nearest-upsampled inputs of held-out digits 0..3
        assert np.abs(tiles[2 * k].astype(int) - to_uint8(low[k : k + 1])[0, ..., 0]).max() <= 1
    assert load_ckpt(upsampler)["model_config"].count("small_size: 4") == 1


def base_npz(path, images: np.ndarray, labels: np.ndarray | None = None) -> str:
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    np.savez(path, **arrays)
    return str(path)


def low_res_digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    held_out = Digits(split="val")
    return to_uint8(F.interpolate(held_out.images[:n], size=(4, 4), mode="area")), held_out.targets[
        :n
    ].numpy()


def sample_cfg(*overrides: str):
    return compose_cfg(["hardware=cpu", "solver=ddim", "solver.steps=4", *overrides], config_name="sample")


def test_base_samples_are_upsampled_with_their_labels(upsampler, tmp_path):
    images, labels = low_res_digits(3)
    path = base_npz(tmp_path / "base.npz", images, labels)
    cfg = sample_cfg(f"checkpoint={upsampler}", f"base_samples={path}", "num_samples=5", "batch_size=2")
    out = sample(cfg, tmp_path / "up")
    with np.load(out) as npz:
        upsampled, written = npz["arr_0"], npz["arr_1"]
    assert upsampled.shape == (5, 8, 8, 1)
    assert written.tolist() == labels[[0, 1, 2, 0, 1]].tolist()  # base images in turn, as classes cycle
    # Exactly generate() with each image's low_res and label, batched as sample.py batches.
    model, diffusion, info = load_model(cfg)
    model = sampling.sampling_hardware(cfg.hardware, info["channels_last"]).prepare_model(model)
    low = torch.from_numpy(images[[0, 1, 2, 0, 1]]).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(written)
    expected = [generate(model, diffusion, instantiate(cfg.solver), range(b, min(b + 2, 5)), 0,
                         torch.device("cpu"), y[b : b + 2], model_kwargs={"low_res": low[b : b + 2]})
                for b in (0, 2, 4)]  # fmt: skip
    np.testing.assert_array_equal(upsampled, to_uint8(torch.cat(expected)))
    # Another low-resolution image gives another output from the same noise.
    other = base_npz(tmp_path / "other.npz", 255 - images, labels)
    flipped = sample(
        sample_cfg(f"checkpoint={upsampler}", f"base_samples={other}", "num_samples=5"), tmp_path / "o"
    )
    with np.load(flipped) as npz:
        assert np.abs(npz["arr_0"].astype(int) - upsampled).mean() > 5


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampling work started before the request was checked")

    monkeypatch.setattr(sampling, "generate", refuse)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("base")
    train(tiny_cfg("max_steps=1", "num_grid_samples=1", "solver.steps=2"), run)
    return str(run / "checkpoints" / "latest.pt")


def test_bad_base_samples_are_one_line_before_sampling(upsampler, base_model, tmp_path, no_sampling):
    images, labels = low_res_digits(2)
    good = base_npz(tmp_path / "good.npz", images, labels)
    big = base_npz(tmp_path / "big.npz", np.zeros((2, 8, 8, 1), np.uint8), labels)
    rgb = base_npz(tmp_path / "rgb.npz", np.zeros((2, 4, 4, 3), np.uint8), labels)
    unlabelled = base_npz(tmp_path / "unlabelled.npz", images)
    bad_labels = base_npz(tmp_path / "bad_labels.npz", images, np.array([3, 12]))
    floats = base_npz(tmp_path / "floats.npz", images.astype(np.float32), labels)
    (tmp_path / "text.npz").write_text("not an npz")
    cases = [
        ([f"checkpoint={upsampler}", f"base_samples={big}"],
         "holds 8x8 images, but this upsampler upsamples from 4x4 \\(its small_size\\)"),
        ([f"checkpoint={upsampler}"], "is a super-resolution model: give the low-resolution images to upsample as "
         "base_samples=BASE.npz"),
        ([f"checkpoint={base_model}", f"base_samples={good}"], "is the input of a super-resolution model"),
        ([f"checkpoint={upsampler}", f"base_samples={good}", "classes=[1]"], "arr_1; drop classes"),
        ([f"checkpoint={upsampler}", f"base_samples={rgb}"], "3-channel images, the upsampler takes 1"),
        ([f"checkpoint={upsampler}", f"base_samples={unlabelled}"], "has no labels \\(arr_1\\), and this upsampler"),
        ([f"checkpoint={upsampler}", f"base_samples={bad_labels}"], "labels \\[12\\] outside the upsampler's range"),
        ([f"checkpoint={upsampler}", f"base_samples={floats}"], "arr_0 has dtype float32; store uint8 images"),
        ([f"checkpoint={upsampler}", f"base_samples={tmp_path / 'text.npz'}"], "is not an .npz file"),
        ([f"checkpoint={upsampler}", f"base_samples={good}", f"classifier={base_model}"],
         "classifier guidance steers a base model"),
    ]  # fmt: skip
    for overrides, message in cases:
        with pytest.raises(UserError, match=message) as info:
            sample(sample_cfg(*overrides, "num_samples=2"), tmp_path / "out")
        assert "\n" not in str(info.value), overrides
    assert not (tmp_path / "out" / "samples.npz").exists()
