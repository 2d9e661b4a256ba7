"""The training loop's periodic jobs, each deciding when it is due (as torchtitan's components do).

The loop runs a step, then every job whose :meth:`Periodic.due` says so; adding a job is one object in the list,
not a block in the loop. A job is due every ``every`` steps (0: never, but at the end when ``at_end``) and at the
last step. Jobs run in list order, so a checkpoint is written before the grid and the evaluation of its step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class Periodic:
    """A job the loop runs when :meth:`due`. ``every``: its period in steps (0 = only at the end)."""

    at_end = True

    def __init__(self, every: int) -> None:
        self.every = int(every or 0)

    def due(self, step: int, done: bool) -> bool:
        """Whether to run after ``step`` (``done``: it was the last one). Every rank gets the same answer."""
        return (done and self.at_end) or (self.every > 0 and step % self.every == 0)

    def __call__(self, step: int, out) -> None:
        """Run after ``step``; ``out`` is the step's StepOutput."""
        raise NotImplementedError


class LogMetrics(Periodic):
    """The loss per quartile (reduced over ranks), lr, gradient norm, skipped steps and throughput, to the logger
    (rank 0) and into ``results`` (what ``train`` returns)."""

    def __init__(
        self, every, tracker, nonfinite, timer, state, hw, cfg, ckpt_dir: Path, logger, bar, results
    ):
        super().__init__(every)
        self.tracker, self.nonfinite, self.timer = tracker, nonfinite, timer
        self.state, self.hw, self.cfg, self.ckpt_dir = state, hw, cfg, ckpt_dir
        self.logger, self.bar, self.results = logger, bar, results

    def __call__(self, step: int, out) -> None:
        metrics = self.tracker.compute()  # every rank takes part in the reduction
        self.nonfinite.check(step, self.cfg.optim.max_nonfinite_steps, self.ckpt_dir)
        metrics.update(
            lr=self.state.scheduler.get_last_lr()[0],
            grad_norm=out.grad_norm.item(),
            skipped_steps=self.nonfinite.skipped.item(),
            images_seen=step * self.cfg.data.batch_size,
            **self.timer.rates(step),
        )
        if self.hw.precision == "fp16":
            metrics["loss_scale"] = self.state.scaler.get_scale()
        if self.hw.device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.hw.device) / 2**30
        self.results.clear()
        self.results.update(metrics)
        if self.logger is not None:
            self.logger.log({f"train/{k}": v for k, v in metrics.items()}, step)
            self.bar.set_postfix(
                loss=f"{metrics.get('loss', math.nan):.4f}", img_s=f"{metrics['images_per_s']:.1f}"
            )
            log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


class Checkpointing(Periodic):
    """The run's checkpoint every ``save_every`` steps, at the end, and when the cluster pre-empts the job (then
    the launcher requeues it). Checks the pre-emption flag on every step, on every rank."""

    def __init__(self, every: int, save: Callable[[], None], guard) -> None:
        super().__init__(every)
        self.save, self.guard = save, guard
        self.preempted = False

    def due(self, step: int, done: bool) -> bool:
        self.preempted = self.guard is not None and self.guard.requested_on_any_rank()  # same step everywhere
        return self.preempted or super().due(step, done)

    def __call__(self, step: int, out) -> None:
        self.save()
        if self.preempted:
            log.warning("pre-emption signal: saved step %d; handing over to the launcher to requeue", step)
            self.guard.hand_over()  # submitit requeues and exits; if the handler returns, training goes on


class SampleGrids(Periodic):
    """A progress grid of the first EMA every ``sample_every`` steps and at the end, written by rank 0."""

    def __init__(self, every: int, write: Callable[[], None], is_main: bool) -> None:
        super().__init__(every)
        self.write, self.is_main = write, is_main

    def due(self, step: int, done: bool) -> bool:
        return self.is_main and super().due(step, done)

    def __call__(self, step: int, out) -> None:
        self.write()


class EMASnapshots(Periodic):
    """Snapshots of the power-function EMAs (EDM2's post-hoc EMA) every ``ema_snapshot_every`` steps and at the
    end, written atomically by rank 0 (engine/phema.py); never, when the period is 0."""

    def __init__(self, every: int, write: Callable[[], None]) -> None:
        super().__init__(every)
        self.write = write

    def due(self, step: int, done: bool) -> bool:
        return self.every > 0 and super().due(step, done)

    def __call__(self, step: int, out) -> None:
        self.write()


class Evaluation(Periodic):
    """The task's evaluation of the first EMA every ``eval_every`` steps and at the end (every rank takes part);
    logged, added to ``results``, and ``best.pt`` written when it improves on the objective."""

    def __init__(self, every: int, task, state, run, logger, results, save_best: Callable[[], None]) -> None:
        super().__init__(every)
        self.task, self.state, self.run = task, state, run
        self.logger, self.results, self.save_best = logger, results, save_best

    def __call__(self, step: int, out) -> None:
        evaluation = self.task.evaluate(self.state.first_ema, step, self.run)
        if self.logger is not None and evaluation:
            self.logger.log(evaluation, step)
        self.results.update(evaluation)
        if self.task.objective is not None and self.state.record_if_best(evaluation, *self.task.objective):
            self.save_best()  # every rank decides alike: the evaluation is rank 0's
