"""benchmarks/dit_bench.py: its FLOP count against the transformer's arithmetic, and a one-step smoke run."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import dit_bench  # noqa: E402


def forward_flops_per_image(model) -> int:
    """Multiply-adds x 2 of DiT's forward: patch embedding, timestep MLP, blocks (adaLN, qkv, attention, proj,
    MLP) and the final layer."""
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


def test_counted_flops_are_three_forwards():
    """Backward costs two forwards (input and weight gradients), except for the layers whose input needs no
    gradient (patch embedding, first timestep Linear), and attention's backward recomputes q k^T (flash
    attention): 2.5 forwards. Attention must be counted on the CPU too (flop_counter maps CUDA kernels only)."""
    s = dit_bench.TrainStep("dit_s_2", batch=2, device=torch.device("cpu"), shrink=True)
    forward = 2 * forward_flops_per_image(s.model)
    d, t, p = s.model.hidden_size, s.model.num_tokens, s.model.patch_size
    no_input_grad = 2 * 2 * (t * d * s.model.in_channels * p * p + 256 * d)
    attention = 2 * s.model.depth * 2 * (2 * t * t * d)  # batch 2, two matmuls of 2 T^2 D FLOPs per block
    assert s.flops() == 3 * forward - no_input_grad + attention // 2


@pytest.mark.slow
def test_quick_run_prints_a_row(capsys, tmp_path):
    rows = dit_bench.main(
        ["--quick", "--models", "dit_s_2", "--threads", "1", "--json", str(tmp_path / "r.json")]
    )
    assert len(rows) == 1 and rows[0]["gflop_per_step"] > 0 and rows[0]["step_s"] > 0
    assert 0 < rows[0]["of_matmul"] and rows[0]["adamw_s"] > 0
    assert "dit_s_2 (quick)" in capsys.readouterr().out and (tmp_path / "r.json").is_file()
