"""Loggers and the loss tracker. W&B never touches the network here: runs are offline, HOME is a temporary
directory (no netrc), and the one online attempt points at a closed local port."""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from diffusion.engine.loggers import (
    JsonlLogger,
    LossTracker,
    WandbLogger,
    has_wandb_credentials,
    read_metrics_jsonl,
    read_wandb_history,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(isolated_wandb):
    """No credentials, no prompts, no console capture (see conftest.isolated_wandb)."""


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)


def _run_files(run_dir: Path, run_id: str, prefix: str = "offline-run-") -> list[Path]:
    return sorted(run_dir.glob(f"wandb/{prefix}*/run-{run_id}.wandb"))


def test_wandb_offline_run_reads_back_from_its_files(tmp_path):
    config = {"optim": {"lr": 1e-4, "ema_rates": [0.9999]}, "seed": 3}
    logger = WandbLogger(project="test", mode="offline", tags=["a"])
    run_id = logger.start(str(tmp_path), config, name="train-seed=3", group=None, run_id=None)
    logger.log({"train/loss": 0.5, "lr": 1e-4}, step=10)
    logger.log({"train/loss": 0.25, "lr": 2e-4}, step=20)
    logger.log({"train/loss": 0.125}, step=30)
    image = _image()
    logger.log_image("samples", image, step=30, caption="ema 0.9999")
    logger.finish()

    assert len(_run_files(tmp_path, run_id)) == 1
    read_id, read_config, rows = read_wandb_history(str(tmp_path))
    assert read_id == run_id
    assert read_config == config
    assert [row["_step"] for row in rows] == [10, 20, 30]
    assert [row["train/loss"] for row in rows] == [0.5, 0.25, 0.125]
    assert rows[0]["lr"] == pytest.approx(1e-4) and rows[1]["lr"] == pytest.approx(2e-4)
    # The image was logged at the metrics' step, so W&B merged it into the same row.
    last = rows[2]
    assert last["samples._type"] == "image-file"
    assert last["samples.caption"] == "ema 0.9999"
    assert (last["samples.width"], last["samples.height"]) == (10, 12)
    (png,) = tmp_path.glob(f"wandb/offline-run-*/files/{last['samples.path']}")
    np.testing.assert_array_equal(np.asarray(Image.open(png)), image)


def test_wandb_resume_continues_the_same_run(tmp_path):
    first = WandbLogger(mode="offline")
    run_id = first.start(str(tmp_path), {"seed": 0}, name="job", group="sweep-1", run_id=None)
    for step in range(3):
        first.log({"loss": float(step)}, step=step)
    first.finish(exit_code=1)  # the first attempt was preempted

    second = WandbLogger(mode="offline")
    assert second.start(str(tmp_path), {"seed": 0}, name="job", group="sweep-1", run_id=run_id) == run_id
    for step in range(3, 6):
        second.log({"loss": float(step)}, step=step)
    second.finish()

    assert len(_run_files(tmp_path, run_id)) == 2
    read_id, config, rows = read_wandb_history(str(tmp_path))
    assert read_id == run_id and config == {"seed": 0}
    assert [row["_step"] for row in rows] == [0, 1, 2, 3, 4, 5]
    assert [row["loss"] for row in rows] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_reader_applies_config_updates_made_after_init(tmp_path):
    import wandb

    run = wandb.init(dir=str(tmp_path), mode="offline", config={"a": 1, "b": 2})
    run.config.update({"b": 3, "c": [1, 2]}, allow_val_change=True)
    run.finish()
    assert read_wandb_history(str(tmp_path))[1] == {"a": 1, "b": 3, "c": [1, 2]}


def test_wandb_mode_from_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger(mode="offline")
    run_id = logger.start(str(tmp_path), {}, name="job", group=None, run_id="fixed1")
    logger.log({"loss": 1.0}, step=0)
    logger.finish()
    assert run_id == "fixed1"
    assert not (tmp_path / "wandb").exists()

    monkeypatch.setenv("WANDB_MODE", "cloud")
    with pytest.raises(ValueError, match="WANDB_MODE must be one of"):
        WandbLogger(mode="offline").start(str(tmp_path), {}, name="job", group=None, run_id=None)


def test_online_without_api_key_falls_back_to_offline(tmp_path):
    assert not has_wandb_credentials()
    logger = WandbLogger(mode="online")
    with pytest.warns(RuntimeWarning, match="no W&B API key"):
        run_id = logger.start(str(tmp_path), {"a": 1}, name="job", group=None, run_id=None)
    logger.log({"loss": 2.0}, step=1)
    logger.finish()
    assert len(_run_files(tmp_path, run_id)) == 1
    assert read_wandb_history(str(tmp_path))[2] == [{"_step": 1, "loss": 2.0}]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_online_with_unreachable_server_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    logger = WandbLogger(mode="online", init_timeout=2)
    with pytest.warns(RuntimeWarning, match="online init failed"):
        run_id = logger.start(str(tmp_path), {}, name="job", group=None, run_id="net0")
    assert run_id == "net0"
    logger.log({"loss": 3.0}, step=4)
    logger.finish()
    assert len(_run_files(tmp_path, run_id)) == 1
    assert read_wandb_history(str(tmp_path))[2] == [{"_step": 4, "loss": 3.0}]


def test_netrc_entry_for_the_server_counts_as_credentials(tmp_path, monkeypatch):
    netrc_path = tmp_path / "netrc"
    netrc_path.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_path))
    assert has_wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not has_wandb_credentials()


def test_bad_logger_inputs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        WandbLogger(mode="cloud")
    with pytest.raises(ValueError, match="init_timeout"):
        WandbLogger(init_timeout=0)
    with pytest.raises(RuntimeError, match="start"):
        WandbLogger().log({"loss": 1.0}, step=0)
    logger = JsonlLogger()
    logger.start(str(tmp_path), {}, name="job")
    with pytest.raises(ValueError, match="uint8"):
        logger.log_image("samples", _image().astype(np.float32), step=0)
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        logger.log_image("samples", np.zeros((4, 4, 2), np.uint8), step=0)


def test_jsonl_logger_round_trip_and_resume(tmp_path):
    first = JsonlLogger()
    run_id = first.start(str(tmp_path), {"seed": 0}, name="job", group=None, run_id=None)
    first.log({"train/loss": torch.tensor(0.5), "lr": np.float32(0.25)}, step=1)
    first.log_image("samples/ema", _image(1), step=1, caption="grid")
    first.finish()
    second = JsonlLogger()
    assert second.start(str(tmp_path), {"seed": 0}, name="job", run_id=run_id) == run_id
    gray = _image(2)[:, :, :1]
    second.log_image("gray", gray, step=2)
    second.log({"train/loss": 0.125}, step=2)
    second.finish()

    records = read_metrics_jsonl(str(tmp_path))
    assert records == [
        {"step": 1, "train/loss": 0.5, "lr": 0.25},
        {"step": 1, "samples/ema": "images/samples_ema_00000001.png", "samples/ema_caption": "grid"},
        {"step": 2, "gray": "images/gray_00000002.png"},
        {"step": 2, "train/loss": 0.125},
    ]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / records[1]["samples/ema"])), _image(1))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / records[2]["gray"])), gray[:, :, 0])


@pytest.mark.parametrize("name, target", [("wandb", WandbLogger), ("none", JsonlLogger)])
def test_logger_configs_instantiate(name, target):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from diffusion.config.store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(overrides=[f"+logger={name}"])
    logger = instantiate(cfg.logger)
    assert type(logger) is target
    if target is WandbLogger:
        assert (logger.mode, logger.project, logger.tags) == ("offline", "diffusion", None)


HYDRA_APP = """
import hydra
from hydra.core.hydra_config import HydraConfig
from diffusion.engine.loggers import run_name_and_group

@hydra.main(version_base=None, config_path=None)
def main(cfg):
    print("NAME_GROUP", repr(run_name_and_group(HydraConfig.get())))

main()
"""


def _name_groups(tmp_path: Path, *args: str) -> list[tuple]:
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(HYDRA_APP))
    out = subprocess.run(
        [sys.executable, str(app), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=True,
    ).stdout
    return [
        ast.literal_eval(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("NAME_GROUP")
    ]


@pytest.mark.slow
def test_run_name_and_group_from_hydra_job(tmp_path):
    assert _name_groups(tmp_path, f"hydra.run.dir={tmp_path}/run") == [("app", None)]
    assert _name_groups(tmp_path, "+lr=0.1", f"hydra.run.dir={tmp_path}/run") == [("app-+lr=0.1", None)]
    sweep = _name_groups(tmp_path, "-m", "+lr=0.1,0.2", f"hydra.sweep.dir={tmp_path}/sweep-7")
    assert sweep == [("app-+lr=0.1", "sweep-7"), ("app-+lr=0.2", "sweep-7")]


def _expected_means(losses: np.ndarray, t: np.ndarray, num_timesteps: int, term: str) -> dict[str, float]:
    """Reference: per-example means over the whole interval and over each quartile's examples."""
    out = {f"train/{term}": losses.mean()}
    quartile = np.floor(4 * t / num_timesteps).astype(int)
    for q in range(4):
        if (quartile == q).any():
            out[f"train/{term}_q{q}"] = losses[quartile == q].mean()
    return out


def test_loss_tracker_means_match_per_example_reference():
    gen = torch.Generator().manual_seed(0)
    num_timesteps = 1000
    tracker = LossTracker(num_timesteps, "cpu")
    batches = []
    for n in (5, 17, 3):  # unequal batches: a mean of batch means would differ from the per-example mean
        t = torch.randint(0, num_timesteps, (n,), generator=gen)
        terms = {
            "loss": torch.rand(n, generator=gen) * 10,
            "mse": torch.rand(n, generator=gen, requires_grad=True),
        }
        tracker.add(terms, t)
        batches.append((terms, t))
    got = tracker.compute()

    t_all = torch.cat([t for _, t in batches]).numpy()
    expected = {}
    for term in ("loss", "mse"):
        losses = torch.cat([terms[term] for terms, _ in batches]).detach().double().numpy()
        expected.update(_expected_means(losses, t_all, num_timesteps, term))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    assert tracker.compute() == {}  # compute resets


def test_loss_tracker_quartile_boundaries_and_empty_quartiles():
    tracker = LossTracker(10, torch.device("cpu"), prefix="")
    # floor(4t/10): t=2 -> 0, t=3 -> 1, t=7 -> 2, t=9 -> 3
    tracker.add({"loss": torch.tensor([1.0, 2.0])}, torch.tensor([2, 3]))
    tracker.add({"loss": torch.tensor([4.0, 8.0])}, torch.tensor([2, 9]))
    assert tracker.compute() == {"loss": 3.75, "loss_q0": 2.5, "loss_q1": 2.0, "loss_q3": 8.0}
    tracker.add({"loss": torch.tensor([6.0])}, torch.tensor([7]))
    assert tracker.compute() == {"loss": 6.0, "loss_q2": 6.0}


def test_loss_tracker_rejects_bad_input():
    with pytest.raises(ValueError, match="num_timesteps"):
        LossTracker(0, "cpu")
    tracker = LossTracker(100, "cpu")
    with pytest.raises(ValueError, match=r"terms\['loss'\] must have shape"):
        tracker.add({"loss": torch.ones(3)}, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="t must be a 1-D"):
        tracker.add({"loss": torch.ones(4)}, torch.zeros(2, 2, dtype=torch.long))


def _tracker_worker(rank: int, world_size: int, init_file: str, shards: list, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        tracker = LossTracker(1000, "cpu")
        for losses, t in shards[rank]:
            tracker.add({"loss": torch.from_numpy(losses)}, torch.from_numpy(t))
        result = tracker.compute()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_loss_tracker_reduces_across_two_gloo_ranks(tmp_path):
    rng = np.random.default_rng(1)
    # Rank 0 only sees the first half of the timesteps and rank 1 the second, so neither rank alone has every
    # quartile and the global means need the all_reduce.
    shards = [
        [(rng.random(n).astype(np.float32), rng.integers(lo, hi, n)) for n in (4, 9)]
        for lo, hi in ((0, 500), (500, 1000))
    ]
    mp.spawn(_tracker_worker, args=(2, str(tmp_path / "init"), shards, str(tmp_path)), nprocs=2, join=True)

    losses = np.concatenate([losses for shard in shards for losses, _ in shard]).astype(np.float64)
    t = np.concatenate([t for shard in shards for _, t in shard])
    expected = _expected_means(losses, t, 1000, "loss")
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-6), (rank, key)
