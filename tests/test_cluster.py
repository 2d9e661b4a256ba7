"""PreemptionGuard with real signals: recording, handing over to the displaced handler, forked children,
agreement across ranks, and the whole save-then-requeue cycle through submitit's own signal handler."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
from pathlib import Path

import cloudpickle
import pytest
import submitit
import torch.distributed as dist

from diffusion.engine.cluster import PreemptionGuard, preemption_signal

USR2, TERM = signal.SIGUSR2, signal.SIGTERM


@pytest.fixture
def calls():
    """Python handlers standing in for submitit's, installed before the guard and restored afterwards."""
    seen: list[int] = []
    saved = {s: signal.getsignal(s) for s in (USR2, TERM)}
    for s in saved:
        signal.signal(s, lambda signum, frame: seen.append(signum))
    yield seen
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_signal_only_sets_the_flag_until_hand_over(calls):
    guard = PreemptionGuard((USR2, TERM)).install()
    assert not guard.requested
    os.kill(os.getpid(), USR2)
    assert guard.requested and guard.received == [USR2]
    assert calls == []  # the displaced handler waits for the engine to save
    guard.hand_over()
    assert calls == [USR2]
    guard.uninstall()


def test_hand_over_calls_each_received_signal_once_most_important_last(calls):
    guard = PreemptionGuard((USR2, TERM)).install()
    for signum in (USR2, TERM, USR2):
        os.kill(os.getpid(), signum)
    assert guard.received == [USR2, TERM, USR2]
    guard.hand_over()
    # submitit's USR2 handler requeues and exits, so it must come after the handler that only logs SIGTERM.
    assert calls == [TERM, USR2]
    guard.uninstall()


def test_hand_over_without_a_local_signal_hands_over_the_first(calls):
    # Another rank got the signal (requested_on_any_rank); this one hands over so rank 0 still requeues.
    guard = PreemptionGuard((USR2, TERM)).install()
    guard.hand_over()
    assert calls == [USR2]
    guard.uninstall()


def test_guard_is_armed_again_when_hand_over_returns(calls):
    guard = PreemptionGuard((USR2,)).install()
    os.kill(os.getpid(), USR2)
    guard.hand_over()
    assert not guard.requested and guard.received == []
    os.kill(os.getpid(), USR2)
    assert guard.requested and calls == [USR2]
    guard.uninstall()


def test_uninstall_restores_the_displaced_handlers(calls):
    before = {s: signal.getsignal(s) for s in (USR2, TERM)}
    with PreemptionGuard((USR2, TERM)) as guard:
        assert signal.getsignal(USR2) == guard._record
    assert {s: signal.getsignal(s) for s in (USR2, TERM)} == before
    os.kill(os.getpid(), TERM)
    assert calls == [TERM] and not guard.requested


def _save_then_hand_over(marker: str) -> None:
    """Child process: SIGTERM has its default disposition, as in a plain `python train.py`."""
    signal.signal(TERM, signal.SIG_DFL)
    guard = PreemptionGuard((USR2, TERM)).install()
    os.kill(os.getpid(), TERM)
    assert guard.requested
    Path(marker).write_text("saved")  # the engine's checkpoint
    guard.hand_over()
    Path(marker).write_text("survived")  # never reached: the default action ends the process


def test_default_disposition_ends_the_process_after_the_save(tmp_path):
    marker = tmp_path / "marker"
    proc = mp.get_context("fork").Process(target=_save_then_hand_over, args=(str(marker),))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -TERM
    assert marker.read_text() == "saved"


def _forked_child_of_guarded_process(signum: int, previous_is_python: bool, out: str) -> None:
    """Install the guard, fork a worker, signal the worker and report how each process fared."""
    if previous_is_python:
        # Stands in for submitit's handler; a file shows whether it ran, in whichever process.
        signal.signal(signum, lambda s, f: Path(out + ".handler").write_text(str(os.getpid())))
    else:
        signal.signal(signum, signal.SIG_DFL)
    guard = PreemptionGuard((signum,)).install()
    ctx = mp.get_context("fork")
    started = ctx.Event()
    worker = ctx.Process(target=_sleep_then_report, args=(started, out + ".worker"))
    worker.start()
    # A signal that lands while the child is still inside fork() is dropped by Python: wait until it runs.
    assert started.wait(30)
    os.kill(worker.pid, signum)
    worker.join(30)
    Path(out).write_text(json.dumps({"worker_exit": worker.exitcode, "requested": guard.requested}))


def _sleep_then_report(started, out: str) -> None:
    import time

    started.set()
    time.sleep(1.0)
    Path(out).write_text("alive")


def _run_forked_scenario(tmp_path, signum: int, previous_is_python: bool) -> dict:
    out = str(tmp_path / "report.json")
    proc = mp.get_context("fork").Process(
        target=_forked_child_of_guarded_process, args=(signum, previous_is_python, out)
    )
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    report = json.loads(Path(out).read_text())
    report["worker_reported"] = Path(out + ".worker").exists()
    report["handler_ran"] = Path(out + ".handler").exists()
    return report


def test_forked_child_keeps_the_default_action(tmp_path):
    # multiprocessing stops children with SIGTERM: the inherited guard must not make them immortal.
    report = _run_forked_scenario(tmp_path, TERM, previous_is_python=False)
    assert report == {
        "worker_exit": -TERM,
        "requested": False,
        "worker_reported": False,
        "handler_ran": False,
    }


def test_forked_child_never_runs_python_handlers(tmp_path):
    # A DataLoader worker must not run submitit's USR2 handler (it would requeue the job from the worker),
    # nor flag the parent's guard: it ignores the signal and keeps working.
    report = _run_forked_scenario(tmp_path, USR2, previous_is_python=True)
    assert report == {"worker_exit": 0, "requested": False, "worker_reported": True, "handler_ran": False}


def _rank_flags(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    guard = PreemptionGuard((USR2,))
    guard.requested = rank == 1  # only rank 1 got the signal before this step boundary
    first = guard.requested_on_any_rank()
    guard.requested = False
    second = guard.requested_on_any_rank()
    dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps([first, second]))


def test_ranks_agree_when_any_rank_was_signalled(tmp_path):
    ctx = mp.get_context("fork")
    out = str(tmp_path / "agree")
    procs = [ctx.Process(target=_rank_flags, args=(r, str(tmp_path / "pg"), out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)] == [[True, False], [True, False]]


def test_requested_on_any_rank_is_the_local_flag_without_a_process_group():
    guard = PreemptionGuard((USR2,))
    assert guard.requested_on_any_rank() is False
    guard.requested = True
    assert guard.requested_on_any_rank() is True


def test_default_signals_follow_submitit(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert PreemptionGuard().signals == (USR2, TERM)
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert preemption_signal() == signal.SIGUSR1
    assert PreemptionGuard().signals == (signal.SIGUSR1, TERM)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"signals": ()}, "at least one signal"),
        ({"signals": (USR2, USR2)}, "must not repeat"),
        ({"signals": (USR2, signal.SIGKILL)}, "SIGKILL or SIGSTOP"),
    ],
)
def test_bad_signals_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreemptionGuard(**kwargs)


def test_bad_preemption_signal_name_is_rejected(monkeypatch):
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "BOGUS")
    with pytest.raises(ValueError, match="SUBMITIT_PREEMPT_SIGNAL='BOGUS'"):
        preemption_signal()


def test_misuse_is_reported():
    guard = PreemptionGuard((USR2,))
    with pytest.raises(RuntimeError, match="needs an installed"):
        guard.hand_over()
    with guard, pytest.raises(RuntimeError, match="already installed"):
        guard.install()


class CountingJob:
    """A submitit job shaped like the Hydra launcher: `checkpoint` resubmits the same callable.

    Each step appends to a file; the first attempt signals itself at step 3, as SLURM would before the
    time limit, saves at the step boundary and hands over to submitit, which requeues the job."""

    def __call__(self, folder: str, total: int) -> list[int]:
        state = Path(folder) / "state.json"
        start = json.loads(state.read_text())["step"] if state.exists() else 0
        attempts = Path(folder) / "attempts"
        with attempts.open("a") as f:
            f.write(f"{start}\n")
        guard = PreemptionGuard().install()
        for step in range(start + 1, total + 1):
            if step == 3 and start == 0:
                os.kill(os.getpid(), preemption_signal())
            if guard.requested_on_any_rank():
                state.write_text(json.dumps({"step": step - 1}))
                guard.hand_over()
        guard.uninstall()
        return [int(x) for x in attempts.read_text().split()]

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


@pytest.mark.slow
def test_submitit_requeues_after_the_save_and_the_job_resumes(tmp_path, monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    # The job runs in a fresh interpreter that cannot import this test module: ship it by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
        executor.update_parameters(timeout_min=5, gpus_per_node=0)
        job = executor.submit(CountingJob(), str(tmp_path), 6)
        attempts = job.result()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    # Two attempts: the first saved step 2 when signalled at step 3, the second resumed from it.
    assert attempts == [0, 2]
    log = job.stdout() or ""  # submitit logs INFO lines to stdout
    assert "Calling checkpoint method" in log and "Requeued job" in log
