"""Post-hoc EMA in the engine: power-function EMAs tracked during training, snapshots through pruning and
resume, the reconstruction's checkpoint through sample.py, and each bad setting's one line."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from diffusion.engine import checkpoint as ckpt
from diffusion.engine.phema import (
    SNAPSHOT_DIR,
    list_snapshots,
    main,
    posthoc_checkpoint,
    reconstruct,
)
from diffusion.engine.training import TrainingError, train
from diffusion.errors import UserError

from conftest import load_ckpt, run_script, tiny_cfg

STEPS, EVERY = 300, 25


def _vec(state: dict) -> torch.Tensor:
    return torch.cat([v.double().flatten() for k, v in sorted(state.items())])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A short real digits run (tiny network) tracking sigma_rel 0.05, 0.07 and 0.10, snapshotted every 25
    steps; its run directory and a copy of it whose snapshots hold only 0.05 and 0.10 (what the reconstruction
    sees), so 0.07 is tracked directly beside it."""
    run = tmp_path_factory.mktemp("digits")
    train(
        tiny_cfg(
            f"max_steps={STEPS}",
            "log_every=100",
            "save_every=100",
            "optim.lr=1e-3",
            "optim.ema_stds=[0.05,0.07,0.10]",
            f"optim.ema_snapshot_every={EVERY}",
        ),
        run,
    )
    two = tmp_path_factory.mktemp("two_stds")
    (two / SNAPSHOT_DIR).mkdir()
    for _, path in list_snapshots(run):
        snap = torch.load(path, weights_only=True)
        keep = [i for i, s in enumerate(snap["stds"]) if s != 0.07]
        snap["stds"] = [snap["stds"][i] for i in keep]
        snap["emas"] = [snap["emas"][i] for i in keep]
        torch.save(snap, two / SNAPSHOT_DIR / path.name)
    (two / "checkpoints").mkdir()
    latest = (run / "checkpoints" / ckpt.LATEST).resolve()
    os.symlink(latest, two / "checkpoints" / latest.name)
    os.symlink(latest.name, two / "checkpoints" / ckpt.LATEST)
    return run, two


@pytest.mark.slow
def test_reconstructed_007_is_within_1_percent_of_the_tracked_007(digits_run):
    run, two = digits_run
    final = load_ckpt(run / "checkpoints/latest.pt")
    assert final["step"] == STEPS and final["phema"]["stds"] == [0.05, 0.07, 0.10]
    direct = _vec(final["phema"]["emas"][1])
    state, info = reconstruct(two, 0.07)
    assert info["step"] == STEPS and info["stds"] == [0.05, 0.10]
    assert info["snapshot_steps"] == list(range(EVERY, STEPS + 1, EVERY))
    diff = (_vec(state) - direct).norm()
    spread = (_vec(final["phema"]["emas"][0]) - _vec(final["phema"]["emas"][2])).norm()
    rel = float(diff / direct.norm())
    print(f"\nrecon 0.07 vs tracked: rel L2 {rel:.3e}; {float(diff / spread):.3e} of the 0.05-0.10 spread")
    assert rel < 0.01
    assert float(diff / spread) < 0.1  # and small against how far apart the tracked EMAs are


@pytest.mark.slow
def test_the_cli_checkpoint_samples_through_sample_py(digits_run, tmp_path):
    _, two = digits_run
    out = tmp_path / "ema007.pt"
    assert main([str(two), "ema_std=0.07", f"out={out}"]) == 0
    obj = load_ckpt(out)
    recon, info = reconstruct(two, 0.07)
    assert obj["posthoc_ema"] == info and obj["step"] == STEPS and obj["ema"] == {}
    assert all(torch.equal(ckpt.model_weights(obj)[k], recon[k]) for k in recon)
    assert obj["config"] and obj["model_config"] and len(obj["class_names"]) == 10
    with pytest.raises(UserError, match="holds only the post-hoc EMA of sigma_rel 0.07: drop use_ema=false"):
        ckpt.model_weights(obj, use_ema=False)

    common = ["num_samples=4", "batch_size=4", "solver=ddim", "solver.steps=4", "hardware=cpu"]
    run_script("sample.py", f"checkpoint={out}", *common, f"hydra.run.dir={tmp_path / 's_file'}")
    # The same weights reconstructed on the fly, as a -m sweep over ema_std would.
    run_script(
        "sample.py",
        "-m",
        f"checkpoint={two}",
        "ema_std=0.07,0.1",
        *common,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    file_images = np.load(tmp_path / "s_file/samples.npz")["arr_0"]
    assert np.array_equal(file_images, np.load(tmp_path / "sweep/0/samples.npz")["arr_0"])
    assert not np.array_equal(file_images, np.load(tmp_path / "sweep/1/samples.npz")["arr_0"])


@pytest.mark.slow
def test_snapshots_survive_pruning_and_resume(tmp_path):
    over = ["save_every=2", "keep_last=1", "optim.ema_stds=[0.05,0.1]", "optim.ema_snapshot_every=3"]
    train(tiny_cfg(*over, "max_steps=7"), tmp_path)
    assert [s for s, _ in list_snapshots(tmp_path)] == [3, 6, 7]  # and the last step
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt")) == ["step_00000007.pt"]
    before = {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for _, p in list_snapshots(tmp_path)
    }
    train(tiny_cfg(*over, "max_steps=13"), tmp_path)  # resumes at 7
    after = {p.name: p for _, p in list_snapshots(tmp_path)}
    assert [s for s, _ in list_snapshots(tmp_path)] == [3, 6, 7, 9, 12, 13]
    for name, (ino, mtime, data) in before.items():  # neither lost nor rewritten
        stat = after[name].stat()
        assert (stat.st_ino, stat.st_mtime_ns, after[name].read_bytes()) == (ino, mtime, data)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt")) == ["step_00000013.pt"]
    snap = torch.load(after["snapshot-00000013.pt"], weights_only=True)
    assert (
        snap["step"] == 13
        and snap["stds"] == [0.05, 0.1]
        and set(snap) == {"format", "step", "stds", "params", "emas"}
    )  # compact: no optimizer, no model, no config
    assert all(t.dtype == torch.float32 for e in snap["emas"] for t in e.values())
    state = load_ckpt(tmp_path / "checkpoints/latest.pt")
    assert all(
        torch.equal(snap["emas"][i][k], state["phema"]["emas"][i][k]) for i in (0, 1) for k in snap["emas"][0]
    )


def test_power_emas_alone_sample_and_evaluate(tmp_path):
    """optim.ema_rates=[] with ema_stds: the first power EMA is what grids, evaluation and sampling use."""
    train(tiny_cfg("max_steps=3", "optim.ema_rates=[]", "optim.ema_stds=[0.1,0.05]"), tmp_path)
    state = load_ckpt(tmp_path / "checkpoints/latest.pt")
    assert state["ema"] == {} and state["phema"]["step"] == 3 and state["phema"]["stds"] == [0.1, 0.05]
    weights = ckpt.model_weights(state)
    assert all(torch.equal(weights[k], state["phema"]["emas"][0][k]) for k in weights)
    assert not torch.equal(weights["out.2.weight"], state["model"]["out.2.weight"])
    with pytest.raises(UserError, match=r"tracked power-function EMAs of sigma_rel \[0.1, 0.05\] only"):
        ckpt.model_weights(state, ema_rate=0.999)
    assert not list_snapshots(tmp_path)  # ema_snapshot_every=0: tracked, never snapshotted


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.ema_stds=[0.3]"], r"optim.ema_stds contains 0.3: every sigma_rel must be in \(0, 0.2887\)"),
        (["optim.ema_stds=[0]"], r"optim.ema_stds contains 0.0: every sigma_rel must be in"),
        (["optim.ema_stds=[0.05,0.05]"], r"optim.ema_stds=\[0.05, 0.05\] repeats a value"),
        (["optim.ema_snapshot_every=100"], "optim.ema_snapshot_every=100 without optim.ema_stds"),
        (
            ["optim.ema_stds=[0.1]", "optim.ema_snapshot_every=-1"],
            "optim.ema_snapshot_every=-1: must be >= 0",
        ),
        (["optim.ema_rates=[]"], r"optim.ema_rates is empty: .* or track power-function EMAs"),
    ],
)
def test_bad_phema_settings_are_rejected_before_work(tmp_path, overrides, message):
    with pytest.raises(TrainingError, match=message) as e:
        train(tiny_cfg("max_steps=1", *overrides), tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / SNAPSHOT_DIR).exists()


def test_resume_needs_the_same_stds(tmp_path):
    train(tiny_cfg("max_steps=2"), tmp_path)
    with pytest.raises(TrainingError, match=r"has no power-function EMAs but optim.ema_stds=\[0.1\]"):
        train(tiny_cfg("max_steps=3", "optim.ema_stds=[0.1]"), tmp_path)
    other = tmp_path / "other"
    train(tiny_cfg("max_steps=2", "optim.ema_stds=[0.1]"), other)
    with pytest.raises(
        TrainingError, match=r"tracks stds \[0.1\], this run \[0.05\]; keep the stds on resume"
    ):
        train(tiny_cfg("max_steps=3", "optim.ema_stds=[0.05]"), other)
    assert load_ckpt(other / "checkpoints/latest.pt")["step"] == 2  # nothing lost


def test_reconstruction_errors_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_cfg("max_steps=4", "optim.ema_stds=[0.05,0.1]"), run)  # tracked, no snapshots
    capsys.readouterr()  # training's progress bar
    cases = [
        ([str(run), "ema_std=0.07"], "no post-hoc EMA snapshots in"),
        (
            [str(tmp_path), "ema_std=0.07"],
            "has no checkpoints/latest.pt: pass the directory of a training run",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    snapped = tmp_path / "snapped"
    train(tiny_cfg("max_steps=20", "optim.ema_stds=[0.05,0.1]", "optim.ema_snapshot_every=5"), snapped)
    capsys.readouterr()
    for argv, message in [
        ([str(snapped), "ema_std=0.25"], "ema_std=0.25 is not representable by the snapshots"),
        ([str(snapped), "ema_std=0.5"], "outside (0, 0.2887)"),
        (
            [str(snapped), "ema_std=0.07", "step=4"],
            "no phema snapshot at or before step 4; the first is at step 5",
        ),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not list((snapped / SNAPSHOT_DIR).glob("phema-*.pt"))  # nothing written
    obj = posthoc_checkpoint(snapped / "checkpoints/step_00000020.pt", 0.07)
    assert obj["posthoc_ema"]["step"] == 20


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["ema_std=0.07", "use_ema=false"],
            "ema_std=0.07 reconstructs an EMA from the run's snapshots: drop use_ema=false",
        ),
        (["ema_std=0.07", "ema_rate=0.9999"], "drop ema_rate=0.9999"),
        (
            ["ema_std=0.07", "checkpoint=/no/such/run"],
            "checkpoint=/no/such/run: no such run directory or file",
        ),
    ],
)
def test_sample_py_ema_std_errors(tmp_path, args, message):
    proc = run_script(
        "sample.py", "checkpoint=/tmp", *args, "hardware=cpu", f"hydra.run.dir={tmp_path}", check=False
    )
    assert proc.returncode != 0 and message in proc.stdout and "Traceback" not in proc.stdout, proc.stdout
    assert not (tmp_path / "samples.npz").exists()
