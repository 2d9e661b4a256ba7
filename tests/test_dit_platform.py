"""DiT in the platform: the model presets, run-time values from the data, data.image_size for both families,
one-line errors for a field of the other family, both classifier-free guidance rules, and latent data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_dit import randomise
from test_latent import Squares, save_tiny_vae

from diffusion.config.explain import explain
from diffusion.config.resolvers import follow_model
from diffusion.data.datasets import Digits
from diffusion.data.latent import (
    EncodedDataset,
    LatentCacheMismatch,
    build_latent_cache,
    latent_training_data,
)
from diffusion.engine import checkpoint as ckpt
from diffusion.engine.training import train
from diffusion.errors import ConfigError, UserError, find_user_error
from diffusion.models.dit import DIT_CONFIGS, DiT
from diffusion.models.vae import LatentError, load_vae
from diffusion.process.gaussian import GaussianDiffusion
from diffusion.sample import SamplingError, load_model, sample
from diffusion.sampling.generate import generate
from diffusion.sampling.guidance import check_guidance
from diffusion.sampling.noise import PerImageNoise
from diffusion.sampling.solvers import DDPM

from conftest import ROOT, compose_cfg, run_script

LAYOUTS = json.loads((ROOT / "tests/fixtures/reference/dit/released_layouts_dit.json").read_text())
# A DiT small enough for milliseconds: DiT-S/2's preset at 8x8 pixels, narrow and shallow.
TINY_DIT = [
    "model=dit_s_2",
    "model.input_size=8",
    "model.depth=2",
    "model.hidden_size=32",
    "model.num_heads=2",
]
RUN = ["data=digits", "data.batch_size=8", "hardware=cpu", "logger=none", "log_every=1", "save_every=0"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKL in diffusers' format: 3 -> 4 channels, 2x smaller sides."""
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


def shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("name", sorted(LAYOUTS["configs"]))
def test_the_twelve_presets_are_dits_configurations(name):
    ref = LAYOUTS["configs"][name]
    cfg = compose_cfg([f"model={ref['preset']}"])
    assert {k: cfg.model[k] for k in ref["constructor"]} == ref["constructor"]
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["num_trainable_parameters"]
    assert len(model.state_dict()) == ref["num_keys"] and model.num_tokens == ref["num_tokens"]
    assert set(DIT_CONFIGS) == {LAYOUTS["configs"][c]["preset"] for c in LAYOUTS["configs"]}


@pytest.mark.parametrize(
    "release, overrides", [("DiT-XL-2-256x256", []), ("DiT-XL-2-512x512", ["model.input_size=64"])]
)
def test_dit_xl_2_alone_builds_the_released_layout_and_loads_it_strictly(release, overrides):
    """instantiate(cfg.model) of model=dit_xl_2 (nothing else) is DiT-XL-2-256x256.pt's network."""
    ref = LAYOUTS["released"][release]
    with torch.device("meta"):
        model = instantiate(compose_cfg(["model=dit_xl_2", *overrides]).model)
        released = {k: torch.empty(v) for k, v in ref["state_dict"].items()}
    assert shapes(model) == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    model.load_state_dict(released, strict=True, assign=True)
    assert (model.num_classes, model.null_class, model.in_channels, model.out_channels) == (1000, 1000, 4, 8)


def test_sample_py_loads_a_plain_state_dict_in_the_released_layout(tmp_path):
    """`sample.py model=dit_xl_2 diffusion=adm checkpoint=DiT-XL-2-256x256.pt`: the file's 675M parameters as
    meta tensors (no memory), through the same load_model that sample.py runs."""
    ref = LAYOUTS["released"]["DiT-XL-2-256x256"]
    path = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save({k: torch.empty(v, device="meta") for k, v in ref["state_dict"].items()}, path)
    cfg = compose_cfg(
        ["model=dit_xl_2", "diffusion=adm", f"checkpoint={path}", "vae=sd_vae_ft_ema"], config_name="sample"
    )
    model, diffusion, info = load_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    assert diffusion.learns_sigma and info["vae"].name_or_path == "stabilityai/sd-vae-ft-ema"
    # A layout that does not fit is named, with the preset that does.
    cfg = compose_cfg(["model=dit_xl_4", "diffusion=adm", f"checkpoint={path}"], config_name="sample")
    with pytest.raises(SamplingError, match="The file matches model=dit_xl_2"):
        load_model(cfg)


@pytest.fixture(scope="module")
def plain_dit(tmp_path_factory) -> str:
    """A DiT state dict as DiT's releases are saved (nothing but state_dict()): dit_xl_2's layout shrunk to 4x4x4
    latents, one block of width 32."""
    torch.manual_seed(0)
    model = randomise(instantiate(compose_cfg(["model=dit_xl_2", *PLAIN_SHRINK]).model))
    path = tmp_path_factory.mktemp("plain") / "dit.pt"
    torch.save(model.state_dict(), path)
    return str(path)


PLAIN_SHRINK = ["model.input_size=4", "model.depth=1", "model.hidden_size=32", "model.num_heads=2"]


def plain_request(path: str, *overrides: str):
    return compose_cfg(
        ["model=dit_xl_2", *PLAIN_SHRINK, "diffusion=adm", f"checkpoint={path}", "hardware=cpu", "solver=ddim",
         "solver.steps=4", "num_samples=3", "batch_size=2", *overrides],
        config_name="sample",
    )  # fmt: skip


def test_a_plain_dit_state_dict_samples_decoded_by_the_named_vae(plain_dit, vae_dir, tmp_path):
    out = sample(plain_request(plain_dit, "vae=sd_vae_ft_mse", f"vae.name_or_path={vae_dir}"), tmp_path)
    with np.load(out) as npz:
        assert npz["arr_0"].shape == (3, 8, 8, 3) and npz["arr_0"].dtype == np.uint8  # 4x4x4 latents, decoded
        assert list(npz["arr_1"]) == [0, 1, 2]
    assert (tmp_path / "grid.png").is_file()


def test_latent_samples_without_a_vae_or_with_another_one_are_one_line(plain_dit, vae_dir, tmp_path):
    with pytest.raises(SamplingError, match="4-channel samples, which are latents.*vae=sd_vae_ft_ema"):
        sample(plain_request(plain_dit), tmp_path / "none")
    other = save_tiny_vae(tmp_path / "vae8", latent_channels=8)
    with pytest.raises(LatentError, match="makes 8-channel latents but model.in_channels=4"):
        sample(plain_request(plain_dit, "vae=sd_vae_ft_ema", f"vae.name_or_path={other}"), tmp_path / "other")


# ---------------------------------------------------------------------------------------------------------
# Run-time values and data.image_size


class Data:
    def __init__(self, image_size=8, channels=1, num_classes=10, **latent):
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.__dict__.update(latent)


def dit_config(**fields) -> dict:
    return OmegaConf.to_container(
        compose_cfg([*TINY_DIT, *(f"model.{k}={v}" for k, v in fields.items())]).model
    )


def test_fit_to_data_takes_channels_and_classes_from_the_data():
    config = DiT.fit_to_data(dit_config(), Data(channels=1, num_classes=10), learn_sigma=False)
    assert (config["in_channels"], config["num_classes"], config["learn_sigma"]) == (1, 10, False)
    model = instantiate(config)
    assert model.null_class == 10 and model.out_channels == 1
    latent = Data(image_size=8, channels=4, num_classes=3, pixel_image_size=64, downsample=8)
    assert DiT.fit_to_data(dit_config(), latent, learn_sigma=True)["in_channels"] == 4
    unconditional = DiT.fit_to_data(dit_config(num_classes=0, class_dropout_prob=0), Data(), learn_sigma=True)
    assert unconditional["num_classes"] == 0 and instantiate(unconditional).num_classes is None


@pytest.mark.parametrize(
    "data, message",
    [
        (Data(image_size=16), "model.input_size=8 but data.image_size=16: set both to the same value"),
        (
            Data(image_size=16, channels=4, pixel_image_size=32, downsample=2),
            "model.input_size=8 but the VAE turns data.image_size=32 images into 16x16 latents (2x smaller): set "
            "data.image_size=16 or model.input_size=16",
        ),
        (Data(num_classes=0), "model.num_classes=1000 but the data has no labels: set model.num_classes=0"),
    ],
)
def test_fit_to_data_errors_name_the_keys(data, message):
    with pytest.raises(ConfigError) as info:
        DiT.fit_to_data(dit_config(), data, learn_sigma=True)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_data_image_size_follows_either_family_and_the_vae(vae_dir):
    assert compose_cfg(["model=unet_digits", "data=digits"]).data.image_size == 8
    assert compose_cfg(["model=dit_xl_2", "data=digits"]).data.image_size == 32  # pixel space: input_size
    latent = compose_cfg(["model=dit_xl_2", "data=digits", "data.latent=true", f"vae.name_or_path={vae_dir}"])
    assert latent.data.image_size == 32 * 2  # the tiny VAE halves the side (Stable Diffusion's: 8x)
    explicit = ["model=dit_xl_2", "data=digits", "data.image_size=16"]
    assert compose_cfg(explicit).data.image_size == 16  # given: kept, and checked when the model is fit
    # Both families compose side by side, as the jobs of one `-m` sweep.
    for model in ("unet_digits", "dit_digits"):
        cfg = compose_cfg([f"model={model}", "data=digits"])
        assert cfg.data.image_size == 8 and cfg.model._target_.endswith(("UNetModel", "DiT"))


def test_a_missing_vae_or_model_is_one_line_when_the_image_size_is_resolved(tmp_path):
    cfg = compose_cfg(
        ["model=dit_xl_2", "data=digits", "data.latent=true", f"vae.name_or_path={tmp_path}/none"]
    )
    with pytest.raises(Exception) as info:
        OmegaConf.missing_keys(cfg)  # what the engine's first check does
    error = find_user_error(info.value)
    assert isinstance(error, UserError) and "has no config.json" in str(error) and "hf download" in str(error)
    with pytest.raises(ConfigError, match="no model is chosen here: set data.image_size"):
        follow_model(_root_=OmegaConf.create({"model": None, "data": {}}))


# ---------------------------------------------------------------------------------------------------------
# A field of the other family


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["model=dit_s_2", "experiment=digits"],
            "experiment=digits sets model.label_dropout, a UNetModel field that DiT does not have: use a DiT "
            "recipe (experiment=digits_dit)",
        ),
        (
            ["model=dit_s_2", "model.num_channels=64"],
            "model.num_channels is a UNetModel field that DiT does not have: set model.hidden_size",
        ),
        (
            ["model=dit_s_2", "model.label_dropout=0.1"],
            "model.label_dropout is a UNetModel field that DiT does not have: set model.class_dropout_prob",
        ),
        (["model=dit_s_2", "model.image_size=8"], "set model.input_size"),
        (
            ["model=unet_digits", "model.patch_size=2"],
            "model.patch_size is a DiT field that UNetModel does not have: drop it, or pick a DiT (model=dit_",
        ),
        (["model=unet_64", "model.class_dropout_prob=0.1"], "set model.label_dropout instead"),
        (["model=dit_s_2", "model.hiden_size=8"], "did you mean model.hidden_size?"),
        # Any misspelt key gets the same one line.
        (["optim.lrr=1"], "optim.lrr: Optim (optim=adamw) has no such field: did you mean optim.lr?"),
        (["max_stepz=3"], "max_stepz: no such setting: did you mean max_steps?"),
    ],
)
def test_a_field_of_the_other_family_is_explained_in_one_line(overrides, expected):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(overrides)
    line = explain(info.value)
    assert expected in line and "\n" not in line


def test_train_py_ends_a_wrong_combination_with_that_line(tmp_path):
    proc = run_script(
        "train.py", "model=dit_s_2", "experiment=digits", f"hydra.run.dir={tmp_path}", check=False
    )
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines() == [
        "experiment=digits sets model.label_dropout, a UNetModel field that DiT does not have: use a DiT recipe "
        "(experiment=digits_dit), or pick a UNetModel for this recipe (model=unet, unet_128, unet_256, "
        "unet_256_uncond, ...)"
    ]


# ---------------------------------------------------------------------------------------------------------
# Guidance


def four_channel_dit() -> DiT:
    """A conditional DiT on 4-channel inputs with a null class: the two guidance rules differ on channel 3."""
    torch.manual_seed(0)
    model = DiT(
        input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3
    )
    return randomise(model).eval()


def dits_sampling_loop(model, diffusion, z, noises, y, scale, guide_all_eps):
    """DiT's sample.py: the batch is [z, z] with labels [y, null], every step calls forward_with_cfg on all of
    it, the first half is kept at the end. Written against the process directly, not through the solvers."""
    x = torch.cat([z, z])
    labels = torch.cat([y, torch.full_like(y, model.null_class)])

    def model_fn(x, t, y):
        return model.forward_with_cfg(x, t, y, cfg_scale=scale, guide_all_eps=guide_all_eps)

    for k, i in enumerate(reversed(range(diffusion.num_timesteps))):
        t = torch.full((len(x),), i, dtype=torch.long)
        noise = torch.cat([noises[k], torch.randn_like(noises[k])])  # the second half's noise is never read
        x = diffusion.p_sample(model_fn, x, t, clip_denoised=False, model_kwargs={"y": labels}, noise=noise)[
            "sample"
        ]
    return x[: len(z)]


@pytest.mark.parametrize("style, guide_all_eps", [("all", True), ("dit", False)])
def test_both_guidance_rules_reproduce_dits_sampling_loop(style, guide_all_eps):
    """guidance_style=dit is DiT's published rule (three guided channels); the default "all" is DiT's
    commented-out alternative (every eps channel), both on the conditional rows."""
    model, diffusion = four_channel_dit(), GaussianDiffusion(steps=8, noise_schedule="cosine")
    y, indices = torch.tensor([0, 2]), [0, 1]
    solver = DDPM(steps=8, clip_denoised=False)
    ours = generate(model, diffusion, solver, indices, 3, torch.device("cpu"), y, 4.0, guidance_style=style)
    noise = PerImageNoise(3, indices, (4, 4, 4), torch.device("cpu"))
    z = noise.draw()
    noises = [noise.draw() for _ in range(8)]
    with torch.no_grad():
        ref = dits_sampling_loop(model, diffusion, z, noises, y, 4.0, guide_all_eps)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    other = generate(model, diffusion, solver, indices, 3, torch.device("cpu"), y, 4.0,
                     guidance_style="all" if style == "dit" else "dit")  # fmt: skip
    assert (other - ours).abs().max() > 1e-3  # the rules differ on a 4-channel model


def test_guidance_checks_speak_each_familys_vocabulary():
    unconditional = DiT(input_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=0,
                        class_dropout_prob=0.0)  # fmt: skip
    with pytest.raises(ConfigError, match="trained with model.class_dropout_prob > 0"):
        check_guidance(unconditional, 2.0)
    no_null = DiT(input_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=3, class_dropout_prob=0.0)
    with pytest.raises(ConfigError, match="\\(model.class_dropout_prob > 0\\); this one has no null class"):
        check_guidance(no_null, 2.0)
    with pytest.raises(ConfigError, match="guidance_style='dits': use one of \\['all', 'dit'\\]"):
        check_guidance(four_channel_dit(), 2.0, "dits")
    unet = instantiate(compose_cfg(["model=unet_digits", "model.label_dropout=0.1"]).model)
    with pytest.raises(ConfigError, match="guidance_style=dit is DiT's forward_with_cfg, which UNetModel"):
        check_guidance(unet, 2.0, "dit")
    check_guidance(unet, 1.0, "dit")  # no guidance: the rule does not matter


# ---------------------------------------------------------------------------------------------------------
# Latent data


@pytest.mark.parametrize("random_flip", [False, True])
def test_on_the_fly_latents_equal_the_caches(vae_dir, tmp_path, random_flip):
    """For one (seed, epoch, index) generator, encoding on the fly and reading a cache draw the same flip and
    posterior noise: the same training latents, up to the encoder's rounding in another batch size."""
    vae = load_vae(vae_dir)
    dataset = Squares(n=6, random_flip=random_flip)
    cache = build_latent_cache(dataset, vae, tmp_path / "cache", batch_size=4)
    fly = EncodedDataset(dataset, vae)
    assert (fly.image_size, fly.channels, fly.pixel_image_size, fly.downsample) == (4, 4, 8, 2)
    for index in range(6):
        a = fly.load(index, np.random.default_rng([0, 1, index]))
        b = cache.load(index, np.random.default_rng([0, 1, index]))
        assert torch.allclose(a[0], b[0], atol=1e-5) and a[1] == b[1]


def test_training_data_refuses_a_missing_or_mismatched_cache(vae_dir, tmp_path):
    vae = load_vae(vae_dir)
    digits = Digits(image_size=8, channels=3)
    with pytest.raises(LatentError, match="no latent cache at .*python -m diffusion.latent_cache"):
        latent_training_data(digits, vae, tmp_path / "none")
    build_latent_cache(Digits(image_size=16, channels=3), vae, tmp_path / "cache16")
    with pytest.raises(LatentCacheMismatch, match="image_size 16 \\(cache\\) vs 8 \\(now\\)"):
        latent_training_data(digits, vae, tmp_path / "cache16")
    with pytest.raises(LatentError, match="has 1-channel images.*set data.channels=3"):
        latent_training_data(Digits(image_size=8, channels=1), vae, None)
    fly = latent_training_data(digits, vae, None)
    assert isinstance(fly, EncodedDataset) and fly.vae is vae


# ---------------------------------------------------------------------------------------------------------
# Through the engine and sample.py, in-process


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory, vae_dir):
    """A class-conditional DiT trained one step on the tiny VAE's latents of 3-channel digits, its EMA weights
    randomised so that guidance shows."""
    run = tmp_path_factory.mktemp("latent_run")
    cfg = compose_cfg([*TINY_DIT, "model.input_size=4", *RUN, "data.channels=3", "data.latent=true",
                       f"vae.name_or_path={vae_dir}", "max_steps=1", "num_grid_samples=2", "solver.steps=2"])  # fmt: skip
    train(cfg, run)
    path = run / "checkpoints" / "latest.pt"
    state = ckpt.load_file(path)
    for rate, weights in state["ema"].items():
        model = DiT(**{k: v for k, v in OmegaConf.create(state["model_config"]).items() if k != "_target_"})
        model.load_state_dict(weights)
        state["ema"][rate] = randomise(model).state_dict()
    torch.save(state, path)
    return path


def test_a_latent_checkpoint_samples_decoded_with_no_vae_flags(latent_ckpt, tmp_path):
    assert (latent_ckpt.parent.parent / "samples" / "step_00000001.png").is_file()  # the grid, decoded
    request = ["hardware=cpu", f"checkpoint={latent_ckpt}", "num_samples=4", "solver=ddim", "solver.steps=4"]
    for style in ("all", "dit"):
        out = sample(compose_cfg([*request, "guidance_scale=3", f"guidance_style={style}"],
                                 config_name="sample"), tmp_path / style)  # fmt: skip
        with np.load(out) as npz:
            assert npz["arr_0"].shape == (4, 8, 8, 3)
    with np.load(tmp_path / "all/samples.npz") as a, np.load(tmp_path / "dit/samples.npz") as b:
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"]).max() > 0  # the two rules, through sample.py


def test_a_pixel_checkpoint_refuses_a_vae(tmp_path):
    run = tmp_path / "run"
    train(compose_cfg([*TINY_DIT, *RUN, "max_steps=1", "num_grid_samples=1", "solver.steps=2"]), run)
    cfg = compose_cfg(["hardware=cpu", f"checkpoint={run}/checkpoints/latest.pt", "vae=sd_vae_ft_ema"],
                      config_name="sample")  # fmt: skip
    with pytest.raises(SamplingError, match="trained in pixel space \\(data.latent=false\\): drop the vae"):
        load_model(cfg)


def test_sit_s_released_layout_loads_strictly_with_diffusion_flow(tmp_path):
    """SiT-XL/2's checkpoints are DiT-XL/2's layout (learned-sigma channels included): `model=dit_xl_2
    diffusion=flow` loads one strictly (meta tensors, no memory), and the extra channels are dropped when sampling,
    as SiT's forward does."""
    ref = LAYOUTS["released"]["DiT-XL-2-256x256"]
    path = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save({k: torch.empty(v, device="meta") for k, v in ref["state_dict"].items()}, path)
    for flow in ("flow", "sit"):
        cfg = compose_cfg(["model=dit_xl_2", f"diffusion={flow}", f"checkpoint={path}"], config_name="sample")
        model, diffusion, _ = load_model(cfg)
        assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
        assert model.out_channels == 8 and diffusion.name == "flow"
    # the same file as an EDM model: EDM trains no variance channels, so it is refused in one line
    cfg = compose_cfg(["model=dit_xl_2", "diffusion=edm", f"checkpoint={path}"], config_name="sample")
    with pytest.raises(SamplingError, match="diffusion=edm trains networks without them") as e:
        load_model(cfg)
    assert "\n" not in str(e.value)


def test_a_plain_dit_samples_as_a_flow_model_with_a_continuous_sampler(plain_dit, vae_dir, tmp_path):
    out = sample(
        plain_request(
            plain_dit,
            "diffusion=sit",
            "solver=euler",
            "solver.steps=3",
            "vae=sd_vae_ft_mse",
            f"vae.name_or_path={vae_dir}",
        ),
        tmp_path,
    )
    with np.load(out) as npz:
        assert npz["arr_0"].shape[0] == 3 and str(npz["solver"]) == "euler"


def test_a_plain_dit_samples_as_a_flow_model_with_sits_sde(plain_dit, vae_dir, tmp_path):
    out = sample(
        plain_request(
            plain_dit, "diffusion=sit", "solver=flow_sde", "solver.steps=3", "vae=sd_vae_ft_mse",
            f"vae.name_or_path={vae_dir}", "guidance_scale=2",
        ),
        tmp_path,
    )  # fmt: skip
    with np.load(out) as npz:
        assert (
            npz["arr_0"].shape[0] == 3
            and str(npz["solver"]) == "flow_sde"
            and int(npz["network_evaluations"]) == 3
        )
