"""A run's curves as PNG files, for machines without W&B.

    python -m diffusion.report RUN_DIR

reads ``RUN_DIR/metrics.jsonl`` (written by :class:`diffusion.engine.loggers.JsonlLogger` with ``logger=none``), or the
run's offline W&B files when it logged to W&B, and writes into RUN_DIR:

- ``loss.png``: one panel per loss term (``train/loss``, ``train/mse``, ``train/vb``, ...), its mean and the
  means over each quarter of the timesteps (``_q0`` .. ``_q3``), on a log scale when all values are positive;
- ``training.png``: the learning rate, the gradient norm and the throughput (images/s), where logged;
- ``eval.png``: the sample-quality metrics (``eval/fid``, ``eval/sfid``, ``eval/is``, ``eval/precision``,
  ``eval/recall``), when the run evaluated.

Records of images (string values) are skipped. A resumed run appends to the file and may log a step twice; the
later value counts.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diffusion.errors import UserError

METRICS_FILE = "metrics.jsonl"
QUARTILE = re.compile(r"^(?P<term>.+)_q(?P<q>[0-3])$")
TRAINING_KEYS = (
    ("train/lr", "learning rate"),
    ("train/grad_norm", "gradient norm"),
    ("train/images_per_s", "images/s"),
)
EVAL_KEYS = (
    ("eval/fid", "FID"),
    ("eval/sfid", "sFID"),
    ("eval/is", "Inception Score"),
    ("eval/precision", "precision"),
    ("eval/recall", "recall"),
)

Series = dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (steps, values), ascending steps


class ReportError(UserError):
    """The run directory has nothing to plot; the message says why."""


def read_series(path: str | Path) -> Series:
    """
    Every numeric key of a metrics.jsonl as (steps, values) arrays. A step logged twice (a resumed run) keeps its
    last value; non-numeric values (image paths, captions) are skipped; a line cut short by a crash is skipped.

    :raises ReportError: the file is missing, empty, or has no numeric metrics.
    """
    path = Path(path)
    if not path.is_file():
        raise ReportError(
            f"{path} does not exist: give the directory of a run trained with logger=none (it holds {METRICS_FILE})"
        )
    records = []
    with open(path) as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the run was killed while writing it
                continue
            raise ReportError(
                f"line {number} of {path} is not JSON: {line[:60]!r}; remove or fix it"
            ) from None
    return _series(records, path)


def read_run(run_dir: str | Path) -> Series:
    """The run's metrics: its metrics.jsonl (logger=none), or else what W&B wrote to its offline run files
    (logger=wandb), read back with W&B's own reader."""
    run_dir = Path(run_dir)
    if (run_dir / METRICS_FILE).is_file() or not any(run_dir.glob("wandb/*run-*/run-*.wandb")):
        return read_series(run_dir / METRICS_FILE)
    from diffusion.engine.loggers import read_wandb_history

    _, _, rows = read_wandb_history(str(run_dir))
    return _series(({**row, "step": row.get("_step")} for row in rows), run_dir / "wandb")


def _series(records: Iterable[Mapping], source: Path) -> Series:
    """(steps, values) of every numeric key of ``records`` (dicts with an int "step"); a later value of a step
    replaces an earlier one."""
    values: dict[str, dict[int, float]] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for key, value in record.items():
            if key in ("step", "_step") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            values.setdefault(key, {})[step] = float(value)
    if not values:
        raise ReportError(
            f"{source} has no metrics to plot: the run has not logged yet (it logs every log_every steps)"
        )
    series = {}
    for key, by_step in values.items():
        steps = np.array(sorted(by_step))
        series[key] = (steps, np.array([by_step[s] for s in steps]))
    return series


def _panel(ax, series: Series, keys: Iterable[tuple[str, str]], title: str, log_if_positive: bool) -> None:
    plotted = []
    for key, label in keys:
        if key in series:
            steps, values = series[key]
            ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
            plotted.append(values[np.isfinite(values)])
    finite = np.concatenate(plotted) if plotted else np.array([])
    if log_if_positive and len(finite) and finite.min() > 0 and finite.max() / finite.min() > 20:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(plotted) > 1:
        ax.legend(fontsize="small")


def _grid(count: int, ncols: int) -> tuple[Figure, list]:
    ncols = min(ncols, count)
    nrows = math.ceil(count / ncols)
    figure = Figure(figsize=(5 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(nrows, ncols, i + 1) for i in range(count)]
    return figure, axes


def loss_terms(series: Mapping) -> list[str]:
    """The ``train/`` loss terms that were logged with quartiles (``train/loss``, ``train/mse``, ...)."""
    terms = {m["term"] for key in series if (m := QUARTILE.match(key)) and key.startswith("train/")}
    return sorted(terms, key=lambda t: (t != "train/loss", t))


def build_figures(series: Series) -> dict[str, Figure]:
    """The report's figures by file name (``loss.png``, ``training.png``, ``eval.png``), each present only when
    the run logged something for it."""
    figures = {}
    terms = loss_terms(series) or [k for k in ("train/loss",) if k in series]
    if terms:
        figure, axes = _grid(len(terms), ncols=3)
        for ax, term in zip(axes, terms):
            keys = [(term, "mean")] + [(f"{term}_q{q}", f"t in quarter {q}") for q in range(4)]
            _panel(ax, series, keys, term.removeprefix("train/"), log_if_positive=True)
        figures["loss.png"] = figure
    training = [(key, title) for key, title in TRAINING_KEYS if key in series]
    if training:
        figure, axes = _grid(len(training), ncols=3)
        for ax, (key, title) in zip(axes, training):
            _panel(ax, series, [(key, title)], title, log_if_positive=key == "train/grad_norm")
        figures["training.png"] = figure
    evaluation = [(key, title) for key, title in EVAL_KEYS if key in series]
    if evaluation:
        figure, axes = _grid(len(evaluation), ncols=3)
        for ax, (key, title) in zip(axes, evaluation):
            _panel(ax, series, [(key, title)], title, log_if_positive=False)
        figures["eval.png"] = figure
    return figures


def write_report(run_dir: str | Path) -> list[Path]:
    """
    Draw the curves of ``run_dir/metrics.jsonl`` (or of the run's W&B files) into PNG files in ``run_dir``.

    :return: the files written.
    :raises ReportError: nothing to plot (see :func:`read_series`).
    """
    run_dir = Path(run_dir)
    figures = build_figures(read_run(run_dir))
    if not figures:
        raise ReportError(f"the run in {run_dir} has no train/ or eval/ metrics to plot")
    written = []
    for name, figure in figures.items():
        figure.suptitle(f"{run_dir.name}: {name.removesuffix('.png')}")
        figure.savefig(run_dir / name, dpi=100)
        written.append(run_dir / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory: metrics.jsonl (logger=none) or its wandb/ files")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.run_dir)
    except UserError as error:
        print(f"python -m diffusion.report: error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
