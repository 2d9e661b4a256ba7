"""DiT against numbers produced by facebookresearch/DiT's models.py, plus behaviour the fixtures do not cover."""

import json
import math
from pathlib import Path

import pytest
import torch

from diffusion.models.dit import DIT_CONFIGS, DiT, sincos_pos_embed_2d
from diffusion.sampling.guidance import guided

FIXTURES = Path(__file__).parent / "fixtures" / "reference" / "dit"
LAYOUTS = json.loads((FIXTURES / "released_layouts_dit.json").read_text())
TOL = 1e-5

# Small enough for milliseconds on a CPU, with every branch: two blocks, learned sigma, a null label row.
TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


def reference_model(fixture: dict) -> DiT:
    model = DiT(**fixture["constructor"])
    model.load_state_dict(fixture["state_dict"], strict=True)
    return model.eval()


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every trainable parameter, so that adaLN-Zero cannot hide a path through the network."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


# ---------------------------------------------------------------------------------------------------------
# Reference numbers


@pytest.mark.parametrize("name", ["dit_a.pt", "dit_b.pt"])
def test_forward_matches_dit(name):
    ref = load_fixture(name)
    model = reference_model(ref)
    with torch.no_grad():
        out = model(ref["x"], ref["t"], y=ref["y"])
    assert out.shape == ref["out"].shape
    assert rel_err(out, ref["out"]) <= TOL


def test_dit_b_needs_fractional_timesteps():
    """dit_b's t are fractional: an implementation that rounds them would be 1.7% off, so the fixture pins it."""
    ref = load_fixture("dit_b.pt")
    assert ref["t"].dtype == torch.float32 and (ref["t"] != ref["t"].round()).any()
    model = reference_model(ref)
    with torch.no_grad():
        rounded = model(ref["x"], ref["t"].round(), y=ref["y"])
    assert rel_err(rounded, ref["out"]) > 100 * TOL


def test_forward_with_cfg_matches_dit():
    ref = load_fixture("dit_a.pt")
    cfg = ref["cfg"]
    model = reference_model(ref)
    with torch.no_grad():
        plain = model(cfg["x"], cfg["t"], y=cfg["y"])
        out = model.forward_with_cfg(cfg["x"], cfg["t"], y=cfg["y"], cfg_scale=cfg["cfg_scale"])
        all_eps = model.forward_with_cfg(
            cfg["x"], cfg["t"], y=cfg["y"], cfg_scale=cfg["cfg_scale"], guide_all_eps=True
        )
    assert rel_err(plain, cfg["model_out"]) <= TOL
    assert rel_err(out, cfg["out"]) <= TOL
    assert rel_err(all_eps, cfg["out_all_eps_guided"]) <= TOL
    # DiT's semantics: channels 0-2 guided and equal in both halves, the rest the plain output of each row.
    assert cfg["guided_channels"] == 3
    half = out.shape[0] // 2
    assert torch.equal(out[:half, :3], out[half:, :3])
    assert torch.equal(out[:, 3:], plain[:, 3:])


def test_forward_with_cfg_reads_only_the_first_half():
    ref = load_fixture("dit_a.pt")
    cfg = ref["cfg"]
    model = reference_model(ref)
    x = cfg["x"].clone()
    x[x.shape[0] // 2 :] = torch.randn_like(x[x.shape[0] // 2 :])
    with torch.no_grad():
        out = model.forward_with_cfg(x, cfg["t"], y=cfg["y"], cfg_scale=cfg["cfg_scale"])
    assert rel_err(out, cfg["out"]) <= TOL
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x[:3], cfg["t"][:3], y=cfg["y"][:3], cfg_scale=4.0)


def test_platform_guidance_is_dit_all_eps_guidance_on_the_conditional_half():
    """The platform's guidance (all eps channels; variance from the conditional row) equals the first half of
    DiT's commented-out alternative, so the two differ only in DiT's three-channel choice."""
    ref = load_fixture("dit_a.pt")
    cfg = ref["cfg"]
    model = reference_model(ref)
    half = cfg["x"].shape[0] // 2
    x, t, y = cfg["x"][:half], cfg["t"][:half], cfg["y"][:half]
    with torch.no_grad():
        ours = guided(model, cfg["cfg_scale"], model.null_class)(x, t, y=y)
    assert rel_err(ours, cfg["out_all_eps_guided"][:half]) <= TOL


@pytest.mark.parametrize("name", sorted(LAYOUTS["pos_embed"]["values"]))
def test_pos_embed_values(name):
    """The released checkpoints' tables, computed by our table function (an XL build would cost 2.7 GB)."""
    ref = LAYOUTS["pos_embed"]["values"][name]
    _, tokens, dim = ref["shape"]
    table = sincos_pos_embed_2d(dim, ref["grid"])
    assert list(table.shape) == [tokens, dim] and table.dtype == torch.float32
    checks = {
        "token1_first8": table[1, :8],
        "last_token_last8": table[-1, -8:],
        # The token at row 1, column 2: dims 0 and D/4 encode the column (sin 2, cos 2), D/2 and 3D/4 the row.
        "token_row1_col2_dims_0_quarter_half_3quarters": table[
            ref["grid"] + 2, [0, dim // 4, dim // 2, 3 * dim // 4]
        ],
    }
    for key, ours in checks.items():
        assert rel_err(ours.double(), torch.tensor(ref[key], dtype=torch.float64)) <= TOL, key
    sum_of_squares = table.double().square().sum().item()
    assert abs(sum_of_squares - ref["sum_of_squares"]) / ref["sum_of_squares"] <= TOL


@pytest.mark.parametrize("name", ["dit_a.pt", "dit_b.pt"])
def test_fresh_model_holds_dits_pos_embed(name):
    ref = load_fixture(name)
    model = DiT(**ref["constructor"])
    assert rel_err(model.pos_embed.detach(), ref["state_dict"]["pos_embed"]) <= TOL
    assert not model.pos_embed.requires_grad
    assert any(p is model.pos_embed for p in model.parameters())


def test_pos_embed_first_half_encodes_the_column():
    table = sincos_pos_embed_2d(8, 3)  # 3x3 grid, quarter 2: dims 0-1 sin(col), 2-3 cos(col), 4-5 sin(row)...
    token = 1 * 3 + 2  # row 1, column 2
    assert table[token, 0].item() == pytest.approx(math.sin(2.0))
    assert table[token, 2].item() == pytest.approx(math.cos(2.0))
    assert table[token, 4].item() == pytest.approx(math.sin(1.0))
    assert table[token, 6].item() == pytest.approx(math.cos(1.0))


@pytest.mark.parametrize("name", sorted(LAYOUTS["configs"]))
def test_configuration_parameter_counts(name):
    ref = LAYOUTS["configs"][name]
    assert DIT_CONFIGS[ref["preset"]] == {
        k: ref["constructor"][k] for k in ("depth", "hidden_size", "patch_size", "num_heads")
    }
    with torch.device("meta"):
        model = DiT(**ref["constructor"])
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["num_trainable_parameters"]
    assert model.num_tokens == ref["num_tokens"]
    assert len(model.state_dict()) == ref["num_keys"]


def test_default_constructor_is_the_released_256px_model():
    ref = LAYOUTS["released"]["DiT-XL-2-256x256"]["constructor"]
    with torch.device("meta"):
        model = DiT()
    assert {k: getattr(model, k) for k in ref} == ref


@pytest.mark.parametrize("name", sorted(LAYOUTS["released"]))
def test_released_checkpoint_layout_loads_strictly(name):
    ref = LAYOUTS["released"][name]
    with torch.device("meta"):
        model = DiT(**ref["constructor"])
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert list(shapes) == list(ref["state_dict"])  # DiT's key order, too
    assert shapes == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["num_trainable_parameters"]
    # A bare state dict with exactly the released keys and shapes loads with strict=True (on meta: no memory).
    released = {key: torch.empty(shape, device="meta") for key, shape in ref["state_dict"].items()}
    result = model.load_state_dict(released, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    # ... and a wrong shape is refused.
    released["final_layer.linear.bias"] = torch.empty(3, device="meta")
    with pytest.raises(RuntimeError, match="final_layer.linear.bias"):
        model.load_state_dict(released, strict=True, assign=True)


@pytest.mark.parametrize("name", sorted(LAYOUTS["variants"]))
def test_variants(name):
    ref = LAYOUTS["variants"][name]
    with torch.device("meta"):
        model = DiT(**ref["constructor"])
    assert model.out_channels == ref["out_channels"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    state = model.state_dict()
    for key, shape in ref["shapes"].items():
        assert list(state[key].shape) == shape, key
    has_null = ref["constructor"]["class_dropout_prob"] > 0
    assert model.null_class == (ref["constructor"]["num_classes"] if has_null else None)


# ---------------------------------------------------------------------------------------------------------
# Initialisation, label dropout, the platform's attributes


def test_fresh_model_outputs_exactly_zero_and_learns():
    model = DiT(**TINY).train()
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 4, 5])
    out = model(x, t, y=y)
    assert out.shape == (4, 6, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))
    out.square().add(out).sum().backward()
    # adaLN-Zero: only the final linear gets a gradient at first; pos_embed never does.
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    assert model.pos_embed.grad is None


def test_initialisation_follows_dit():
    torch.manual_seed(0)
    model = DiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4, num_classes=10
    )
    w = model.x_embedder.proj.weight  # xavier over the [D, C*p*p] view: bound sqrt(6 / (C*p*p + D))
    bound = math.sqrt(6.0 / (4 * 2 * 2 + 64))
    assert 0.9 * bound < w.abs().max().item() <= bound
    qkv = model.blocks[0].attn.qkv.weight
    assert 0.9 * math.sqrt(6.0 / (64 + 192)) < qkv.abs().max().item() <= math.sqrt(6.0 / (64 + 192))
    for p in (
        model.t_embedder.mlp[0].weight,
        model.t_embedder.mlp[2].weight,
        model.y_embedder.embedding_table.weight,
    ):
        assert p.std().item() == pytest.approx(0.02, rel=0.15)
    for bias in (model.x_embedder.proj.bias, model.blocks[0].attn.qkv.bias, model.t_embedder.mlp[0].bias):
        assert torch.equal(bias, torch.zeros_like(bias))
    for p in (*model.blocks[0].adaLN_modulation[1].parameters(), *model.final_layer.parameters()):
        assert torch.equal(p, torch.zeros_like(p))


def test_label_dropout_only_in_train_mode():
    model = DiT(**{**TINY, "class_dropout_prob": 0.5})
    table = model.y_embedder.embedding_table.weight
    y = torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(0)
    model.train()
    emb = model.y_embedder(y)
    dropped = (emb == table[model.null_class]).all(dim=1)
    kept = (emb == table[0]).all(dim=1)
    assert (dropped | kept).all()
    assert 0.45 < dropped.float().mean().item() < 0.55
    model.eval()
    assert torch.equal(model.y_embedder(y), table[y])
    assert torch.equal(model.y_embedder(torch.full((3,), 5)), table[[5, 5, 5]])  # eval honours the null label


def test_no_null_row_never_drops():
    model = DiT(**{**TINY, "class_dropout_prob": 0.0}).train()
    assert model.null_class is None
    assert model.y_embedder.embedding_table.weight.shape[0] == TINY["num_classes"]
    y = torch.arange(5).repeat(100)
    assert torch.equal(model.y_embedder(y), model.y_embedder.embedding_table.weight[y])


def test_platform_attributes():
    model = DiT(**TINY)
    assert (model.image_size, model.in_channels, model.out_channels) == (8, 3, 6)
    assert (model.num_classes, model.null_class) == (5, 5)
    assert DiT(**{**TINY, "learn_sigma": False}).out_channels == 3


@pytest.mark.parametrize("num_classes", [0, None])
def test_unconditional(num_classes):
    model = randomise(DiT(**{**TINY, "num_classes": num_classes, "class_dropout_prob": 0.0})).eval()
    assert model.num_classes is None and model.null_class is None
    assert not any(k.startswith("y_embedder") for k in model.state_dict())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    assert model(x, t).shape == (2, 6, 8, 8)
    with pytest.raises(ValueError, match="y must be None"):
        model(x, t, y=torch.tensor([0, 1]))


def test_labels_and_shapes_are_checked():
    model = DiT(**TINY).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    with pytest.raises(ValueError, match="y \\(class labels\\) is required"):
        model(x, t)
    with pytest.raises(ValueError, match="y must have shape \\[2\\]"):
        model(x, t, y=torch.tensor([1]))
    with pytest.raises(ValueError, match="t must have shape \\[2\\]"):
        model(x, torch.tensor([1, 2, 3]), y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="x must have shape \\[N, 3, 8, 8\\]"):
        model(torch.randn(2, 3, 16, 16), t, y=torch.tensor([0, 1]))
    # A 0-dim t is one timestep for the whole batch.
    randomise(model)
    with torch.no_grad():
        assert torch.equal(
            model(x, torch.tensor(5), y=torch.tensor([0, 1])),
            model(x, torch.tensor([5, 5]), y=torch.tensor([0, 1])),
        )


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(input_size=10, patch_size=4), "input_size=10 is not divisible by patch_size=4"),
        (dict(hidden_size=30, num_heads=4), "hidden_size=30 is not divisible by num_heads=4"),
        (dict(hidden_size=18, num_heads=3), "hidden_size=18 must be divisible by 4"),
        (dict(depth=0), "depth must be a positive int"),
        (dict(patch_size=0), "patch_size must be a positive int"),
        (dict(in_channels=2.5), "in_channels must be a positive int"),
        (dict(mlp_ratio=0.0), "mlp_ratio must be positive"),
        (dict(class_dropout_prob=1.0), "class_dropout_prob must be in \\[0, 1\\)"),
        (dict(num_classes=-1), "num_classes must be an int >= 0"),
        (dict(num_classes=0, class_dropout_prob=0.1), "class_dropout_prob=0.1 needs labels"),
    ],
)
def test_constructor_errors(change, match):
    with pytest.raises(ValueError, match=match):
        DiT(**{**TINY, **change})


def test_use_checkpoint_gives_the_same_gradients():
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 1])
    grads = []
    for use_checkpoint in (False, True):
        model = randomise(DiT(**{**TINY, "class_dropout_prob": 0.0, "use_checkpoint": use_checkpoint}))
        model(x, t, y=y).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)
