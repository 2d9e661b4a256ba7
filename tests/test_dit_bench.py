"""`make bench`'s DiT rows: the FLOPs counted through the engine's train step against the transformer's
arithmetic, and the matmul ceiling at the model's MLP shape."""

import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402


def forward_flops_per_image(model) -> int:
    """Multiply-adds x 2 of DiT's forward: patch embedding, timestep MLP, label-free adaLN, blocks (adaLN, qkv,
    attention, proj, MLP) and the final layer."""
    d, t, p = model.hidden_size, model.num_tokens, model.patch_size
    mlp = int(d * model.mlp_ratio)
    block = d * 6 * d + t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * mlp
    macs = (
        t * d * model.in_channels * p * p
        + 256 * d
        + d * d
        + model.depth * block
        + d * 2 * d
        + t * d * p * p * model.out_channels
    )
    return 2 * macs


@pytest.fixture
def dit_setup():
    plan = bench.make_plan(bench.parse_args(["--quick", "--models", "dit_s_2"]))
    cfg = bench.model_config(plan, "dit_s_2")
    return cfg, bench.build_train(cfg, batch=2)


def test_the_quick_dit_row_is_the_preset_shrunk_on_dits_latents(dit_setup):
    cfg, s = dit_setup
    assert bench.is_transformer(cfg.model) and not bench.is_transformer(bench.compose_config([]).model)
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.patch_size) == (1, 64, 2)  # --quick's shrink
    assert tuple(s.x.shape) == (2, 4, 32, 32) and int(s.y.max()) < 1000  # DiT's ImageNet 256 latents
    assert s.model.num_classes == 1000 and s.model.out_channels == 8  # learned sigma from diffusion=adm


def test_counted_flops_are_three_forwards(dit_setup):
    """Backward costs two forwards (input and weight gradients), except for the layers whose input needs no
    gradient (patch embedding, first timestep Linear), and attention's backward recomputes q k^T (flash
    attention): 2.5 forwards. Attention must be counted on the CPU too (flop_counter maps CUDA kernels only)."""
    _, s = dit_setup
    m = s.model
    forward = 2 * forward_flops_per_image(m)  # batch 2
    d, t, p = m.hidden_size, m.num_tokens, m.patch_size
    no_input_grad = 2 * 2 * (t * d * m.in_channels * p * p + 256 * d)
    attention = 2 * m.depth * 2 * (2 * t * t * d)  # two matmuls of 2 T^2 D FLOPs per block and image
    assert bench.train_flops(s) == 3 * forward - no_input_grad + attention // 2


def test_the_ceiling_of_a_transformer_is_the_matmul_at_its_mlp_shape(dit_setup):
    cfg, _ = dit_setup
    plan = bench.make_plan(bench.parse_args(["--quick"]))
    kind, _ = bench.ceiling_probe(cfg, 4, torch.device("cpu"), plan)
    assert kind == "matmul" and bench.matmul_shape(cfg.model, 4) == (4 * 256, 64, 256)
    unet = bench.model_config(plan, "unet_32")
    assert bench.ceiling_probe(unet, 4, torch.device("cpu"), plan)[0] == "conv"
    # Levers that switch UNet fields are skipped for a DiT (its attention is always SDPA).
    assert not bench.lever_applies(cfg, "sdpa") and bench.lever_applies(cfg, "optimizer_foreach")
    assert bench.lever_applies(unet, "sdpa")


def test_quick_run_prints_the_dit_rows(tmp_path):
    rows = bench.main(
        ["--quick", "--threads", "1", "--models", "dit_s_2", "dit_b_2", "--skip", "data", "sampling"]
        + ["--json", str(tmp_path / "r.json")]
    )
    train = [r for r in rows if r["section"] == "train"]
    assert [r["model"] for r in train] == ["dit_s_2", "dit_b_2"]
    for r in train:
        assert r["ceiling"] == "matmul" and r["gflop_per_step"] > 0
        assert r["of_ceiling"] == pytest.approx(r["gflops"] / r["ceiling_gflops"])
