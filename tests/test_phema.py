"""Post-hoc EMA: EDM2 reference numbers, reconstruction accuracy, resume, atomic snapshots and errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusion.engine.phema as phema
from diffusion.engine.checkpoint import CheckpointError
from diffusion.engine.phema import (
    MAX_STD,
    PowerFunctionEMA,
    exp_to_std,
    list_snapshots,
    main,
    power_function_beta,
    reconstruct,
    save_snapshot,
    solve_posthoc_coefficients,
    std_to_exp,
)

FIXTURE = Path(__file__).parent / "fixtures" / "phema" / "edm2_phema.npz"
TOL = 1e-9  # relative, float64


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def rel_err(mine, theirs) -> float:
    """Max elementwise |mine - theirs| / |theirs| (entries with |theirs| < 1e-300 compared absolutely)."""
    mine, theirs = np.asarray(mine, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(mine - theirs) / np.maximum(np.abs(theirs), 1e-300)))


# ----------------------------------------------------------------------------------------------------------
# Against EDM2 (fixtures from scripts/reference_phema.py)


def test_fixture_records_the_edm2_commit(ref):
    assert len(str(ref["commit"])) == 40 and int(str(ref["commit"]), 16) >= 0


def test_std_exp_conversion_matches_edm2(ref):
    assert rel_err(std_to_exp(ref["beta_stds"]), ref["std_to_exp"]) <= TOL
    assert rel_err(exp_to_std(std_to_exp(ref["beta_stds"])), ref["beta_stds"]) <= TOL
    assert rel_err(exp_to_std(ref["std_to_exp"]), ref["exp_to_std"]) <= TOL


def test_power_function_beta_matches_edm2_in_steps(ref):
    # EDM2 ran with t_next = step * batch, t_delta = batch; the platform passes steps and t_delta = 1.
    mine = power_function_beta(ref["beta_stds"][:, None], ref["beta_steps"][None, :], 1)
    assert np.all(mine[:, 0] == 0.0)  # the first update copies the model
    both_zero = (mine == 0) & (ref["beta"] == 0)
    assert rel_err(mine[~both_zero], ref["beta"][~both_zero]) <= TOL


def test_ema_update_sequence_matches_edm2(ref):
    net = torch.nn.Linear(3, 2).double()
    ema = PowerFunctionEMA(net, stds=tuple(ref["ema_stds"]))
    for step, x in enumerate(ref["ema_inputs"], start=1):
        with torch.no_grad():
            net.weight.copy_(torch.from_numpy(x[:6]).reshape(2, 3))
            net.bias.copy_(torch.from_numpy(x[6:]))
        ema.update(net, step)
        mine = np.stack([torch.cat([e.weight.flatten(), e.bias]).numpy() for e in ema.emas])
        assert rel_err(mine, ref["ema_outputs"][step - 1]) <= TOL, step
    assert ema.step == len(ref["ema_inputs"])


@pytest.mark.parametrize("grid", ["regular", "irregular"])
def test_posthoc_coefficients_match_edm2(ref, grid):
    in_step, in_std = ref[f"solve_{grid}_in_step"], ref[f"solve_{grid}_in_std"]
    # EDM2 solved in images (step * batch); the coefficients are scale-free, so steps give the same numbers.
    mine = solve_posthoc_coefficients(in_step, in_std, in_step[-1], ref["out_stds"])
    theirs = ref[f"solve_{grid}_coefs"]
    assert mine.shape == theirs.shape == (len(in_step), len(ref["out_stds"]))
    # Normwise per output column: single near-zero coefficients carry no meaning of their own.
    col = np.max(np.abs(mine - theirs), axis=0) / np.max(np.abs(theirs), axis=0)
    assert col.max() <= TOL


# ----------------------------------------------------------------------------------------------------------
# Math properties


def test_std_to_exp_known_values_and_range():
    assert std_to_exp(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2 paper: sigma_rel 0.05 <-> gamma ~ 16.97
    assert std_to_exp(0.10) == pytest.approx(6.94, abs=0.01)
    assert exp_to_std(0.0) == pytest.approx(MAX_STD, rel=1e-15)
    for bad in (0.0, -0.1, MAX_STD, 0.3, float("nan")):
        with pytest.raises(ValueError, match="outside"):
            std_to_exp(bad)


def test_reconstructing_a_tracked_std_picks_its_own_snapshot():
    steps = np.arange(100, 1001, 100)
    in_step, in_std = np.repeat(steps, 2), np.tile([0.05, 0.10], len(steps))
    coefs = solve_posthoc_coefficients(in_step, in_std, 1000, [0.05, 0.10])
    want = np.zeros_like(coefs)
    want[-2, 0] = want[-1, 1] = 1.0
    np.testing.assert_allclose(coefs, want, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------
# Synthetic training run: noisy random walk


STEPS, EVERY = 2000, 100


def _vec(sd: dict) -> torch.Tensor:
    return torch.cat([v.flatten() for v in sd.values()])


@pytest.fixture(scope="module")
def walk_run(tmp_path_factory):
    """2000 steps of weights = random walk + noise, stds (0.05, 0.10) snapshotted every 100 steps.

    Also tracks 0.07, 0.03 and 0.20 directly, to compare reconstructions against.
    """
    run_dir = tmp_path_factory.mktemp("run")
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(32, 32)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    tracked = PowerFunctionEMA(model, (0.05, 0.10))
    direct = {s: PowerFunctionEMA(model, (s,)) for s in (0.03, 0.07, 0.20)}
    walk = [torch.zeros_like(p) for p in model.parameters()]
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            for w, p in zip(walk, model.parameters()):
                w.add_(torch.randn(w.shape, generator=gen))
                p.copy_(w + 3.0 * torch.randn(w.shape, generator=gen))
        tracked.update(model, step)
        for e in direct.values():
            e.update(model, step)
        if step % EVERY == 0:
            save_snapshot(run_dir, step, tracked)
    spread = (_vec(tracked.emas[0].state_dict()) - _vec(tracked.emas[1].state_dict())).norm()
    return run_dir, {s: _vec(e.emas[0].state_dict()) for s, e in direct.items()}, spread


def test_reconstruction_of_007_within_1_percent(walk_run):
    run_dir, direct, spread = walk_run
    state, info = reconstruct(run_dir, 0.07)
    diff = (_vec(state) - direct[0.07]).norm()
    rel = float(diff / direct[0.07].norm())
    print(f"\nphema 0.07 vs direct: rel L2 {rel:.2e}, vs 0.05-0.10 spread {float(diff / spread):.2e}")
    assert rel < 0.01
    # Stricter: the error is small against how far apart the tracked EMAs are (measured 4.9e-4).
    assert diff / spread < 0.01
    assert info["step"] == STEPS and info["snapshot_steps"] == list(range(EVERY, STEPS + 1, EVERY))
    assert len(info["coefficients"]) == 2 * (STEPS // EVERY) and info["profile_error"] < 0.005


def test_profile_error_criterion(walk_run):
    run_dir, direct, spread = walk_run
    for std in (0.03, 0.20):  # accepted: the weights are within ~1% of the spread of a direct EMA
        state, info = reconstruct(run_dir, std)
        assert float((_vec(state) - direct[std]).norm() / spread) < 0.02
        assert info["profile_error"] < phema.MAX_PROFILE_ERROR
    for std in (0.02, 0.25):
        with pytest.raises(ValueError, match="not representable"):
            reconstruct(run_dir, std)


def test_reconstruct_at_an_earlier_step_uses_the_snapshot_at_or_before_it(walk_run):
    run_dir, _, _ = walk_run
    _, info = reconstruct(run_dir, 0.07, step=1050)
    assert info["step"] == 1000 and info["snapshot_steps"][-1] == 1000
    state, _ = reconstruct(run_dir, 0.10, step=1000)  # a tracked std reproduces its own snapshot
    snap = torch.load(list_snapshots(run_dir)[9][1], weights_only=True)
    assert snap["step"] == 1000
    torch.testing.assert_close(_vec(state), _vec(snap["emas"][1]), rtol=1e-4, atol=1e-4)


def test_cli_needs_the_runs_checkpoint(walk_run, tmp_path, capsys):
    """The CLI writes a project checkpoint (tests/test_phema_training.py), which takes the run's config from
    its checkpoints: snapshots alone are refused in one line, and nothing is written."""
    run_dir, _, _ = walk_run
    out = tmp_path / "ema.pt"
    assert main([str(run_dir), "ema_std=0.07", "step=1500", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert "has no checkpoints/latest.pt" in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "run directory comes first"),
        (["RUN", "std=0.07"], "unknown argument"),
        (["RUN"], "ema_std is required"),
        (["RUN", "ema_std=abc"], "must be a number"),
    ],
)
def test_cli_bad_arguments(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------
# Resume, snapshots, errors


def _train(ema: PowerFunctionEMA, model: torch.nn.Module, steps: range, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
            model.get_buffer("count").add_(1)
        ema.update(model, step)


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    m = torch.nn.Linear(4, 3)
    m.register_buffer("count", torch.zeros(()))
    return m


def test_state_dict_round_trip_resumes_bit_exactly():
    m1 = _model()
    straight = PowerFunctionEMA(m1, (0.05, 0.10))
    _train(straight, m1, range(1, 301), seed=5)

    m2 = _model()
    first = PowerFunctionEMA(m2, (0.05, 0.10))
    _train(first, m2, range(1, 151), seed=5)
    buf = io.BytesIO()
    torch.save({"ema": first.state_dict(), "model": m2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    m3 = _model()
    m3.load_state_dict(saved["model"])
    resumed = PowerFunctionEMA(m3, (0.05, 0.10))
    resumed.load_state_dict(saved["ema"])
    assert resumed.step == 150
    # Same continuation on both: replay the straight run's second half noise.
    m1b = _model()
    ref = PowerFunctionEMA(m1b, (0.05, 0.10))
    _train(ref, m1b, range(1, 151), seed=5)
    _train(ref, m1b, range(151, 301), seed=6)
    _train(resumed, m3, range(151, 301), seed=6)
    for a, b in zip(ref.emas, resumed.emas):
        for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(ta, tb), ka
    assert float(resumed.emas[0].get_buffer("count")) == 300  # buffers follow the model
    assert not torch.equal(straight.emas[0].weight, ref.emas[0].weight)  # the reseed changed the second half


def test_load_state_dict_refuses_other_stds():
    m = _model()
    with pytest.raises(ValueError, match="keep the stds on resume"):
        PowerFunctionEMA(m, (0.05, 0.10)).load_state_dict(PowerFunctionEMA(m, (0.05, 0.12)).state_dict())


def test_update_and_tracker_errors():
    m = _model()
    ema = PowerFunctionEMA(m, (0.05,))
    with pytest.raises(ValueError, match="after step 0"):
        ema.update(m, 0)
    ema.update(m, 3)
    with pytest.raises(ValueError, match="after step 3"):
        ema.update(m, 3)
    with pytest.raises(ValueError, match="distinct"):
        PowerFunctionEMA(m, (0.05, 0.05))
    with pytest.raises(ValueError, match="outside"):
        PowerFunctionEMA(m, (0.05, 0.5))


def test_first_update_copies_and_strided_updates_match_edm2_batches():
    m = _model()
    ema = PowerFunctionEMA(m, (0.10,))
    ema.update(m, 4)  # from step 0: beta = 0
    assert torch.equal(ema.emas[0].weight, m.weight)
    with torch.no_grad():
        m.weight.add_(1.0)
    before = ema.emas[0].weight.clone()
    ema.update(m, 8)  # 4 steps at once, EDM2's t_delta
    beta = (1 - 4 / 8) ** (std_to_exp(0.10) + 1)
    torch.testing.assert_close(ema.emas[0].weight, before + (1 - beta) * (m.weight - before).detach())


def test_snapshot_is_compact_and_in_training_dtype(tmp_path):
    m = torch.nn.Linear(4, 3).to(torch.bfloat16)
    ema = PowerFunctionEMA(m, (0.05, 0.10))
    ema.update(m, 1)
    path = save_snapshot(tmp_path, 1, ema)
    assert path == tmp_path / "phema" / "snapshot-00000001.pt"
    snap = torch.load(path, weights_only=True)
    assert set(snap) == {"format", "step", "stds", "params", "emas"}
    assert snap["step"] == 1 and snap["stds"] == [0.05, 0.10] and snap["params"] == ["weight", "bias"]
    assert all(t.dtype == torch.bfloat16 for e in snap["emas"] for t in e.values())
    state, _ = reconstruct(tmp_path, 0.05)
    assert state["weight"].dtype == torch.bfloat16


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    m = _model()
    ema = PowerFunctionEMA(m, (0.05, 0.10))
    _train(ema, m, range(1, 101), seed=0)
    first = save_snapshot(tmp_path, 100, ema)
    before = first.read_bytes()
    _train(ema, m, range(101, 201), seed=1)

    real_save = torch.save

    def dies_halfway(obj, f):
        buf = io.BytesIO()
        real_save(obj, buf)
        # Half the bytes reach the disk, then the disk fails.
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(phema.torch, "save", dies_halfway)
    with pytest.raises(CheckpointError, match="disk full"):  # the checkpoints' own atomic write
        save_snapshot(tmp_path, 200, ema)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "phema").iterdir()) == ["snapshot-00000100.pt"]
    assert first.read_bytes() == before
    assert [s for s, _ in list_snapshots(tmp_path)] == [100]
    # With one snapshot only the tracked stds reconstruct (0.07 would be 5.6% off).
    assert reconstruct(tmp_path, 0.05)[1]["step"] == 100


def test_list_snapshots_ignores_temp_and_foreign_files(tmp_path):
    m = _model()
    ema = PowerFunctionEMA(m, (0.05, 0.10))
    _train(ema, m, range(1, 11), seed=0)
    save_snapshot(tmp_path, 10, ema)
    (tmp_path / "phema" / ".snapshot-00000020.pt.tmp-123").write_bytes(b"partial")
    (tmp_path / "phema" / "notes.txt").write_text("x")
    assert [s for s, _ in list_snapshots(tmp_path)] == [10]


def test_reconstruct_errors(tmp_path):
    with pytest.raises(ValueError, match="no post-hoc EMA snapshots"):
        reconstruct(tmp_path, 0.07)
    m = _model()
    ema = PowerFunctionEMA(m, (0.05, 0.10))
    _train(ema, m, range(1, 51), seed=0)
    save_snapshot(tmp_path, 50, ema)
    with pytest.raises(ValueError, match="no phema snapshot at or before step 49; the first is at step 50"):
        reconstruct(tmp_path, 0.07, step=49)
    with pytest.raises(ValueError, match="outside"):
        reconstruct(tmp_path, 0.3)
    with pytest.raises(ValueError, match="EMA is at step 50"):
        save_snapshot(tmp_path, 60, ema)
    assert main([str(tmp_path / "nothing"), "ema_std=0.07"]) == 2
