"""`make bench` runs end to end, the numbers it reports are counted correctly, and the speed levers leave the
maths alone (no timing assertions)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffusion.engine.training import draw_for_batch
from diffusion.models.unet import AttentionBlock, Dropout

from conftest import ROOT, TINY, compose_cfg, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402

MiB = 2**20


@pytest.fixture
def one_thread():
    """Numerics tests run on one thread: on a shared 2-core machine a second thread waits for a busy core at
    every operator, which makes a tiny network's step up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_setup(*overrides: str) -> bench.TrainSetup:
    """The tiny digits network with the same random weights for every variant and no zero-initialised layer
    (the zero output convolution would leave every other gradient zero, and Adam would amplify the
    rounding)."""
    s = bench.build_train(compose_cfg([*TINY, *overrides]), batch=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in s.model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        for ema in s.state.ema.values():
            for target, p in zip(ema.parameters(), s.model.parameters()):
                target.copy_(p)
    return s


# --- what the table counts ----------------------------------------------------------------------------------


def test_conv_flops_are_forward_plus_two_backward_products():
    n, c_in, c_out, size = 2, 8, 16, 6
    x = torch.randn(n, c_in, size, size, requires_grad=True)
    w = torch.randn(c_out, c_in, 3, 3, requires_grad=True)
    flops = bench.count_flops(lambda: F.conv2d(x, w, padding=1).sum().backward())
    forward = 2 * n * c_out * c_in * 9 * size * size
    assert flops == 3 * forward  # grad of the input and grad of the weight each cost one forward


def test_cpu_flash_attention_counted_like_the_plain_formula():
    b, heads, tokens, d = 2, 4, 16, 8
    q, k, v = (torch.randn(b, heads, tokens, d, requires_grad=True) for _ in range(3))
    sdpa = bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())

    def plain():
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        (weights @ v).sum().backward()

    # Forward: two [tokens x tokens] products; backward: recompute one, then four gradient products.
    assert sdpa == 7 * 2 * b * heads * tokens * tokens * d
    assert bench.count_flops(plain) == 6 * 2 * b * heads * tokens * tokens * d  # no recomputation


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_sees_a_freed_allocation():
    with bench.PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64 * MiB // 4)  # 64 MiB, every page touched
        del block
    # The kernel's resident-set counters are batched per thread, so a few pages may be missing.
    assert 62 * MiB <= memory.bytes < 96 * MiB


def test_train_step_updates_weights_and_ema_as_the_engine(one_thread):
    s = tiny_setup()
    params = [p.detach().clone() for p in s.model.parameters()]
    ema = [p.detach().clone() for p in s.state.ema[0.9999].parameters()]
    bench.train_step(s)
    assert s.state.step == 1
    moved = [not torch.equal(a, p) for a, p in zip(params, s.model.parameters())]
    assert sum(moved) > len(moved) // 2
    # The engine's warm-up EMA at step 0: decay = min(rate, 1/10).
    for before, new, after in zip(ema, s.model.parameters(), s.state.ema[0.9999].parameters()):
        assert torch.allclose(after, before + 0.9 * (new.detach() - before), atol=1e-7)


# --- the levers ---------------------------------------------------------------------------------------------


def losses_after_two_steps(s: bench.TrainSetup) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example losses of the trained model and of its EMA at step 2 (same timesteps and noise)."""
    for _ in range(2):
        bench.train_step(s)
    t, _, noise = draw_for_batch(s.task.sampler, tuple(s.x.shape), s.hw.device, seed=0, step=2)
    with torch.no_grad():
        return tuple(s.task.losses(net, s.x, s.y, t, noise)["loss"] for net in (s.model, s.state.ema[0.9999]))


@pytest.mark.parametrize("lever", ["channels_last", "sdpa", "optimizer_foreach", "optimizer_loop"])
def test_levers_change_speed_not_results(lever, one_thread):
    base = tiny_setup()
    label, overrides = bench.LEVERS[lever](base.cfg)
    assert label and overrides
    # Losses, not weights: a bias in front of a GroupNorm gets a rounding-noise gradient that Adam scales up
    # to a full step, without any effect on the function.
    for ours, theirs in zip(losses_after_two_steps(base), losses_after_two_steps(tiny_setup(*overrides))):
        assert torch.allclose(ours, theirs, rtol=1e-4), lever


def test_lever_variants_really_switch(one_thread):
    cfg = compose_cfg(TINY)
    for setup, want in ((tiny_setup(), True), (tiny_setup(*bench.LEVERS["channels_last"](cfg)[1]), False)):
        assert setup.hw.channels_last is want  # the CPU preset's default (on), then flipped by the lever
        weights = [m.weight for m in setup.model.modules() if isinstance(m, torch.nn.Conv2d)]
        # Layout shows only where both channels and kernel exceed 1 (otherwise both formats coincide).
        layouts = [
            w.is_contiguous(memory_format=torch.channels_last) for w in weights if min(w.shape[1:]) > 1
        ]
        assert layouts and all(layout == want for layout in layouts)
    s = tiny_setup(*bench.LEVERS["optimizer_foreach"](cfg)[1])
    assert s.state.optimizer.defaults["foreach"] is True and not s.state.optimizer.defaults["fused"]
    s = tiny_setup(*bench.LEVERS["sdpa"](cfg)[1])
    attention = [m for m in s.model.modules() if isinstance(m, AttentionBlock)]
    assert attention and not any(m.use_sdpa for m in attention)
    assert all(m.use_sdpa for m in tiny_setup().model.modules() if isinstance(m, AttentionBlock))
    # compile: the CPU preset resolves its null default to off, so the lever turns it on.
    assert bench.LEVERS["compile"](cfg)[1] == ["hardware.compile=True"]


def test_dropout_zeroes_a_fraction_p_and_rescales_the_rest():
    drop = Dropout(p=0.3).train()
    x = torch.rand(200_000) + 1.0  # no zeros of its own
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    assert abs((~kept).float().mean().item() - 0.3) < 0.005
    assert torch.allclose(y[kept], x[kept] / 0.7)
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the mask follows the global seed (checkpoint recomputation relies on it)


def test_dropout_gradient_is_the_mask_and_eval_is_identity():
    drop = Dropout(p=0.5).train()
    x = torch.randn(4, 32, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = drop(x)
    y.sum().backward()
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x.grad, (y != 0).float() * 2.0)
    assert drop.eval()(x) is x
    assert Dropout(p=0.0).train()(x) is x


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new"])
def test_attention_heads_reach_sdpa_with_contiguous_last_dim(new_order, monkeypatch):
    # In both memory formats, so that SDPA's fused kernels apply instead of the O(HW^2)-memory math path.
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        seen.append((q.stride(-1), k.stride(-1), v.stride(-1)))
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    block = AttentionBlock(64, num_heads=2, use_new_attention_order=new_order)
    x = torch.randn(2, 64, 4, 4)
    block(x)
    block.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert seen == [(1, 1, 1), (1, 1, 1)]


# --- the script ---------------------------------------------------------------------------------------------


def test_quick_run_reports_every_part(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    rows = bench.main(
        ["--quick", "--threads", "1", "--models", "unet_digits", "--skip", "data", "--peak-tflops", "0.5"]
        + ["--json", str(out)]
    )
    assert torch.get_num_threads() == threads  # the benchmark's thread count does not leak out
    assert json.loads(out.read_text())["rows"] == rows
    sections = [r["section"] for r in rows]
    assert sections.count("ceiling") == 3 and sections.count("sampling") == 3
    (train,) = [r for r in rows if r["section"] == "train"]
    assert train["model"] == "unet_digits" and train["batch"] == 2
    # The digits recipe (conf/experiment/digits.yaml) shrunk by --quick's overrides.
    expected = bench.build_train(
        compose_cfg(["experiment=digits", "hardware=cpu", *bench.QUICK_MODEL]), batch=2
    )
    assert train["params_m"] == pytest.approx(sum(p.numel() for p in expected.model.parameters()) / 1e6)
    assert train["gflop_per_step"] == pytest.approx(bench.train_flops(expected) / 1e9)
    assert train["gflops"] == pytest.approx(train["gflop_per_step"] / train["step_s"])
    assert train["of_ceiling"] == pytest.approx(train["gflops"] / train["ceiling_gflops"])
    assert train["mfu"] == pytest.approx(train["gflops"] / 500)  # over --peak-tflops 0.5
    assert {r["solver"] for r in rows if r["section"] == "sampling"} == {"DDPM", "DDIM", "DPMSolverPP"}
    assert all(r["images_per_s"] > 0 for r in rows if "images_per_s" in r)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--batch", "unet_64=0"], "--batch"),
        (["--batch", "unet_64"], "--batch"),
        (["--levers", "turbo"], "--levers"),
        (["--seconds", "-1"], "--seconds -1.0: use a number of seconds"),
        (["--warmup", "-1"], "--warmup -1: use a number of steps"),
    ],
)
def test_bad_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        bench.make_plan(bench.parse_args(argv))


def test_batch_option_sets_one_model():
    plan = bench.make_plan(bench.parse_args(["--batch", "unet_64=8", "--models", "unet_64"]))
    assert plan.batches["unet_64"] == 8 and plan.batches["unet_32"] == bench.TRAIN_BATCH["unet_32"]


def test_seconds_and_warmup_set_the_step_timing():
    plan = bench.make_plan(bench.parse_args(["--seconds", "2.5", "--warmup", "2"]))
    assert (plan.steps.min_seconds, plan.steps.warmup) == (2.5, 2)
    assert plan.kernels == bench.KERNEL_REPEATS and plan.peak_tflops is None


@pytest.mark.slow
def test_make_bench_quick_runs_every_model_and_the_data_loader(tmp_path):
    proc = run_script(
        "benchmarks/bench.py", "--quick", "--threads", "1", "--json", str(tmp_path / "rows.json")
    )
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["model"] for r in rows if r["section"] == "train"] == list(bench.MODELS)
    assert {r["num_workers"] for r in rows if r["section"] == "data"} == {0, 1, 2}
    assert "unet_64" in proc.stdout and "per worker" in proc.stdout


def test_the_digits_row_runs_the_digits_recipe_at_the_benchmark_threads():
    plan = bench.make_plan(bench.parse_args([]))
    cfg = bench.model_config(plan, "unet_digits")
    recipe = compose_cfg(["experiment=digits", "hardware=cpu"])
    assert cfg.optim == recipe.optim and cfg.model == recipe.model  # lr, EMA rates, label dropout as trained
    assert cfg.hardware.channels_last is False and cfg.hardware.num_threads is None
    assert bench.model_config(plan, "unet_32").hardware.channels_last is None  # no recipe: the CPU default
