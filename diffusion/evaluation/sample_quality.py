"""Sample quality during training: the EMA model's samples scored with FID, sFID, IS, precision and recall.

:class:`SampleQuality` is built from the ``eval`` config group and given to the task (``task.evaluation:
${eval}``); the engine calls the task's ``evaluate`` every ``eval_every`` steps and at the end of training, on every
rank, and the task calls it:

1. each rank generates its share of ``num_samples`` images (rank r: images r, r + W, r + 2W...) with the task's
   solver; an image's noise depends only on (seed, index), so the images do not depend on the number of ranks;
2. each rank turns its images into features on its device as they are made: no copy to the host;
3. the features are gathered in image order (one collective per feature kind), rank 0 computes the metrics
   against the reference (:class:`diffusion.evaluation.evaluator.Evaluator`), and every rank returns rank 0's numbers, so
   that all ranks agree on whether the run improved.

The reference's own features are computed once, at the first evaluation, spread over the ranks the same way.

``objective`` names the metric that ``best.pt`` follows and that ``train.py`` returns to a sweeper
(:data:`OBJECTIVES` gives each one's direction); ``loss`` means the training loss and keeps no ``best.pt``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from diffusion.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# Each objective and the way it improves (Optuna's spelling): FIDs are distances, the others are scores.
OBJECTIVES = {
    "loss": "minimize",
    "fid": "minimize",
    "sfid": "minimize",
    "is": "maximize",
    "precision": "maximize",
    "recall": "maximize",
}
FEATURES = ("none", "digits", "inception")


class ObjectiveError(UserError):
    """The run did not produce the value of its objective (a sweep trial then fails, with this message)."""


def objective_direction(objective: str) -> str:
    """ "minimize" or "maximize" for an ``eval.objective`` (the ``${objective_direction:...}`` resolver)."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"eval.objective={objective!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[objective]


def objective_key(objective: str) -> str:
    """The key under which the engine returns (and, under ``train/`` or as is, logs) an objective's value."""
    return "loss" if objective == "loss" else f"eval/{objective}"


def objective_value(
    objective: str, metrics: Mapping[str, float] | None, strict: bool = False
) -> float | None:
    """
    The final value of ``objective`` among the metrics ``train()`` returned.

    :param strict: raise :class:`ObjectiveError` when it is missing or not finite (a sweep trial must fail
        loudly rather than report a number it did not measure); otherwise return None or the value as it is.
    """
    key = objective_key(objective)
    value = (metrics or {}).get(key)
    if strict and value is None:
        raise ObjectiveError(
            f"the run returned no {key}: "
            + (
                "it took no training step (had it already reached max_steps? give a new hydra.run.dir)"
                if objective == "loss"
                else "the task evaluated no samples (a task without the eval group's evaluation?)"
            )
        )
    if strict and not math.isfinite(value):
        raise ObjectiveError(
            f"the run's {key} is {value}: the model diverged or its samples are degenerate (lower optim.lr, "
            "or look at the samples)"
        )
    return None if value is None else float(value)


def _inception_weights_on_every_rank(path: str | None, download: bool) -> Path:
    """The weights file, found (or downloaded) by rank 0 first so that ranks do not download it at once."""
    import torch.distributed as dist

    from diffusion.evaluation.inception import find_inception_weights

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return find_inception_weights(path, download=download)
    if dist.get_rank() == 0:
        found = find_inception_weights(path, download=download)
    dist.barrier()
    if dist.get_rank() != 0:
        found = find_inception_weights(path, download=False)
    return found


def gather_rows(
    rows: Mapping[str, Tensor], indices_of: Callable[[int], Sequence[int]], total: int, env
) -> dict[str, Tensor]:
    """
    Every rank's feature rows, put back in global order, on every rank.

    :param rows: this rank's {kind: [n_r x D]} Tensors, row i being global item ``indices_of(rank)[i]``.
    :param indices_of: the global indices of any rank's rows (every rank knows the split).
    :param total: the number of items over all ranks.
    :return: {kind: [total x D]} Tensors on the rows' device.
    """
    import torch.distributed as dist

    if not env.distributed:
        return dict(rows)
    counts = [len(indices_of(r)) for r in range(env.world_size)]
    width = max(counts)
    out = {}
    for kind, mine in rows.items():
        padded = mine.new_zeros(width, mine.shape[1])
        padded[: len(mine)] = mine
        parts = [torch.empty_like(padded) for _ in range(env.world_size)]
        dist.all_gather(parts, padded)
        merged = mine.new_empty(total, mine.shape[1])
        for r, part in enumerate(parts):
            where = torch.as_tensor(list(indices_of(r)), dtype=torch.long, device=mine.device)
            merged[where] = part[: counts[r]]
        out[kind] = merged
    return out


def _no_features(evaluator) -> dict[str, Tensor]:
    return {k: torch.zeros(0, d, device=evaluator.device) for k, d in evaluator.feature_set.dims.items()}


class SampleQuality:
    """
    FID, sFID, IS, precision and recall of a model's samples during training (see the module docstring).

    :param features: "none" (no evaluation), "digits" (the digit judge, for the 8x8 digits) or "inception"
        (ADM's Inception-v3 features; needs ``reference``).
    :param objective: the metric ``best.pt`` follows and ``train.py`` returns: one of :data:`OBJECTIVES`;
        "loss" keeps no best.pt.
    :param reference: a reference batch .npz (OpenAI's format: arr_0 images, optionally mu/sigma/mu_s/sigma_s);
        None for "digits" compares with the real digits the judge never saw.
    :param inception_weights: the Inception weights file; None looks in torch hub's cache.
    :param num_samples: images generated per evaluation, over all ranks (published FIDs use 50,000).
    :param batch_size: images per generation and feature batch, per rank.
    :param guidance_scale: classifier-free guidance of the samples (1: none).
    :param distance_precision: "float16" (ADM) or "float32" distances for precision and recall.
    :param download_weights: fetch missing Inception weights into torch hub's cache.
    :param progress: a progress bar over the samples on rank 0.
    """

    def __init__(
        self,
        features: str = "none",
        objective: str = "loss",
        reference: str | None = None,
        inception_weights: str | None = None,
        num_samples: int = 10_000,
        batch_size: int = 64,
        guidance_scale: float = 1.0,
        distance_precision: str = "float16",
        download_weights: bool = True,
        progress: bool = True,
    ) -> None:
        if features not in FEATURES:
            raise ConfigError(f"eval.features={features!r}: choose one of {', '.join(FEATURES)}")
        objective_direction(objective)
        if features == "none" and objective != "loss":
            raise ConfigError(
                f"eval.objective={objective} needs samples to evaluate: choose eval=digits or eval=inception "
                "(or eval.objective=loss)"
            )
        if features == "inception" and not reference:
            raise ConfigError(
                "eval=inception needs eval.reference=PATH: a reference batch .npz in OpenAI's format (theirs, "
                "e.g. VIRTUAL_imagenet64_labeled.npz, or one from python -m diffusion.reference)"
            )
        if num_samples < 4 or batch_size < 1:
            raise ConfigError(
                f"eval.num_samples={num_samples}, eval.batch_size={batch_size}: precision and recall need at "
                "least 4 samples (each one's 3 nearest neighbours) and a batch at least 1"
            )
        if guidance_scale < 0:
            raise ConfigError(f"eval.guidance_scale={guidance_scale}: must be >= 0 (1 = no guidance)")
        self.features = features
        self.objective = objective
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.guidance_scale = guidance_scale
        self.progress = progress
        self.evaluator = None
        self._reference_ready = False
        if self.enabled:
            from diffusion.evaluation.evaluator import Evaluator

            weights = inception_weights
            if features == "inception":
                weights = _inception_weights_on_every_rank(inception_weights, download_weights)
            # Built on the CPU now, so that a missing weights file or reference fails before training starts;
            # moved to the training device at the first evaluation.
            self.evaluator = Evaluator(
                features=features,
                inception_weights=weights,
                reference=reference,
                batch_size=batch_size,
                distance_precision=distance_precision,
                download_weights=False,
            )
            self.evaluator.open_reference()

    @property
    def enabled(self) -> bool:
        return self.features != "none"

    @property
    def tracked(self) -> tuple[str, str] | None:
        """(logged key, direction) of the metric best.pt follows, or None when no metric is."""
        if not self.enabled or self.objective == "loss":
            return None
        return objective_key(self.objective), OBJECTIVES[self.objective]

    def check_model(self, model: torch.nn.Module, vae=None) -> None:
        """ConfigError now, before training, if the model's samples (decoded by ``vae`` for a latent model) cannot
        be compared with the reference or guided as asked."""
        if not self.enabled:
            return
        from diffusion.sampling.guidance import check_guidance

        try:
            check_guidance(model, self.guidance_scale)
        except ConfigError as e:
            raise ConfigError(f"eval.{e}") from None
        reference = self.evaluator.open_reference()
        if reference is None:
            return
        _, h, w, c = reference.shape
        size, channels = model.image_size, model.in_channels
        if vae is not None:
            size, channels = size * vae.downsample, vae.image_channels
        if (h, w) != (size, size) or c != channels:
            raise ConfigError(
                f"eval.reference={reference.path} holds {h}x{w}x{c} images but the model makes "
                f"{size}x{size}x{channels}: write a reference batch of the training data at its size "
                f"(python -m diffusion.reference data.image_size={size} ...)"
            )

    @torch.no_grad()
    def __call__(
        self, model: torch.nn.Module, diffusion, solver, step: int, run, decode=None
    ) -> dict[str, float]:
        """
        Generate ``num_samples`` images spread over the ranks, and score them.

        :param model: the network to sample (the first EMA), in eval mode, on ``run.hw.device``.
        :param diffusion: the process it was trained with; ``solver``: the task's solver.
        :param run: the engine's :class:`diffusion.engine.tasks.RunContext` (hardware, ranks, seed).
        :param decode: turns the model's samples into images in [-1, 1] (a latent model's VAE decoder).
        :return: {"eval/fid", "eval/sfid", "eval/is", "eval/precision", "eval/recall", "eval/seconds"}, the same
            on every rank; {} when ``features`` is "none".
        """
        if not self.enabled:
            return {}
        if solver is None:
            raise ConfigError("evaluating samples needs a solver: set the task's solver (the solver group)")
        from tqdm.auto import tqdm

        from diffusion.data.images import to_uint8_tensor
        from diffusion.runtime.distributed import all_gather_object
        from diffusion.sampling.generate import generate

        env, hw = run.env, run.hw
        evaluator = self.evaluator.to(hw.device)
        start = time.perf_counter()
        world = env.world_size

        def my_images(rank: int) -> range:
            return range(rank, self.num_samples, world)

        mine = my_images(env.rank)
        classes = torch.arange(self.num_samples) % model.num_classes if model.num_classes else None
        parts = [_no_features(evaluator)]  # a rank may have no images (num_samples < ranks)
        bar = tqdm(
            total=len(mine),
            desc=f"eval at step {step}" + (f" (rank 0 of {world})" if world > 1 else ""),
            unit="img",
            disable=not (self.progress and env.is_main),
            leave=False,
            dynamic_ncols=True,
        )
        for b in range(0, len(mine), self.batch_size):
            idx = list(mine[b : b + self.batch_size])
            y = classes[idx] if classes is not None else None
            x = generate(
                model,
                diffusion,
                solver,
                idx,
                run.seed,
                hw.device,
                y,
                self.guidance_scale,
                autocast=hw.autocast(),
            )
            if decode is not None:
                x = decode(x)
            parts.append(evaluator.extract(to_uint8_tensor(x)))
            bar.update(len(idx))
        bar.close()
        features = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        features = gather_rows(features, my_images, self.num_samples, env)
        if not self._reference_ready:
            self._reference_features(evaluator, env)
        metrics = evaluator.compute_metrics(features) if env.is_main else None
        metrics = all_gather_object(metrics)[0]  # rank 0's numbers everywhere
        seconds = time.perf_counter() - start
        log.info(
            "eval at step %d: %s (%d samples on %d rank(s) in %.1f s)",
            step,
            " ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
            self.num_samples,
            world,
            seconds,
        )
        return {**{f"eval/{k}": v for k, v in metrics.items()}, "eval/seconds": seconds}

    def _reference_features(self, evaluator, env) -> None:
        """The reference images' features, computed once, their batches spread over the ranks."""
        import itertools

        batches, count = evaluator.reference_images()
        size = evaluator.batch_size
        num_batches = math.ceil(count / size)

        def my_rows(rank: int) -> list[int]:
            batches_of_rank = range(rank, num_batches, env.world_size)
            return [i for b in batches_of_rank for i in range(b * size, min((b + 1) * size, count))]

        parts = [_no_features(evaluator)]
        parts += [evaluator.extract(b) for b in itertools.islice(batches, env.rank, None, env.world_size)]
        features = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        evaluator.use_reference_features(gather_rows(features, my_rows, count, env))
        self._reference_ready = True
