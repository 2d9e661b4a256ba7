"""Every option of every config group composes and instantiates; typos and wrong types fail at compose time."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from diffusion.config import LOADER_KEYS
from diffusion.config.store import component_schemas

from conftest import CONF, ROOT, compose_cfg

GROUPS = ["model", "diffusion", "data", "optim", "sampler", "hardware", "logger", "solver", "task", "vae"]
GROUPS += ["eval"]
RELEASED = {
    "unet_64": "64x64_diffusion",
    "unet_128": "128x128_diffusion",
    "unet_256": "256x256_diffusion",
    "unet_256_uncond": "256x256_diffusion_uncond",
    "unet_512": "512x512_diffusion",
    "unet_lsun_bedroom": "lsun_bedroom",
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group} is empty"


@pytest.mark.parametrize("group", GROUPS)
def test_an_option_holds_only_what_differs_from_what_it_extends(group):
    """Each default is written once: in the constructor (the schema is made from it) or in one option. An
    option that repeats a value of its schema, or of the option it extends, would be a second copy."""
    schemas = component_schemas()
    for name in options(group):
        raw = OmegaConf.load(CONF / group / f"{name}.yaml")
        parent = raw.defaults[0]
        if parent.startswith("/schema_"):  # extends its component's schema
            inherited = OmegaConf.structured(schemas[parent[1:].split("@")[0]])
        else:  # extends another option of the group, e.g. unet_512 extends unet_256
            assert parent in options(group), (
                f"{group}/{name} extends neither a schema nor an option: {parent}"
            )
            inherited = compose_cfg([f"{group}={parent}"])[group]
        inherited = OmegaConf.to_container(inherited, resolve=False)
        for key in set(raw) - {"defaults"}:
            ours = OmegaConf.to_container(raw)[key]
            assert key in inherited, f"{group}/{name}.yaml sets {key}, which its schema does not have"
            theirs = inherited[key]
            assert ours != theirs, f"{group}/{name}.yaml repeats {key}={ours!r} from {parent}"


def test_schemas_take_their_defaults_from_the_constructors():
    from diffusion.models.unet import UNetModel
    from diffusion.sampling.solvers import DDIM

    unet = OmegaConf.structured(component_schemas()["schema_unet"])
    assert unet._target_ == "diffusion.models.unet.UNetModel" and OmegaConf.is_missing(unet, "image_size")
    signature = inspect.signature(UNetModel).parameters
    assert unet.num_channels == signature["num_channels"].default
    assert unet.attention_resolutions == list(signature["attention_resolutions"].default)
    assert (
        OmegaConf.structured(component_schemas()["schema_ddim"]).steps
        == inspect.signature(DDIM).parameters["steps"].default
    )
    hardware = component_schemas()["schema_hardware"]
    assert "local_rank" not in {f.name for f in dataclasses.fields(hardware)}  # run-time values stay out


@pytest.mark.parametrize("name", options("model"))
def test_model_presets_instantiate(name):
    cfg = compose_cfg([f"model={name}"])
    with torch.device("meta"):  # the released networks have up to 675M parameters: no memory on meta
        model = instantiate(cfg.model)
    assert model.image_size == cfg.model.get("image_size", cfg.model.get("input_size"))  # UNet / DiT
    if "learn_sigma" in cfg.model:  # a diffusion network
        assert model.out_channels == model.in_channels * (2 if cfg.model.learn_sigma else 1)
    else:  # a noisy-image classifier
        assert model.num_classes == cfg.model.num_classes


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_presets_build_the_released_layout(name):
    """instantiate(cfg.model) on a released preset alone gives exactly OpenAI's key/shape layout."""
    layouts = json.loads((ROOT / "tests/fixtures/reference/released_layouts.json").read_text())
    layout = layouts[RELEASED[name]]
    with torch.device("meta"):
        model = instantiate(compose_cfg([f"model={name}"]).model)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: list(v) for k, v in layout["state_dict"].items()}
    assert sum(p.numel() for p in model.parameters()) == layout["num_parameters"]


def test_reference_flag_vocabulary_overrides():
    cfg = compose_cfg(["model=unet_128", "model.num_channels=192", "model.attention_resolutions=[32,16,8]"])
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.state_dict()["input_blocks.0.0.weight"].shape[0] == 192


@pytest.mark.parametrize("name", options("diffusion"))
def test_diffusion_presets(name):
    d = instantiate(compose_cfg([f"diffusion={name}"]).diffusion)
    if name in ("adm", "ddpm", "improved"):
        assert d.discrete and d.num_timesteps == 1000
        assert d.learns_sigma == (name != "ddpm")
    else:  # the continuous formulations
        assert not d.discrete and d.name == {"edm": "edm", "edm2": "edm", "flow": "flow", "sit": "flow"}[name]
        assert d.learns_sigma == (name == "sit")
        assert (d.modules() != []) == (name == "edm2")  # EDM2's learned weighting is trainable state


@pytest.mark.parametrize("name", options("sampler"))
def test_samplers(name):
    s = instantiate(compose_cfg([f"sampler={name}"]).sampler, num_timesteps=50)
    t, w = s.sample(6, torch.device("cpu"))
    assert t.shape == (6,) and w.shape == (6,) and int(t.max()) < 50


@pytest.mark.parametrize("name", options("solver"))
def test_solvers(name):
    solver = instantiate(compose_cfg([f"solver={name}"]).solver)
    assert solver.steps == compose_cfg([f"solver={name}"]).solver.steps


@pytest.mark.parametrize("name", options("hardware"))
def test_hardware(name):
    cfg = compose_cfg([f"hardware={name}"])
    if cfg.hardware.device == "cuda" and not torch.cuda.is_available():
        with pytest.raises(InstantiationException, match="no CUDA device"):
            instantiate(cfg.hardware)
        return
    hw = instantiate(cfg.hardware)
    assert hw.device.type in ("cpu", "cuda")
    if hw.device.type == "cpu":
        assert hw.precision == "fp32"
    # The per-device defaults that `make bench` measured fastest: compile on GPUs, channels_last on the CPU.
    assert hw.compile == (hw.device.type == "cuda")
    assert hw.channels_last == (hw.device.type == "cpu")
    assert instantiate(cfg.hardware, compile=True).compile is True


def test_prepare_batch_puts_a_batch_in_the_models_layout():
    x = torch.randn(2, 3, 4, 4)
    for channels_last in (True, False):
        hw = instantiate(compose_cfg(["hardware=cpu", f"hardware.channels_last={channels_last}"]).hardware)
        out = hw.prepare_batch(x)
        assert out.device == hw.device and torch.equal(out, x)
        assert out.is_contiguous(memory_format=torch.channels_last) is channels_last


def test_hardware_rejects_a_non_boolean_compile():
    with pytest.raises(ConfigCompositionException, match="compile"):
        compose_cfg(["hardware.compile=fast"])


def test_optimizer_is_partial():
    cfg = compose_cfg(["optim.lr=3e-4"])
    opt = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 3e-4


@pytest.mark.parametrize("name", options("logger"))
def test_loggers(name, tmp_path):
    logger = instantiate(
        compose_cfg(
            [f"logger={name}", "logger.mode=disabled"] if name == "wandb" else [f"logger={name}"]
        ).logger
    )
    run_id = logger.start(str(tmp_path), {"a": 1}, "test", None, None)
    logger.log({"x": 1.0}, 1)
    logger.finish()
    assert run_id


def test_data_digits():
    cfg = compose_cfg(["data=digits", "model=unet_digits"])
    ds = instantiate({k: v for k, v in cfg.data.items() if k not in LOADER_KEYS})
    x, y = ds[0]
    assert (
        x.shape == (1, cfg.model.image_size, cfg.model.image_size)
        and len(ds) == 1797
        and ds.num_classes == 10
    )


def test_data_image_folder_and_cifar_compose(tmp_path):
    cfg = compose_cfg(["data=image_folder", f"data.dir={tmp_path}", "data.labels=subdir"])
    assert cfg.data.dir == str(tmp_path) and cfg.data.labels == "subdir"
    cfg = compose_cfg(["data=cifar10", f"data.root={tmp_path}"])
    assert cfg.data.image_size == 32


@pytest.mark.parametrize("name", options("experiment"))
def test_experiments_compose(name):
    cfg = compose_cfg([f"experiment={name}"])
    assert (
        cfg.max_steps > 0 and cfg.model.get("image_size", cfg.model.get("input_size")) == cfg.data.image_size
    )
    if name == "digits":
        assert (
            cfg.optim.lr == 1e-3
            and cfg.model.in_channels == 1
            and cfg.data._target_ == "diffusion.data.datasets.Digits"
        )


@pytest.mark.parametrize(
    "override, error",
    [
        ("model.not_a_flag=1", ConfigCompositionException),
        ("optim.lr=fast", ConfigCompositionException),
        ("data.batch_size=1.5", ConfigCompositionException),
        ("model=unet_9000", ConfigCompositionException),
        ("max_stepz=3", ConfigCompositionException),
    ],
)
def test_bad_overrides_fail_at_compose_time(override, error):
    with pytest.raises(error) as info:
        compose_cfg([override])
    key = override.split("=")[0]
    cause = f"{info.value} {info.value.__cause__}"
    assert key.split(".")[-1] in cause or "unet_9000" in cause


def test_schema_errors_name_the_key():
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(["model.not_a_flag=1"])
    assert isinstance(info.value.__cause__, ConfigAttributeError)  # the key is not in UNetConfig
    assert "not_a_flag" in f"{info.value} {info.value.__cause__}"
