"""Timestep samplers for training: which timestep each example gets, and the importance weight that keeps the
weighted loss an unbiased estimate of the loss averaged over uniformly drawn timesteps.

Built from Hydra config with the process's (respaced) step count known only at run time:
``hydra.utils.instantiate(cfg.sampler, num_timesteps=diffusion.num_timesteps)``.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from diffusion.errors import ConfigError


class ScheduleSampler:
    """
    A distribution over the T timesteps, given by :meth:`weights`; subclasses decide how it evolves.

    :param num_timesteps: the number of timesteps T of the diffusion process.
    """

    def __init__(self, num_timesteps: int):
        self.num_timesteps = _positive_int("num_timesteps", num_timesteps)

    def weights(self) -> np.ndarray:
        """Unnormalised, positive sampling weights, a float64 array [T]."""
        raise NotImplementedError

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """
        Draw timesteps for a batch.

        :param batch_size: the number of timesteps N to draw.
        :param device: where the returned tensors live.
        :param generator: optional torch generator (else the global torch RNG); draws happen on its device.
        :return: (t, weights): a LongTensor [N] of timesteps and a float32 Tensor [N] of importance weights
            1 / (T * p(t)), which are all 1 under the uniform distribution.
        """
        _positive_int("batch_size", batch_size)
        w = self.weights()
        draw_device = generator.device if generator is not None else torch.device("cpu")
        p = torch.from_numpy(w / w.sum()).to(draw_device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def update_with_losses(self, t: Tensor, losses: Tensor) -> None:
        """
        Report the per-example losses of a batch; a no-op for samplers that do not adapt.

        :param t: a LongTensor [N] of the timesteps the batch used.
        :param losses: a Tensor [N] of their losses.
        """

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: plain values and tensors only."""
        return {"num_timesteps": self.num_timesteps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises ValueError when it belongs to a differently sized sampler."""
        if state.get("num_timesteps") != self.num_timesteps:
            raise ConfigError(
                f"sampler state is for num_timesteps={state.get('num_timesteps')!r}, "
                f"this sampler has num_timesteps={self.num_timesteps}"
            )


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely (DDPM, and ADM's default)."""

    def weights(self) -> np.ndarray:
        return np.ones(self.num_timesteps, dtype=np.float64)


class LossSecondMomentSampler(ScheduleSampler):
    """
    Importance sampling by the root mean square of each timestep's recent losses (improved DDPM, for L_vlb).

    Sampling stays uniform until every timestep has ``history_per_term`` losses recorded; from then on
    p(t) is proportional to sqrt(E[loss_t^2]), mixed with ``uniform_prob`` of the uniform distribution so that
    no timestep starves.

    :param num_timesteps: the number of timesteps T of the diffusion process.
    :param history_per_term: how many recent losses each timestep keeps.
    :param uniform_prob: the uniform share of the mixture, in [0, 1].
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history_per_term = _positive_int("history_per_term", history_per_term)
        if not 0.0 <= uniform_prob <= 1.0:
            raise ConfigError(f"uniform_prob must be in [0, 1], got {uniform_prob!r}")
        self.uniform_prob = float(uniform_prob)
        self._loss_history = np.zeros((self.num_timesteps, self.history_per_term), dtype=np.float64)
        self._loss_counts = np.zeros(self.num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        """Whether every timestep has its full history, i.e. whether sampling has left the uniform phase."""
        return bool((self._loss_counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        rms = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        total = rms.sum()
        # All-zero losses carry no information about which timesteps are hard.
        p = rms / total if total > 0 else np.full(self.num_timesteps, 1.0 / self.num_timesteps)
        return p * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update_with_losses(self, t: Tensor, losses: Tensor) -> None:
        """
        Record a batch's losses; under torch.distributed every rank's batch is gathered first, in rank order,
        so that all ranks keep identical histories and draw from identical distributions.

        :param t: a LongTensor [N] of timesteps.
        :param losses: a Tensor [N] of their per-example losses.
        """
        if t.dim() != 1 or t.shape != losses.shape:
            raise ValueError(
                f"t and losses must be 1-D of the same length, got {tuple(t.shape)} and {tuple(losses.shape)}"
            )
        all_t, all_losses = _gather_from_ranks(t, losses)
        for step, loss in zip(all_t.tolist(), all_losses.tolist()):
            self._record(step, loss)

    def _record(self, t: int, loss: float) -> None:
        count = self._loss_counts[t]
        if count == self.history_per_term:
            # Full: drop the oldest loss so the history follows the network as it trains.
            self._loss_history[t, :-1] = self._loss_history[t, 1:]
            self._loss_history[t, -1] = loss
        else:
            self._loss_history[t, count] = loss
            self._loss_counts[t] += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "history_per_term": self.history_per_term,
            "loss_history": torch.from_numpy(self._loss_history.copy()),
            "loss_counts": torch.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("history_per_term") != self.history_per_term:
            raise ConfigError(
                f"sampler state is for history_per_term={state.get('history_per_term')!r}, "
                f"this sampler has history_per_term={self.history_per_term}"
            )
        self._loss_history = state["loss_history"].numpy().astype(np.float64)
        self._loss_counts = state["loss_counts"].numpy().astype(np.int64)


def _gather_from_ranks(t: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate (t, losses) from every rank in rank order, on the CPU; just this rank's outside distributed."""
    t, losses = t.detach(), losses.detach()
    if not (dist.is_available() and dist.is_initialized()):
        return t.cpu(), losses.cpu()
    device = losses.device
    # A short last batch makes sizes differ: gather the sizes first, then pad every batch to the largest.
    size = torch.tensor([t.numel()], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    # One collective for both: float64 holds timesteps exactly and the losses without rounding them.
    packed = torch.zeros(2, max(sizes), dtype=torch.float64, device=device)
    packed[0, : t.numel()] = t.to(device, torch.float64)
    packed[1, : t.numel()] = losses.to(torch.float64)
    gathered = [torch.empty_like(packed) for _ in sizes]
    dist.all_gather(gathered, packed)
    merged = torch.cat([g[:, :n] for g, n in zip(gathered, sizes)], dim=1).cpu()
    return merged[0].long(), merged[1]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
