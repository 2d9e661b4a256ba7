"""Running under SLURM and submitit: the guard that lets the training engine save a checkpoint before
submitit requeues a pre-empted or timed-out job (sweeps are launched by conf/hydra/launcher/slurm.yaml).

How a job is stopped and requeued (submitit 1.5, hydra-submitit-launcher 1.2, checked on the local cluster
of scripts/slurm_start.sh):

1. sbatch gets ``--signal=USR2@<signal_delay_s>``: SLURM sends USR2 to every process of the job step -- all
   ranks and their children, DataLoader workers included -- that many seconds before the time limit.
   ``scancel --signal=USR2 <job>`` does the same by hand. On preemption or cancel SLURM sends SIGTERM,
   then SIGKILL after KillWait / GraceTime.
2. Before our code runs, submitit binds USR2 to ``checkpoint_and_try_requeue`` and SIGTERM / SIGCONT to a
   handler that only logs them.
3. On USR2 submitit, on global rank 0 only, calls the launcher's ``checkpoint``: a new submission of the
   same launcher with the same arguments, hence the same overrides, job number and output directory. It
   pickles that over the job's submission, runs ``scontrol requeue <job id>`` and exits. SLURM kills the
   other ranks and later reruns the same job id from the start, so the engine must resume from the
   latest checkpoint in its output directory. Timeouts count against ``max_num_timeout``, preemptions
   do not. SLURM holds a requeued job for ``cred_expire`` (120 s by default, 10 s on the local cluster).

Python runs signal handlers between two bytecodes of the main thread, so submitit's handler fires at an
arbitrary point: mid optimizer step, or mid ``torch.save`` of an older checkpoint, and everything since the
last save is lost. :class:`PreemptionGuard` takes the signal over, only records it, and lets the engine
save at the next step boundary before handing the signal back to submitit.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from diffusion.errors import ConfigError

# What signal.signal accepts and returns: a callable, SIG_DFL / SIG_IGN (ints), or None for a C handler.
Handler = Callable[[int, FrameType | None], Any] | int | None


def preemption_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before the time limit: ``$SUBMITIT_PREEMPT_SIGNAL`` (submitit's
    own convention, e.g. ``USR2``) or USR2."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    try:
        return signal.Signals["SIG" + name.upper().removeprefix("SIG")]
    except KeyError:
        raise ConfigError(f"SUBMITIT_PREEMPT_SIGNAL={name!r} is not a signal name; use e.g. USR2") from None


class PreemptionGuard:
    """Turn SLURM's stop signals into a flag the training loop checks at step boundaries.

    The default signals are submitit's pre-timeout signal (USR2) and SIGTERM, which SLURM sends on
    preemption, ``scancel`` and at the hard time limit, and which submitit only logs: catching it saves the
    last steps before the SIGKILL that follows. SIGINT is left alone so Ctrl-C still stops at once, and
    USR1 because NCCL may use it.

    Use on every rank, after submitit set its handlers (that is, inside the task function), and before
    DataLoader workers fork: workers forked earlier keep submitit's handler, and SLURM's USR2 reaches them
    too, so a worker of rank 0 would requeue the job itself. Workers forked later inherit this guard, which
    in a child process only applies default dispositions (see :func:`_act_in_forked_child`)::

        guard = PreemptionGuard().install()
        for step in range(start, max_steps):
            train_step()
            if guard.requested_on_any_rank():  # ranks agree, so all stop at the same step
                save_checkpoint()               # rank 0 writes, then every rank passes a barrier
                guard.hand_over()               # submitit: rank 0 requeues and exits
        guard.uninstall()

    If ``hand_over`` returns (a rank other than 0 under submitit, or a signal whose previous handler only
    logs it), the process was meant to live on: the guard is armed again and training should continue
    until SLURM stops it. Returning from the task instead would leave a "success" result for a rank other
    than 0, and after a bare SIGTERM (preemption without USR2) the sweep would count a half-trained job as
    finished.

    :param signals: the signals to take over, most important first: the first one is handed over last,
        because submitit's handler for it does not return.
    """

    def __init__(self, signals: Sequence[int] | None = None) -> None:
        chosen = (preemption_signal(), signal.SIGTERM) if signals is None else tuple(signals)
        if not chosen:
            raise ValueError("signals must name at least one signal, e.g. (signal.SIGUSR2, signal.SIGTERM)")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"signals must not repeat a signal, got {list(chosen)}")
        uncatchable = {signal.SIGKILL, signal.SIGSTOP}
        if uncatchable & set(chosen):
            raise ValueError(f"signals cannot include SIGKILL or SIGSTOP, got {list(chosen)}")
        self.signals: tuple[signal.Signals, ...] = tuple(signal.Signals(s) for s in chosen)
        self.requested = False
        self.received: list[signal.Signals] = []
        self._previous: dict[signal.Signals, Handler] = {}
        self._owner_pid = os.getpid()

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> PreemptionGuard:
        """Take the signals over, remembering their current handlers. Main thread only (a Python rule)."""
        if self.installed:
            raise RuntimeError("PreemptionGuard is already installed")
        self._owner_pid = os.getpid()
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def uninstall(self) -> None:
        """Give the signals back to the handlers found by :meth:`install`."""
        for signum, previous in self._previous.items():
            # None means a handler installed from C that Python cannot restore; the default is closest.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def __enter__(self) -> PreemptionGuard:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Runs at an arbitrary point of the main thread: only record, never log, save or raise here.
        if os.getpid() != self._owner_pid:
            _act_in_forked_child(self._previous.get(signal.Signals(signum)), signum)
            return
        self.received.append(signal.Signals(signum))
        self.requested = True

    def requested_on_any_rank(self) -> bool:
        """Whether any rank got a stop signal; one collective call, so every rank must call it at the same
        step. Without an initialized process group this is just :attr:`requested`."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        # NCCL only reduces CUDA tensors.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def hand_over(self) -> None:
        """Call the handlers :meth:`install` displaced, as if the signals arrived now; call after saving.

        Each received signal is handed over once, the most important last. A rank that did not receive a
        signal itself (another rank did, see :meth:`requested_on_any_rank`) hands over the first one, so
        rank 0 still requeues. A default handler re-raises the signal: without submitit, SIGTERM and USR2
        end the process as they would have without the guard. If every handler returns, the guard is
        armed again with a clear flag.
        """
        if not self.installed:
            raise RuntimeError("hand_over() needs an installed PreemptionGuard")
        pending = list(dict.fromkeys(self.received)) or [self.signals[0]]
        pending.sort(key=self.signals.index, reverse=True)
        previous = dict(self._previous)
        self.uninstall()
        self.requested = False
        self.received = []
        for signum in pending:
            _call_handler(previous[signum], signum)
        self.install()


def _act_in_forked_child(previous: Handler, signum: int) -> None:
    """A process forked after :meth:`PreemptionGuard.install` inherited the guard but is not the one that
    saves: SLURM signals every process of the job, and ``multiprocessing`` stops children with SIGTERM.
    A default disposition still applies (SIGTERM ends the child); Python handlers such as submitit's, which
    would requeue the whole job from a DataLoader worker, are skipped."""
    if previous in (signal.SIG_DFL, None):
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def _call_handler(handler: Handler, signum: signal.Signals) -> None:
    """Run ``handler`` for ``signum`` as the signal machinery would."""
    if callable(handler):
        handler(signum, None)
    elif handler in (signal.SIG_DFL, None):
        # The default disposition is back in place (uninstall), so this terminates where the default does.
        signal.raise_signal(signum)
