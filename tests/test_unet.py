"""The ADM UNet against numbers produced by openai/guided-diffusion, plus behaviour the fixtures do not cover."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffusion.models.unet import AttentionBlock, GroupNorm32, UNetModel, timestep_embedding

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
LAYOUTS = json.loads((FIXTURES / "released_layouts.json").read_text())
TOL = 1e-5

# A network small enough for fast CPU tests that still has two levels, attention and up/down sampling.
TINY = dict(
    image_size=16,
    num_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    num_heads=2,
)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter, so that zero-initialised layers cannot hide a path through the network."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def from_reference_constructor(c: dict, **extra) -> UNetModel:
    """Translate the reference's UNetModel arguments (model_channels, downsample rates) to our flags."""
    return UNetModel(
        image_size=c["image_size"],
        in_channels=c["in_channels"],
        num_channels=c["model_channels"],
        num_res_blocks=c["num_res_blocks"],
        channel_mult=c["channel_mult"],
        attention_resolutions=[c["image_size"] // rate for rate in c["attention_resolutions"]],
        num_heads=c.get("num_heads", 1),
        num_head_channels=c.get("num_head_channels", -1),
        use_scale_shift_norm=c["use_scale_shift_norm"],
        resblock_updown=c["resblock_updown"],
        use_new_attention_order=c["use_new_attention_order"],
        dropout=c["dropout"],
        learn_sigma=c["out_channels"] == 2 * c["in_channels"],
        class_cond=c["num_classes"] is not None,
        num_classes=c["num_classes"] or 1000,
        **extra,
    )


def from_released_flags(flags: dict) -> dict:
    """The released models' command-line flags, with the comma string of resolutions made a list."""
    kwargs = dict(flags)
    kwargs["attention_resolutions"] = [int(r) for r in flags["attention_resolutions"].split(",")]
    return kwargs


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_released_checkpoint_layout(name):
    layout = LAYOUTS[name]
    with torch.device("meta"):
        model = UNetModel(**from_released_flags(layout["flags"]))
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert shapes.keys() == layout["state_dict"].keys()
    assert shapes == layout["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == layout["num_parameters"]


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "plain"])
@pytest.mark.parametrize("name", ["unet_a", "unet_b"])
def test_forward_matches_reference(name, use_sdpa):
    ref = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    model = from_reference_constructor(ref["constructor"], use_sdpa=use_sdpa)
    model.load_state_dict(ref["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        out = model(ref["x"], ref["t"], ref["y"])
    assert out.shape == ref["out"].shape
    assert rel_err(out, ref["out"]) <= TOL


def test_channels_last_gives_same_output_in_channels_last():
    ref = torch.load(FIXTURES / "unet_a.pt", weights_only=True)
    model = from_reference_constructor(ref["constructor"])
    model.load_state_dict(ref["state_dict"], strict=True)
    model.eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(ref["x"].to(memory_format=torch.channels_last), ref["t"], ref["y"])
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref["out"]) <= TOL


def loss_and_grads(use_checkpoint: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    # Dropout on: checkpointing must replay the same dropout masks when it recomputes.
    model = randomise(
        UNetModel(**TINY, dropout=0.2, class_cond=True, num_classes=3, use_checkpoint=use_checkpoint)
    )
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    loss = model(x, torch.tensor([3, 700]), torch.tensor([0, 2])).square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_checkpointing_keeps_loss_and_gradients():
    loss_plain, grads_plain = loss_and_grads(use_checkpoint=False)
    loss_ckpt, grads_ckpt = loss_and_grads(use_checkpoint=True)
    assert rel_err(loss_ckpt, loss_plain) <= TOL
    assert grads_ckpt.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        assert grad is not None and grad.norm() > 0, name
        assert rel_err(grads_ckpt[name], grad) <= TOL, name


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_checkpointing_recomputes_residual_and_attention_blocks_only_when_asked(use_checkpoint):
    model = UNetModel(**TINY, use_checkpoint=use_checkpoint)
    res_block, attention = model.middle_block[0], model.middle_block[1]
    calls = {"res": 0, "attn": 0}
    res_block.in_layers[2].register_forward_hook(lambda *_: calls.__setitem__("res", calls["res"] + 1))
    attention.norm.register_forward_hook(lambda *_: calls.__setitem__("attn", calls["attn"] + 1))
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    model(x, torch.tensor([5])).sum().backward()
    expected = 2 if use_checkpoint else 1
    assert calls == {"res": expected, "attn": expected}


def heads_by_hand(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The attention block with each head computed on its own, from the reference's two qkv layouts."""
    n, c, h, w = x.shape
    qkv = F.conv1d(block.norm(x).reshape(n, c, h * w), block.qkv.weight, block.qkv.bias)
    heads, d = block.num_heads, c // block.num_heads
    outputs = []
    for head in range(heads):
        if block.use_new_attention_order:  # [q of all heads | k of all heads | v of all heads]
            q, k, v = (qkv[:, part * c + head * d : part * c + (head + 1) * d] for part in range(3))
        else:  # per head: [q | k | v]
            base = head * 3 * d
            q, k, v = (qkv[:, base + part * d : base + (part + 1) * d] for part in range(3))
        weights = torch.softmax(torch.einsum("nct,ncs->nts", q, k) / math.sqrt(d), dim=-1)
        outputs.append(torch.einsum("nts,ncs->nct", weights, v))
    a = torch.cat(outputs, dim=1)
    return x + F.conv1d(a, block.proj_out.weight, block.proj_out.bias).reshape(n, c, h, w)


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "plain"])
@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new"])
@pytest.mark.parametrize("heads", [1, 4])
def test_attention_block_matches_per_head_formula(heads, new_order, use_sdpa):
    block = AttentionBlock(64, num_heads=heads, use_new_attention_order=new_order, use_sdpa=use_sdpa)
    randomise(block)
    x = torch.randn(2, 64, 4, 5)
    with torch.no_grad():
        assert rel_err(block(x), heads_by_hand(block, x)) <= TOL


def test_num_head_channels_overrides_num_heads():
    model = UNetModel(**{**TINY, "num_heads": 1}, num_head_channels=16, num_heads_upsample=8)
    attention = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    # 32 channels at 16 px is not attended; 64 channels at 8 px in both halves and the middle.
    assert [m.num_heads for m in attention] == [4, 4, 4, 4]


def test_num_heads_upsample_sets_decoder_heads_only():
    model = UNetModel(**{**TINY, "num_heads": 2}, num_heads_upsample=4)
    encoder = [m.num_heads for m in model.input_blocks.modules() if isinstance(m, AttentionBlock)]
    middle = [m.num_heads for m in model.middle_block.modules() if isinstance(m, AttentionBlock)]
    decoder = [m.num_heads for m in model.output_blocks.modules() if isinstance(m, AttentionBlock)]
    assert (encoder, middle, decoder) == ([2], [2], [4, 4])
    out = randomise(model)(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "in_channels, learn_sigma, out_channels", [(3, False, 3), (3, True, 6), (1, False, 1), (1, True, 2)]
)
def test_output_channels(in_channels, learn_sigma, out_channels):
    model = randomise(UNetModel(**TINY, in_channels=in_channels, learn_sigma=learn_sigma))
    assert model.out_channels == out_channels
    out = model(torch.randn(2, in_channels, 16, 16), torch.tensor([10, 20]))
    assert out.shape == (2, out_channels, 16, 16)


def test_fresh_model_outputs_zero():
    # The zero-initialised output convolution makes the untrained prediction exactly zero, as in ADM.
    model = UNetModel(**TINY, learn_sigma=True, resblock_updown=True)
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([0, 999]))
    assert torch.equal(out, torch.zeros(2, 6, 16, 16))


def test_default_channel_mult_follows_image_size():
    expected = {32: [128, 256, 256, 256], 64: [128, 256, 384, 512], 128: [128, 128, 256, 384, 512]}
    for size, widths in expected.items():
        with torch.device("meta"):
            model = UNetModel(image_size=size, num_res_blocks=1, attention_resolutions=[8])
        # With one res block per level, input block 1 + 2 * level holds the first ResBlock of each level.
        got = [model.input_blocks[1 + 2 * level][0].in_layers[2].out_channels for level in range(len(widths))]
        assert got == widths, size
        assert len(model.input_blocks) == 2 * len(widths)


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 500])
    emb = timestep_embedding(t, 6)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    assert torch.allclose(emb, expected, atol=1e-6)
    assert torch.equal(timestep_embedding(t.float(), 6), emb)
    odd = timestep_embedding(t, 7)
    assert odd.shape == (3, 7) and torch.equal(odd[:, :6], emb) and torch.equal(odd[:, 6], torch.zeros(3))


def test_timesteps_long_float_and_scalar_agree():
    model = randomise(UNetModel(**TINY)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        by_long = model(x, torch.tensor([7, 7]))
        by_float = model(x, torch.tensor([7.0, 7.0]))
        by_scalar = model(x, torch.tensor(7))
    assert torch.equal(by_long, by_float) and torch.equal(by_long, by_scalar)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_runs_in_float32_under_autocast(dtype, monkeypatch):
    seen = []

    def recording_group_norm(x, *args, **kwargs):
        seen.append(x.dtype)
        return real_group_norm(x, *args, **kwargs)

    # CPU kernels accumulate half inputs in float anyway, so the input dtype is what can be observed here;
    # on GPUs a half-precision variance of large activations overflows.
    real_group_norm = F.group_norm
    monkeypatch.setattr(F, "group_norm", recording_group_norm)
    norm = GroupNorm32(32, 64)
    x = (torch.randn(2, 64, 4, 4) * 50 + 3).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert seen == [torch.float32]
    assert out.dtype == dtype
    assert torch.equal(out, real_group_norm(x.float(), 32, norm.weight, norm.bias).to(dtype))


def test_autocast_forward_close_to_float32():
    model = randomise(UNetModel(**TINY)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        full = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x, t)
    assert rel_err(mixed.float(), full) < 0.05


def labelled_model(label_dropout: float) -> UNetModel:
    return randomise(UNetModel(**TINY, class_cond=True, num_classes=5, label_dropout=label_dropout))


def test_label_dropout_adds_one_null_row():
    plain, cfg = labelled_model(0.0), labelled_model(0.1)
    assert plain.label_emb.weight.shape[0] == 5 and plain.null_class is None
    assert cfg.label_emb.weight.shape[0] == 6 and cfg.null_class == 5
    assert plain.num_classes == cfg.num_classes == 5
    assert UNetModel(**TINY).num_classes is None and UNetModel(**TINY).null_class is None


def test_label_dropout_only_in_train_mode():
    model = labelled_model(0.5)
    n = 64
    x, t = torch.randn(1, 3, 16, 16).expand(n, -1, -1, -1), torch.full((n,), 100)
    y = torch.full((n,), 2)
    model.eval()
    with torch.no_grad():
        conditional = model(x, t, y)
        unconditional = model(x, t, torch.full((n,), model.null_class))
        assert torch.equal(model(x, t, y), conditional)  # eval never drops a label
        model.train()
        torch.manual_seed(0)
        trained = model(x, t, y)
    assert rel_err(unconditional[0], conditional[0]) > 1e-3
    is_cond = (trained - conditional).flatten(1).abs().amax(1) < 1e-5
    is_null = (trained - unconditional).flatten(1).abs().amax(1) < 1e-5
    assert torch.all(is_cond ^ is_null)
    # 64 draws at p = 0.5: both outcomes occur (a miss has probability 2**-63).
    assert 0 < is_null.sum() < n


def test_no_label_dropout_in_train_mode_without_the_flag():
    model = labelled_model(0.0).train()
    x, t, y = torch.randn(8, 3, 16, 16), torch.full((8,), 40), torch.arange(8) % 5
    with torch.no_grad():
        trained = model(x, t, y)
        assert torch.equal(model.eval()(x, t, y), trained)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attention_resolutions=(32,)), "attention_resolutions"),
        (dict(attention_resolutions=(6,)), "attention_resolutions"),
        (dict(attention_resolutions="16,8"), "attention_resolutions"),
        (dict(num_channels=48), "normalisation groups"),
        (dict(channel_mult=(1, 1.5)), "normalisation groups"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(num_head_channels=24), "num_head_channels"),
        (dict(num_heads=3), "num_heads"),
        (dict(num_heads_upsample=3), "num_heads"),
        (dict(class_cond=True, num_classes=0), "num_classes"),
        (dict(label_dropout=0.1), "label_dropout"),
        (dict(class_cond=True, label_dropout=1.0), "label_dropout"),
        (dict(dropout=1.0), "dropout"),
        (dict(image_size=20, channel_mult=(1, 1, 1, 1)), "image_size"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(in_channels=0), "in_channels"),
    ],
)
def test_bad_construction_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetModel(**{**TINY, **kwargs})


def test_channel_mult_needed_for_unusual_sizes():
    with pytest.raises(ValueError, match="channel_mult"):
        UNetModel(image_size=48)


def test_bad_forward_arguments():
    conditional = UNetModel(**TINY, class_cond=True, num_classes=4)
    unconditional = UNetModel(**TINY)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="y"):
        conditional(x, t)
    with pytest.raises(ValueError, match="y"):
        conditional(x, t, torch.tensor([1]))
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must have shape"):
        unconditional(x, torch.tensor([1, 2, 3]))
