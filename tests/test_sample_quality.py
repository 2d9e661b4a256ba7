"""Sample quality during training: eval/* in W&B's own files, best.pt following the objective, the same numbers
on 1 and 2 ranks, and a missing reference or weights file refused before training starts."""

from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from diffusion.config import build
from diffusion.data.images import to_uint8
from diffusion.engine import checkpoint as ckpt
from diffusion.engine.training import TrainingError, TrainState, build_task, train
from diffusion.evaluation.evaluator import Evaluator
from diffusion.evaluation.inception import WEIGHTS_FILENAME, random_inception_state_dict
from diffusion.evaluation.sample_quality import (
    OBJECTIVES,
    ObjectiveError,
    SampleQuality,
    objective_direction,
    objective_value,
)

from conftest import PYTHON, ROOT, TORCHRUN, load_ckpt, run_script, tiny_cfg

# Digit features on a few samples of a 2-step solver: fast enough for a test on a 2-core CPU.
EVAL = ["eval=digits", "eval.num_samples=12", "eval.batch_size=6", "solver=ddim", "solver.steps=2"]
METRICS = ("eval/fid", "eval/sfid", "eval/is", "eval/precision", "eval/recall")


def eval_rows(path) -> list[dict]:
    return [r for r in map(json.loads, open(path)) if "eval/fid" in r]


@pytest.mark.slow
@pytest.mark.usefixtures("isolated_wandb")
def test_eval_metrics_reach_the_wandb_files_and_best_pt_is_the_best_logged(tmp_path):
    cfg = tiny_cfg(*EVAL, "logger=wandb", "logger.mode=offline", "max_steps=6", "eval_every=2", "log_every=2")
    final = train(cfg, tmp_path, name="eval")
    _, _, rows = read_wandb_history_rows(tmp_path)
    evals = [r for r in rows if "eval/fid" in r]
    assert [r["_step"] for r in evals] == [2, 4, 6]
    for row in evals:
        assert set(METRICS) <= set(row) and all(math.isfinite(row[k]) for k in METRICS)
    # best.pt is the step of the lowest logged FID, and a complete checkpoint of it
    best_row = min(evals, key=lambda r: r["eval/fid"])
    best = ckpt.load_checkpoint(tmp_path / "checkpoints" / ckpt.BEST)
    assert best["step"] == best_row["_step"]
    assert best["best"] == {"key": "eval/fid", "value": best_row["eval/fid"], "step": best_row["_step"]}
    assert {"model", "ema", "optimizer", "scheduler", "rng", "config"} <= set(best)
    for key in METRICS:  # train() returns the last evaluation
        assert final[key] == evals[-1][key]

    # The numbers are those of the final EMA's samples, recomputed here from the checkpoint by hand.
    last = load_ckpt(tmp_path / "checkpoints" / ckpt.LATEST)
    task = build_task(cfg)
    model, _ = task.build_model(cfg.model, _digits(cfg))
    model = build(cfg.hardware, local_rank=0).prepare_model(model)  # the engine's layout: the same kernels
    model.load_state_dict(last["ema"][next(iter(last["ema"]))])
    from diffusion.sampling.generate import generate

    images = []
    for start in range(0, 12, 6):
        idx = list(range(start, start + 6))
        x = generate(
            model.eval(), task.diffusion, task.solver, idx, 0, torch.device("cpu"), torch.tensor(idx) % 10
        )
        images.append(to_uint8(x))
    evaluator = Evaluator(features="digits", batch_size=6)
    expected = evaluator.compute_metrics(evaluator.extract(np.concatenate(images)))
    for key, value in expected.items():
        assert math.isclose(evals[-1][f"eval/{key}"], value, rel_tol=1e-6, abs_tol=1e-9), key


def read_wandb_history_rows(run_dir):
    from diffusion.engine.loggers import read_wandb_history

    return read_wandb_history(str(run_dir))


def _digits(cfg):
    from diffusion.data.build import build_dataset

    return build_dataset(cfg.data)


@pytest.mark.slow
def test_best_pt_follows_the_objective_through_pruning_and_resume(tmp_path, monkeypatch):
    """A known FID sequence (the metric computation patched): best.pt is rewritten only on improvement, outlives
    the pruned periodic checkpoint of its step, and a resumed run still knows the best value."""
    sequence = iter([5.0, 3.0, 4.0, 6.0, 3.5, 1.0])
    seen = []

    def known(self, features):
        fid = next(sequence)
        seen.append(fid)
        return {"fid": fid, "sfid": 0.0, "is": 1.0, "precision": 0.5, "recall": 0.5}

    monkeypatch.setattr(Evaluator, "compute_metrics", known)
    common = [*EVAL, "eval.num_samples=4", "eval.batch_size=4", "eval_every=1", "save_every=1", "keep_last=1"]
    train(tiny_cfg(*common, "max_steps=4"), tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.pt", "latest.pt", "step_00000004.pt"]
    best = ckpt.load_checkpoint(ckpts / "best.pt")
    assert best["step"] == 2 and best["best"] == {"key": "eval/fid", "value": 3.0, "step": 2}
    # latest.pt was saved before step 4's evaluation; the best record rides in it too.
    assert load_ckpt(ckpts / "latest.pt")["best"]["value"] == 3.0

    train(tiny_cfg(*common, "max_steps=6"), tmp_path)  # resumes: 3.5 at step 5 is no better than 3.0
    assert seen == [5.0, 3.0, 4.0, 6.0, 3.5, 1.0]
    best = ckpt.load_checkpoint(ckpts / "best.pt")
    assert best["step"] == 6 and best["best"]["value"] == 1.0
    rows = eval_rows(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["eval/fid"]) for r in rows] == list(zip(range(1, 7), seen))


def test_best_record_directions_and_non_finite_values():
    state = TrainState.__new__(TrainState)
    state.best, state.step = {}, 1
    assert state.record_if_best({"eval/is": 2.0}, "eval/is", "maximize")
    state.step = 2
    assert not state.record_if_best({"eval/is": 1.5}, "eval/is", "maximize")
    assert not state.record_if_best({"eval/is": float("nan")}, "eval/is", "maximize")
    state.step = 3
    assert state.record_if_best({"eval/is": 2.5}, "eval/is", "maximize") and state.best["step"] == 3
    assert not state.record_if_best({}, "eval/is", "maximize")  # nothing evaluated at this step
    with pytest.raises(TrainingError, match="eval/is is not among"):
        state.record_if_best({"eval/fid": 1.0}, "eval/is", "maximize")
    # a best of another objective (the run was resumed with eval.objective changed) does not count
    assert state.record_if_best({"eval/fid": 9.0}, "eval/fid", "minimize") and state.best["key"] == "eval/fid"


def test_objectives_and_what_train_py_returns():
    assert {k: objective_direction(k) for k in ("fid", "sfid", "is", "precision", "recall", "loss")} == {
        "fid": "minimize", "sfid": "minimize", "is": "maximize", "precision": "maximize", "recall": "maximize",
        "loss": "minimize",
    }  # fmt: skip
    assert set(OBJECTIVES) == {"fid", "sfid", "is", "precision", "recall", "loss"}
    assert objective_value("fid", {"loss": 0.5, "eval/fid": 12.0}) == 12.0
    assert objective_value("loss", {"loss": 0.5, "eval/fid": 12.0}) == 0.5
    assert objective_value("fid", {"loss": 0.5}) is None  # a single run returns what it has
    with pytest.raises(ObjectiveError, match="returned no eval/fid"):
        objective_value("fid", {"loss": 0.5}, strict=True)  # a sweep trial fails instead
    with pytest.raises(ObjectiveError, match="eval/fid is nan"):
        objective_value("fid", {"eval/fid": float("nan")}, strict=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval=inception"], "eval=inception needs eval.reference=PATH"),
        (["eval=digits", "eval.objective=recal"], "eval.objective='recal': choose one of"),
        (["eval.objective=fid"], "eval.objective=fid needs samples to evaluate"),
        (["eval=digits", "eval.num_samples=3"], "eval.num_samples=3"),
        (["eval=digits", "eval.guidance_scale=2"], "eval.guidance_scale=2.0 needs a model trained with"),
    ],
)
def test_bad_eval_settings_fail_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_cfg(*overrides, "max_steps=1"), tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILENAME
    torch.save(random_inception_state_dict(seed=0), path)
    return path


def test_missing_reference_or_weights_or_a_reference_of_another_size_fail_before_training(
    tmp_path, random_weights
):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((8, 16, 16, 1), np.uint8))
    cases = [
        ([f"eval.reference={tmp_path / 'nope.npz'}", f"eval.inception_weights={random_weights}"], "No such file"),
        ([f"eval.reference={ref}", f"eval.inception_weights={tmp_path / 'nope.pth'}"], "download https://"),
        ([f"eval.reference={ref}", f"eval.inception_weights={random_weights}"], "holds 16x16x1 images but the "
         "model makes 8x8x1"),
    ]  # fmt: skip
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            train(tiny_cfg("eval=inception", *overrides, "max_steps=1"), tmp_path / "run")
        assert "\n" not in str(error.value)
        assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_train_py_prints_one_line_for_a_missing_weights_file(tmp_path):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((8, 8, 8, 1), np.uint8))
    proc = run_script(
        "train.py", *TINY_ARGS, "eval=inception", f"eval.reference={ref}", "eval.download_weights=false",
        f"eval.inception_weights={tmp_path / 'missing.pth'}", f"hydra.run.dir={tmp_path / 'run'}", check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout
    (line,) = [x for x in proc.stdout.splitlines() if "ERROR" in x]
    assert f"Inception weights file {tmp_path / 'missing.pth'} does not exist: download https://" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


TINY_ARGS = [
    "model=unet_digits", "model.image_size=8", "model.num_channels=32", "model.channel_mult=[1,2]",
    "model.attention_resolutions=[4]", "model.num_head_channels=16", "data=digits", "data.batch_size=8",
    "hardware=cpu", "logger=none", "log_every=1", "save_every=0",
]  # fmt: skip

# One evaluation of a seeded network, on however many ranks torchrun starts; rank 0 writes the numbers.
RANKS_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from conftest import tiny_cfg
from diffusion.runtime.distributed import cleanup_distributed, init_distributed
from diffusion.engine.tasks import RunContext
from diffusion.data.build import build_dataset
from diffusion.engine.training import build_task
from diffusion.config import build

torch.set_num_threads(1)
env = init_distributed()
cfg = tiny_cfg(*{overrides!r})
task = build_task(cfg)
torch.manual_seed(0)
model, _ = task.build_model(cfg.model, build_dataset(cfg.data))
hw = build(cfg.hardware, local_rank=env.local_rank)
out = task.evaluate(model.eval(), 7, RunContext(hw=hw, env=env, seed=3))
if env.is_main:
    json.dump(out, open(sys.argv[1], "w"))
cleanup_distributed()
"""


@pytest.mark.slow
def test_one_and_two_ranks_give_the_same_numbers(tmp_path):
    """9 samples (rank 0 makes 5, rank 1 makes 4) and the 450 reference digits spread over 2 gloo ranks give the
    numbers of one process, bit for bit: an image's noise depends only on its index, each image is generated
    alone (eval.batch_size=1, so no kernel sees another batch shape), and the features are gathered back into
    image order."""
    script = tmp_path / "evaluate_once.py"
    overrides = ["eval=digits", "eval.num_samples=9", "eval.batch_size=1", "solver=ddpm", "solver.steps=3"]
    script.write_text(RANKS_SCRIPT.format(tests=str(ROOT / "tests"), overrides=overrides))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([PYTHON, str(script), str(tmp_path / "one.json")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "two.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert set(METRICS) <= set(a)
    for key in METRICS:
        assert a[key] == b[key], (key, a[key], b[key])


@pytest.mark.slow
def test_two_rank_training_evaluates_and_keeps_best_pt(tmp_path):
    proc = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"), *TINY_ARGS, *EVAL,
         "data.batch_size=16", "max_steps=2", "eval_every=1", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = eval_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    best = min(rows, key=lambda r: r["eval/fid"])
    assert load_ckpt(tmp_path / "checkpoints" / "best.pt")["step"] == best["step"]
    assert "eval at step 2" in (tmp_path / "train.log").read_text()


def test_the_none_option_evaluates_nothing():
    quality = SampleQuality()
    assert not quality.enabled and quality.tracked is None
    assert quality(None, None, None, 1, None) == {}
