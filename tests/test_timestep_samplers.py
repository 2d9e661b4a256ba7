"""Timestep samplers: the importance weights, the loss-second-moment warm-up and history, exact resume, and
identical state on every rank of a (gloo) process group."""

import io
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate

from diffusion.process.timestep_samplers import LossSecondMomentSampler, UniformSampler


def fill(sampler: LossSecondMomentSampler, history: dict[int, list[float]]) -> None:
    """Report losses one batch per position in the history lists."""
    for position in range(max(len(v) for v in history.values())):
        ts = [t for t, losses in history.items() if position < len(losses)]
        losses = [history[t][position] for t in ts]
        sampler.update_with_losses(torch.tensor(ts), torch.tensor(losses, dtype=torch.float64))


def roundtrip(state: dict) -> dict:
    """Through torch.save / weights_only load, as the engine's checkpoint does."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- uniform ----------------------------------------------------------------------------------------------------


def test_uniform_sampler_draws_every_timestep_with_unit_weights():
    sampler = UniformSampler(7)
    t, weights = sampler.sample(2000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (2000,)
    assert sorted(t.unique().tolist()) == list(range(7))
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.ones(2000), rtol=0, atol=1e-6)
    sampler.update_with_losses(t, torch.rand(2000))  # nothing to learn
    np.testing.assert_array_equal(sampler.weights(), np.ones(7))


def test_uniform_state_round_trips_and_checks_its_size():
    sampler = UniformSampler(7)
    UniformSampler(7).load_state_dict(roundtrip(sampler.state_dict()))
    with pytest.raises(ValueError, match="num_timesteps=7"):
        UniformSampler(8).load_state_dict(sampler.state_dict())


def test_draws_are_reproducible_from_a_generator_or_the_global_rng():
    sampler = UniformSampler(1000)
    a = sampler.sample(64, "cpu", generator=torch.Generator().manual_seed(5))[0]
    b = sampler.sample(64, "cpu", generator=torch.Generator().manual_seed(5))[0]
    c = sampler.sample(64, "cpu", generator=torch.Generator().manual_seed(6))[0]
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    torch.manual_seed(11)
    d = sampler.sample(64, "cpu")[0]
    torch.manual_seed(11)
    assert sampler.sample(64, "cpu")[0].tolist() == d.tolist()


# --- loss second moment -----------------------------------------------------------------------------------------


def test_stays_uniform_until_every_timestep_has_its_full_history():
    sampler = LossSecondMomentSampler(4, history_per_term=3, uniform_prob=0.1)
    fill(sampler, {0: [1, 1, 1], 1: [2, 2, 2], 2: [3, 3, 3], 3: [4, 4]})
    assert not sampler.warmed_up()
    np.testing.assert_array_equal(sampler.weights(), np.ones(4))
    t, weights = sampler.sample(100, "cpu", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(weights, torch.ones(100), rtol=0, atol=1e-6)
    fill(sampler, {3: [4]})
    assert sampler.warmed_up()
    assert not np.allclose(sampler.weights(), sampler.weights()[0])


def test_weights_are_the_rms_loss_mixed_with_uniform():
    sampler = LossSecondMomentSampler(4, history_per_term=3, uniform_prob=0.1)
    fill(sampler, {0: [1, 1, 1], 1: [2, 2, 2], 2: [0, 3, 4], 3: [1, 1, 2]})
    rms = np.array([1.0, 2.0, math.sqrt(25 / 3), math.sqrt(2.0)])
    expected = 0.9 * rms / rms.sum() + 0.1 / 4
    np.testing.assert_allclose(sampler.weights(), expected, rtol=1e-12)
    assert sampler.weights().sum() == pytest.approx(1.0)
    t, weights = sampler.sample(500, "cpu", generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(weights.numpy(), 1 / (4 * expected[t.numpy()]), rtol=1e-6)


def test_draws_follow_the_weights_and_importance_weights_unbias_the_mean():
    sampler = LossSecondMomentSampler(4, history_per_term=1, uniform_prob=0.0)
    fill(sampler, {0: [1.0], 1: [2.0], 2: [3.0], 3: [4.0]})
    t, weights = sampler.sample(200_000, "cpu", generator=torch.Generator().manual_seed(2))
    frequencies = np.bincount(t.numpy(), minlength=4) / len(t)
    np.testing.assert_allclose(frequencies, [0.1, 0.2, 0.3, 0.4], atol=0.005)
    f = torch.tensor([5.0, -1.0, 2.0, 0.5])  # any per-timestep quantity
    assert (weights * f[t]).mean().item() == pytest.approx(f.mean().item(), abs=0.05)


def test_history_keeps_the_most_recent_losses():
    sampler = LossSecondMomentSampler(2, history_per_term=3)
    fill(sampler, {0: [1, 2, 3, 4, 5], 1: [7]})
    state = sampler.state_dict()
    assert state["loss_history"][0].tolist() == [3, 4, 5]
    assert state["loss_history"][1].tolist() == [7, 0, 0]
    assert state["loss_counts"].tolist() == [3, 1]


def test_all_zero_losses_fall_back_to_uniform():
    sampler = LossSecondMomentSampler(3, history_per_term=1, uniform_prob=0.0)
    fill(sampler, {0: [0.0], 1: [0.0], 2: [0.0]})
    np.testing.assert_allclose(sampler.weights(), np.full(3, 1 / 3))


def test_state_round_trip_resumes_exactly():
    a = LossSecondMomentSampler(5, history_per_term=2, uniform_prob=0.05)
    fill(a, {0: [1, 2], 1: [3, 1], 2: [0.5, 0.5], 3: [2, 2], 4: [9, 1]})
    b = LossSecondMomentSampler(5, history_per_term=2, uniform_prob=0.05)
    b.load_state_dict(roundtrip(a.state_dict()))
    np.testing.assert_array_equal(a.weights(), b.weights())
    for sampler in (a, b):  # the same updates after resume keep them equal; the load did not alias a's arrays
        fill(sampler, {2: [4.0, 6.0]})
    np.testing.assert_array_equal(a.weights(), b.weights())
    draws = [s.sample(32, "cpu", generator=torch.Generator().manual_seed(9)) for s in (a, b)]
    assert draws[0][0].tolist() == draws[1][0].tolist()
    torch.testing.assert_close(draws[0][1], draws[1][1], rtol=0, atol=0)


def test_loading_a_differently_shaped_state_raises():
    state = LossSecondMomentSampler(5, history_per_term=2).state_dict()
    with pytest.raises(ValueError, match="num_timesteps=5"):
        LossSecondMomentSampler(6, history_per_term=2).load_state_dict(state)
    with pytest.raises(ValueError, match="history_per_term=2"):
        LossSecondMomentSampler(5, history_per_term=3).load_state_dict(state)


def test_builds_from_hydra_config_with_the_runtime_step_count():
    cfg = {"_target_": "diffusion.process.timestep_samplers.LossSecondMomentSampler", "history_per_term": 3}
    sampler = instantiate(cfg, num_timesteps=7)
    assert (sampler.num_timesteps, sampler.history_per_term, sampler.uniform_prob) == (7, 3, 0.001)
    uniform = instantiate({"_target_": "diffusion.process.timestep_samplers.UniformSampler"}, num_timesteps=7)
    assert uniform.weights().shape == (7,)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: UniformSampler(0), "num_timesteps"),
        (lambda: LossSecondMomentSampler(10, history_per_term=0), "history_per_term"),
        (lambda: LossSecondMomentSampler(10, uniform_prob=1.5), "uniform_prob"),
        (lambda: UniformSampler(10).sample(0, "cpu"), "batch_size"),
        (
            lambda: LossSecondMomentSampler(10).update_with_losses(torch.tensor([1, 2]), torch.ones(3)),
            "same length",
        ),
    ],
)
def test_bad_input_raises_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --- distributed ------------------------------------------------------------------------------------------------

STEPS = 10


def _rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        sampler = LossSecondMomentSampler(6, history_per_term=2, uniform_prob=0.01)
        generator = torch.Generator().manual_seed(100 + rank)  # ranks draw different timesteps
        log = []
        for step in range(STEPS):
            t, _ = sampler.sample(3 + 2 * rank, "cpu", generator=generator)  # and different batch sizes
            losses = (t.double() + 1) * (rank + 1) + 0.01 * step
            sampler.update_with_losses(t, losses)
            log.append((t, losses))
        torch.save({"state": sampler.state_dict(), "log": log}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_end_with_identical_state_holding_every_ranks_losses(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ("loss_history", "loss_counts"):
        torch.testing.assert_close(results[0]["state"][key], results[1]["state"][key], rtol=0, atol=0)
    # Replaying both ranks' batches in rank order on one process gives the same state: nothing was dropped.
    replay = LossSecondMomentSampler(6, history_per_term=2, uniform_prob=0.01)
    for step in range(STEPS):
        t = torch.cat([results[r]["log"][step][0] for r in range(2)])
        losses = torch.cat([results[r]["log"][step][1] for r in range(2)])
        replay.update_with_losses(t, losses)
    torch.testing.assert_close(replay.state_dict()["loss_history"], results[0]["state"]["loss_history"])
    assert replay.warmed_up()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_samples_land_on_the_requested_device_and_update_from_it():
    sampler = LossSecondMomentSampler(4, history_per_term=1)
    t, weights = sampler.sample(8, "cuda")
    assert t.device.type == "cuda" and weights.device.type == "cuda"
    sampler.update_with_losses(t, t.double() + 1)
    assert sampler.state_dict()["loss_counts"].sum() == len(t.unique())
