"""Run curves drawn from metrics.jsonl as written by the JsonlLogger."""

import json

import numpy as np
import pytest
from PIL import Image

from diffusion.engine.loggers import JsonlLogger
from diffusion.report import ReportError, build_figures, main, read_series, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
C0 = np.array([0x1F, 0x77, 0xB4])  # matplotlib's first line colour


def _log_run(run_dir, steps: int = 12, with_eval: bool = True) -> dict[str, list[float]]:
    """A run as the engine logs it: train/ metrics every step, eval/ every 4th, a sample image in between."""
    logger = JsonlLogger()
    logger.start(str(run_dir), config={}, name="test")
    logged: dict[str, list[float]] = {}
    rng = np.random.default_rng(0)
    for step in range(1, steps + 1):
        metrics = {
            "train/lr": 1e-4 * min(1.0, step / 4),
            "train/grad_norm": 10.0 / step,
            "train/images_per_s": 100.0,
        }
        for term in ("loss", "mse"):
            metrics[f"train/{term}"] = 1.0 / step
            for q in range(4):
                metrics[f"train/{term}_q{q}"] = (q + 1) / step * (1 + 0.1 * rng.random())
        logger.log(metrics, step)
        if with_eval and step % 4 == 0:
            evaluation = {
                "eval/fid": 100.0 / step,
                "eval/is": step / 2,
                "eval/precision": 0.5,
                "eval/recall": 0.2,
            }
            logger.log(evaluation, step)
            metrics.update(evaluation)
            logger.log_image("samples", np.zeros((8, 8, 3), np.uint8), step, caption="grid")
        for key, value in metrics.items():
            logged.setdefault(key, []).append(value)
    return logged


def test_series_read_back_what_the_logger_wrote(tmp_path):
    logged = _log_run(tmp_path)
    series = read_series(tmp_path / "metrics.jsonl")
    assert "samples" not in series and "samples_caption" not in series  # image records are skipped
    np.testing.assert_array_equal(series["train/loss"][0], np.arange(1, 13))
    np.testing.assert_allclose(series["train/loss_q3"][1], logged["train/loss_q3"])
    np.testing.assert_array_equal(series["eval/fid"][0], [4, 8, 12])
    np.testing.assert_allclose(series["eval/fid"][1], logged["eval/fid"])


def test_a_resumed_run_keeps_the_last_value_of_a_step_and_a_cut_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0}, {"step": 2, "train/loss": 2.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "train/lo')
    steps, values = read_series(path)["train/loss"]
    assert steps.tolist() == [1, 2] and values.tolist() == [3.0, 2.5]
    path.write_text('{"step": 1, "train/loss": 3.0}\nnot json\n{"step": 2, "train/loss": 2.0}\n')
    with pytest.raises(ReportError, match="line 2 of .* is not JSON"):
        read_series(path)


def test_figures_hold_the_logged_curves(tmp_path):
    logged = _log_run(tmp_path)
    figures = build_figures(read_series(tmp_path / "metrics.jsonl"))
    assert sorted(figures) == ["eval.png", "loss.png", "training.png"]

    loss_axes = figures["loss.png"].axes
    assert [ax.get_title() for ax in loss_axes] == ["loss", "mse"]
    for ax, term in zip(loss_axes, ("loss", "mse")):
        lines = ax.get_lines()
        assert len(lines) == 5  # the mean and the four timestep quartiles
        keys = [f"train/{term}"] + [f"train/{term}_q{q}" for q in range(4)]
        for line, key in zip(lines, keys):
            np.testing.assert_allclose(line.get_ydata(), logged[key])
        assert ax.get_yscale() == "log"  # 1/step spans more than a factor of 20 across the quartiles

    assert [ax.get_title() for ax in figures["training.png"].axes] == [
        "learning rate",
        "gradient norm",
        "images/s",
    ]
    lr_line = figures["training.png"].axes[0].get_lines()[0]
    np.testing.assert_allclose(lr_line.get_ydata(), logged["train/lr"])

    eval_axes = figures["eval.png"].axes
    assert [ax.get_title() for ax in eval_axes] == ["FID", "Inception Score", "precision", "recall"]
    np.testing.assert_array_equal(eval_axes[0].get_lines()[0].get_xdata(), [4, 8, 12])

    # No eval metrics logged: no eval figure.
    other = tmp_path / "no_eval"
    _log_run(other, with_eval=False)
    assert sorted(build_figures(read_series(other / "metrics.jsonl"))) == ["loss.png", "training.png"]


def test_command_line_writes_real_pngs_beside_the_metrics(tmp_path, capsys):
    _log_run(tmp_path)
    assert main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(
        str(tmp_path / name) for name in ("loss.png", "training.png", "eval.png")
    )
    for name in ("loss.png", "training.png", "eval.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        image = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        assert image.shape[0] >= 300 and image.shape[1] >= 400
        # The curves are drawn: many pixels of the first line colour on a white page.
        assert np.sum(np.all(np.abs(image.astype(int) - C0) < 10, axis=-1)) > 200
        assert np.mean(np.all(image == 255, axis=-1)) > 0.5
    assert write_report(tmp_path) == [tmp_path / n for n in ("loss.png", "training.png", "eval.png")]


def test_missing_and_empty_metrics_get_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nowhere/metrics.jsonl does not exist" in err and "logger=none" in err

    (tmp_path / "metrics.jsonl").write_text("")
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no metrics to plot" in err

    # Only image records: nothing numeric either.
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "samples": "images/a.png"}) + "\n")
    assert main([str(tmp_path)]) == 1
    assert "has no metrics to plot" in capsys.readouterr().err


@pytest.mark.slow
def test_a_wandb_run_is_read_from_its_offline_files(tmp_path, isolated_wandb):
    """With logger=wandb there is no metrics.jsonl: the report reads what W&B wrote, with W&B's own reader."""
    from diffusion.engine.loggers import WandbLogger

    logger = WandbLogger(mode="offline")
    logger.start(str(tmp_path), config={}, name="test")
    for step in range(1, 6):
        logger.log({"train/loss": 1.0 / step, "train/loss_q0": 2.0 / step, "eval/fid": 50.0 - step}, step)
    logger.finish()
    assert not (tmp_path / "metrics.jsonl").exists()
    written = write_report(tmp_path)
    assert sorted(p.name for p in written) == ["eval.png", "loss.png"]
    from diffusion.report import read_run

    series = read_run(tmp_path)
    np.testing.assert_array_equal(series["eval/fid"][0], [1, 2, 3, 4, 5])
    np.testing.assert_allclose(series["train/loss"][1], [1.0 / s for s in range(1, 6)])
