"""The noisy-image classifier and the super-resolution UNet against numbers from openai/guided-diffusion."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_unet import FIXTURES, TOL, randomise, rel_err
from test_unet import TINY as UNET_TINY

from diffusion.models.unet import (
    DEFAULT_CHANNEL_MULT,
    AttentionPool2d,
    EncoderUNetModel,
    SuperResModel,
    UNetModel,
)
from diffusion.sample import matching_presets
from diffusion.sampling.guidance import classifier_cond_fn

from conftest import compose_cfg

LAYOUTS = json.loads((FIXTURES / "released_layouts_guidance.json").read_text())

# The UNet tests' tiny network as a classifier: two levels, attention at 8 px, the attention pool.
TINY = dict(UNET_TINY, num_head_channels=16, num_classes=5)


def _pixels(image_size: int, rates) -> list[int]:
    """The reference's attention downsample rates as the pixel sizes our constructors take."""
    return [image_size // rate for rate in rates]


def trunk_from_reference(c: dict) -> dict:
    """Our names for the arguments the reference's EncoderUNetModel and SuperResModel share."""
    return dict(
        image_size=c["image_size"],
        in_channels=c["in_channels"],
        num_channels=c["model_channels"],
        num_res_blocks=c["num_res_blocks"],
        channel_mult=c["channel_mult"],
        attention_resolutions=_pixels(c["image_size"], c["attention_resolutions"]),
        num_heads=c.get("num_heads", 1),
        num_head_channels=c.get("num_head_channels", -1),
        use_scale_shift_norm=c["use_scale_shift_norm"],
        resblock_updown=c["resblock_updown"],
        use_new_attention_order=c.get("use_new_attention_order", False),
        dropout=c.get("dropout", 0.0),
    )


def classifier_from_reference(c: dict, **extra) -> EncoderUNetModel:
    """Translate the reference's EncoderUNetModel arguments (model_channels, out_channels, rates) to ours."""
    return EncoderUNetModel(**trunk_from_reference(c), num_classes=c["out_channels"], pool=c["pool"], **extra)


def superres_from_reference(c: dict, small_size: int | None = None, **extra) -> SuperResModel:
    """Translate the reference's SuperResModel arguments to ours (image_size is the large size)."""
    return SuperResModel(
        **trunk_from_reference(c),
        num_heads_upsample=c.get("num_heads_upsample", -1),
        learn_sigma=c["out_channels"] == 2 * c["in_channels"],
        class_cond=c["num_classes"] is not None,
        num_classes=c["num_classes"] or 1000,
        small_size=small_size,
        **extra,
    )


# sr_create_model's channel_mult by large size (512 differs from the diffusion models' default).
UPSAMPLER_CHANNEL_MULT = {512: [1, 1, 2, 2, 4, 4], 256: [1, 1, 2, 2, 4, 4], 64: [1, 2, 3, 4]}


def released_kwargs(builder: str, flags: dict) -> dict:
    """
    The constructor kwargs, in our vocabulary, of a released classifier or upsampler from its script flags.

    The model presets (model=classifier_*, model=upsampler_*) hold exactly these values
    (test_presets_hold_the_released_flags).
    """
    if builder == "create_classifier":
        return dict(
            image_size=flags["image_size"],
            in_channels=3,
            num_channels=flags["classifier_width"],
            num_res_blocks=flags["classifier_depth"],
            attention_resolutions=[int(r) for r in flags["classifier_attention_resolutions"].split(",")],
            num_head_channels=64,  # create_classifier's constant
            use_scale_shift_norm=flags["classifier_use_scale_shift_norm"],
            resblock_updown=flags["classifier_resblock_updown"],
            pool=flags["classifier_pool"],
            num_classes=1000,
        )
    assert builder == "sr_create_model", builder
    return dict(
        image_size=flags["large_size"],
        small_size=flags["small_size"],
        in_channels=3,
        num_channels=flags["num_channels"],
        num_res_blocks=flags["num_res_blocks"],
        channel_mult=UPSAMPLER_CHANNEL_MULT[flags["large_size"]],
        attention_resolutions=[int(r) for r in flags["attention_resolutions"].split(",")],
        num_heads=flags["num_heads"],
        num_head_channels=flags["num_head_channels"],
        num_heads_upsample=flags["num_heads_upsample"],
        dropout=flags["dropout"],
        use_scale_shift_norm=flags["use_scale_shift_norm"],
        resblock_updown=flags["resblock_updown"],
        learn_sigma=flags["learn_sigma"],
        class_cond=flags["class_cond"],
        num_classes=1000,
    )


MODEL_CLASSES = {"create_classifier": EncoderUNetModel, "sr_create_model": SuperResModel}


# --- released layouts ----------------------------------------------------------------------------------------


# The model preset of each released file.
PRESETS = {
    "64x64_classifier": "classifier_64",
    "128x128_classifier": "classifier_128",
    "256x256_classifier": "classifier_256",
    "512x512_classifier": "classifier_512",
    "64_256_upsampler": "upsampler_64_256",
    "128_512_upsampler": "upsampler_128_512",
}


def preset_config(name: str):
    return compose_cfg([f"model={PRESETS[name]}"]).model


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_released_layout(name):
    """model=<preset> alone builds exactly the released file's keys and shapes, and the file loads strictly."""
    layout = LAYOUTS[name]
    with torch.device("meta"):
        model = instantiate(preset_config(name))
    assert isinstance(model, MODEL_CLASSES[layout["builder"]])
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert shapes.keys() == layout["state_dict"].keys()
    assert shapes == layout["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == layout["num_parameters"]
    # A released file has exactly these keys and shapes: a state dict made from the layout loads strictly.
    released = {key: torch.zeros(shape, device="meta") for key, shape in layout["state_dict"].items()}
    result = model.load_state_dict(released, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_presets_hold_the_released_flags(name):
    """Every constructor argument the reference's flags give is the preset's (channel_mult may be left to the
    image size's default, when that default is the released one)."""
    layout = LAYOUTS[name]
    preset = OmegaConf.to_container(preset_config(name), resolve=True)
    for key, value in released_kwargs(layout["builder"], layout["flags"]).items():
        if key == "channel_mult" and preset[key] is None:
            assert tuple(value) == DEFAULT_CHANNEL_MULT[preset["image_size"]], name
        else:
            assert preset[key] == value, (name, key)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_released_files_are_recognised_by_their_presets(name):
    """sample.py names the preset of a file that does not fit: each released layout matches its own preset."""
    layout = {k: torch.empty(shape, device="meta") for k, shape in LAYOUTS[name]["state_dict"].items()}
    assert matching_presets(layout) == [PRESETS[name]]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_released_flags_translate_like_the_reference_constructor(name):
    """Our kwargs and the reference builder's constructor describe the same network, argument by argument."""
    layout = LAYOUTS[name]
    ours, ref = released_kwargs(layout["builder"], layout["flags"]), layout["constructor"]
    assert ours["image_size"] == ref["image_size"] and ours["in_channels"] == ref["in_channels"]
    assert ours["num_channels"] == ref["model_channels"]
    assert ours["num_res_blocks"] == ref["num_res_blocks"]
    assert sorted(_pixels(ref["image_size"], ref["attention_resolutions"])) == sorted(
        ours["attention_resolutions"]
    )
    assert ours["num_head_channels"] == ref["num_head_channels"]
    model_class = MODEL_CLASSES[layout["builder"]]
    with torch.device("meta"):
        model = model_class(**ours)
    # channel_mult: ours may rely on the default for the image size; the built widths must be the reference's.
    widths = [int(m * ref["model_channels"]) for m in ref["channel_mult"]]
    assert model.input_blocks[0][0].out_channels == widths[0]
    assert model.middle_block[0].in_layers[2].out_channels == widths[-1]
    if layout["builder"] == "create_classifier":
        assert (model.num_classes, model.pool) == (ref["out_channels"], ref["pool"])
    else:
        assert (model.out_channels, model.num_classes) == (ref["out_channels"], ref["num_classes"])


# --- the classifier ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_ref():
    return torch.load(FIXTURES / "classifier_a.pt", weights_only=True)


def loaded_classifier(ref: dict, **extra) -> EncoderUNetModel:
    model = classifier_from_reference(ref["constructor"], **extra)
    model.load_state_dict(ref["state_dict"], strict=True)
    return model.eval()


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "plain"])
def test_classifier_logits_match_reference(classifier_ref, use_sdpa):
    model = loaded_classifier(classifier_ref, use_sdpa=use_sdpa)
    with torch.no_grad():
        logits = model(classifier_ref["x"], classifier_ref["t"])
    assert logits.shape == classifier_ref["out"].shape == (3, 10)
    assert rel_err(logits, classifier_ref["out"]) <= TOL


def test_classifier_guidance_gradient_matches_reference(classifier_ref):
    model = loaded_classifier(classifier_ref)
    cond_fn = classifier_cond_fn(model, classifier_ref["y"], scale=1.0)
    with torch.no_grad():  # as inside a sampling loop
        grad = cond_fn(classifier_ref["x"], classifier_ref["t"])
    assert grad.dtype == torch.float32 and grad.shape == classifier_ref["x"].shape
    assert rel_err(grad, classifier_ref["grad_log_prob"]) <= TOL
    assert all(p.grad is None for p in model.parameters())


def test_classifier_reads_as_the_platform_expects(classifier_ref):
    model = loaded_classifier(classifier_ref)
    assert (model.image_size, model.in_channels, model.num_classes) == (32, 3, 10)


def test_classifier_rejects_images_of_another_size():
    model = EncoderUNetModel(**TINY)
    with pytest.raises(ValueError, match="image_size=16"):
        model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="in_channels=3"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pool="max"), "pool"),
        (dict(num_classes=0), "num_classes"),
        (dict(attention_resolutions=(4,)), "attention_resolutions"),
        (dict(num_channels=48), "normalisation groups"),
        (dict(num_head_channels=24), "num_head_channels"),
    ],
)
def test_classifier_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EncoderUNetModel(**{**TINY, **kwargs})


def pool_by_hand(pool: AttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    """The reference's pool: every token attends (new qkv order, per head), then token 0 is read out."""
    n, c = x.shape[:2]
    tokens = x.reshape(n, c, -1)
    tokens = torch.cat([tokens.mean(-1, keepdim=True), tokens], -1) + pool.positional_embedding
    qkv = F.conv1d(tokens, pool.qkv_proj.weight, pool.qkv_proj.bias)
    q, k, v = qkv.chunk(3, dim=1)
    d = c // pool.num_heads
    outputs = []
    for head in range(pool.num_heads):
        qh, kh, vh = (part[:, head * d : (head + 1) * d] for part in (q, k, v))
        weights = torch.softmax(torch.einsum("nct,ncs->nts", qh, kh) / math.sqrt(d), dim=-1)
        outputs.append(torch.einsum("nts,ncs->nct", weights, vh))
    a = torch.cat(outputs, dim=1)
    return F.conv1d(a, pool.c_proj.weight, pool.c_proj.bias)[:, :, 0]


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "plain"])
@pytest.mark.parametrize("heads", [1, 4])
def test_attention_pool_reads_out_the_mean_token(heads, use_sdpa):
    pool = randomise(AttentionPool2d(4, 64, heads, 7, use_sdpa=use_sdpa))
    x = torch.randn(3, 64, 4, 4)
    with torch.no_grad():
        assert rel_err(pool(x), pool_by_hand(pool, x)) <= TOL


def test_attention_pool_heads_follow_num_head_channels_else_num_heads():
    assert EncoderUNetModel(**TINY).out[2].num_heads == 64 // 16
    assert EncoderUNetModel(**{**TINY, "num_head_channels": -1, "num_heads": 2}).out[2].num_heads == 2


# Key → shape of each head, in the reference's layout (out.{index}).
HEAD_SHAPES = {
    "adaptive": {"out.0.weight": [64], "out.0.bias": [64], "out.3.weight": [5, 64, 1, 1], "out.3.bias": [5]},
    # The spatial heads read the means of 4 input blocks (32, 32, 32, 64 channels) and the middle block (64).
    "spatial": {
        "out.0.weight": [2048, 224],
        "out.0.bias": [2048],
        "out.2.weight": [5, 2048],
        "out.2.bias": [5],
    },
    "spatial_v2": {
        "out.0.weight": [2048, 224],
        "out.0.bias": [2048],
        "out.1.weight": [2048],
        "out.1.bias": [2048],
        "out.3.weight": [5, 2048],
        "out.3.bias": [5],
    },
    "attention": {
        "out.0.weight": [64],
        "out.0.bias": [64],
        "out.2.positional_embedding": [64, 8 * 8 + 1],
        "out.2.qkv_proj.weight": [192, 64, 1],
        "out.2.qkv_proj.bias": [192],
        "out.2.c_proj.weight": [5, 64, 1],
        "out.2.c_proj.bias": [5],
    },
}


@pytest.mark.parametrize("pool", EncoderUNetModel.POOLS)
def test_every_head_has_the_reference_layout_and_gives_logits(pool):
    model = randomise(EncoderUNetModel(**TINY, pool=pool))
    head = {k: list(v.shape) for k, v in model.state_dict().items() if k.startswith("out.")}
    assert head == HEAD_SHAPES[pool]
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    logits = model(x, torch.tensor([0, 500]))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_classifier_shares_the_unet_down_path():
    """Same settings, same encoder: the classifier's trunk keys and shapes are the UNet's."""
    settings = dict(image_size=16, num_channels=32, channel_mult=(1, 2), num_res_blocks=1)
    settings.update(attention_resolutions=(8,), num_heads=2, resblock_updown=True)
    unet, classifier = UNetModel(**settings), EncoderUNetModel(**settings, num_head_channels=-1)

    def trunk(model):
        return {
            k: v.shape for k, v in model.state_dict().items() if k.startswith(("input_", "middle_", "time_"))
        }

    assert trunk(unet) == trunk(classifier)


def test_classifier_checkpointing_keeps_logits_and_gradients():
    x = torch.randn(2, 3, 16, 16)
    results = []
    for use_checkpoint in (False, True):
        model = randomise(EncoderUNetModel(**TINY, use_checkpoint=use_checkpoint))
        x_in = x.clone().requires_grad_(True)
        logits = model(x_in, torch.tensor([3, 700]))
        logits.square().sum().backward()
        results.append((logits.detach(), x_in.grad))
    assert rel_err(results[1][0], results[0][0]) <= TOL
    assert rel_err(results[1][1], results[0][1]) <= TOL


# --- the super-resolution model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def superres_ref():
    return torch.load(FIXTURES / "superres_a.pt", weights_only=True)


def loaded_superres(ref: dict, **extra) -> SuperResModel:
    model = superres_from_reference(ref["constructor"], small_size=ref["small_size"], **extra)
    model.load_state_dict(ref["state_dict"], strict=True)
    return model.eval()


def test_low_res_is_the_area_downsampled_image(superres_ref):
    low_res = F.interpolate(superres_ref["x_start"], superres_ref["small_size"], mode="area")
    assert rel_err(low_res, superres_ref["low_res"]) <= TOL


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "plain"])
def test_superres_matches_reference(superres_ref, use_sdpa):
    model = loaded_superres(superres_ref, use_sdpa=use_sdpa)
    low_res = F.interpolate(superres_ref["x_start"], superres_ref["small_size"], mode="area")
    with torch.no_grad():
        out = model(superres_ref["x"], superres_ref["t"], low_res=low_res, y=superres_ref["y"])
    assert out.shape == superres_ref["out"].shape == (3, 6, 32, 32)
    assert rel_err(out, superres_ref["out"]) <= TOL


def test_superres_keeps_the_image_channels_and_doubles_the_first_conv(superres_ref):
    model = loaded_superres(superres_ref)
    assert (model.in_channels, model.out_channels, model.small_size) == (3, 6, 16)
    assert model.input_blocks[0][0].in_channels == 6
    assert UNetModel(image_size=16, channel_mult=(1, 2), num_channels=32).input_blocks[0][0].in_channels == 3


def test_superres_depends_on_low_res(superres_ref):
    model = loaded_superres(superres_ref)
    x, t, y = superres_ref["x"], superres_ref["t"], superres_ref["y"]
    with torch.no_grad():
        a = model(x, t, low_res=superres_ref["low_res"], y=y)
        b = model(x, t, low_res=-superres_ref["low_res"], y=y)
    assert rel_err(a, b) > 1e-2


def test_superres_bad_inputs(superres_ref):
    model = loaded_superres(superres_ref)
    x, t, y = superres_ref["x"], superres_ref["t"], superres_ref["y"]
    with pytest.raises(ValueError, match="low_res is required"):
        model(x, t, y=y)
    with pytest.raises(ValueError, match="upsamples from 16x16"):
        model(x, t, low_res=torch.zeros(3, 3, 8, 8), y=y)
    with pytest.raises(ValueError, match="low_res must have shape"):
        model(x, t, low_res=torch.zeros(2, 3, 16, 16), y=y)
    with pytest.raises(ValueError, match="small_size=64"):
        SuperResModel(
            image_size=32, channel_mult=(1, 1), num_channels=32, attention_resolutions=(), small_size=64
        )


def test_superres_without_small_size_takes_any_low_res():
    model = randomise(
        SuperResModel(image_size=16, num_channels=32, channel_mult=(1, 2), attention_resolutions=())
    )
    for size in (4, 8):
        out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), low_res=torch.randn(2, 3, size, size))
        assert out.shape == (2, 3, 16, 16)
