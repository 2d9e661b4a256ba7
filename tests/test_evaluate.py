"""The evaluator: OpenAI's command-line contract, both batch layouts, bad batches, and the Evaluator object."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusion.data.datasets import Digits
from diffusion.data.images import to_uint8
from diffusion.evaluate import METRICS, Evaluator, main
from diffusion.evaluation.batch_files import BatchFileError, open_batch, write_reference_batch
from diffusion.evaluation.digit_judge import train_digit_classifier
from diffusion.evaluation.inception import WEIGHTS_FILENAME, WEIGHTS_URL
from diffusion.evaluation.metrics import feature_statistics, frechet_distance

LINES = ("Inception Score", "FID", "sFID", "Precision", "Recall")


@pytest.fixture(scope="module")
def judge():
    return train_digit_classifier()


def _digits(indices: np.ndarray, size: int = 8, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    ds = Digits(image_size=size, channels=channels)
    return to_uint8(ds.images[indices]), ds.targets[indices].numpy()


def _printed(out: str) -> dict[str, float]:
    """The five metric lines, which must appear exactly as OpenAI's evaluator prints them."""
    values = {}
    for label in LINES:
        (match,) = re.findall(rf"^{label}: (\S+)$", out, flags=re.MULTILINE)
        values[label] = float(match)
    return values


def _trained_digits(judge, count: int) -> np.ndarray:
    """Real digits the judge was trained on (the reference is the ones it was not)."""
    trained = np.setdiff1d(np.arange(1797), judge.held_out)
    return trained[:count]


def test_digits_command_line_reports_the_judge_and_the_five_metrics(judge, tmp_path, capsys):
    images, labels = _digits(_trained_digits(judge, 200))
    real = tmp_path / "real.npz"
    np.savez(real, images, labels)
    noise = tmp_path / "noise.npz"
    np.savez(noise, np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8))

    assert main(["--features", "digits", str(real)]) == 0
    out = capsys.readouterr().out
    assert "accuracy vs conditioning labels:" in out and "per-class accuracy" in out
    good = _printed(out)
    assert main(["--features", "digits", str(noise)]) == 0
    bad = _printed(capsys.readouterr().out)
    # Real digits: confident, varied, close to the held-out ones; noise: none of that.
    assert good["Inception Score"] > 7 and bad["Inception Score"] < 3
    assert good["FID"] < 1 < 10 < bad["FID"] and good["sFID"] < 200 < 2000 < bad["sFID"]
    assert good["Precision"] > 0.9 and good["Recall"] > 0.5
    assert bad["Precision"] == 0 and bad["Recall"] == 0

    assert main(["--features", "digits", str(real), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["features"] == "digits" and results["num_samples"] == 200
    assert [results[k] for k in ("is", "fid", "sfid", "precision", "recall")] == list(good.values())
    assert results["digit_judge"]["accuracy"] > 0.95


def test_both_reference_layouts_give_the_same_numbers_digits(judge, tmp_path, capsys):
    ref_images, _ = _digits(judge.held_out)
    samples, labels = _digits(_trained_digits(judge, 120))
    plain, with_stats, sample = tmp_path / "ref.npz", tmp_path / "ref_stats.npz", tmp_path / "samples.npz"
    np.savez(plain, arr_0=ref_images)
    np.savez(sample, samples, labels)
    evaluator = Evaluator(features="digits", reference=plain)
    write_reference_batch(with_stats, (ref_images[i : i + 100] for i in range(0, 450, 100)), evaluator)
    written = open_batch(with_stats, role="reference batch")
    assert written.statistics is not None and written.feature_set == "digits"

    outputs = []
    for ref in (plain, with_stats):
        assert main(["--features", "digits", str(ref), str(sample)]) == 0
        outputs.append(_printed(capsys.readouterr().out))
    assert outputs[0] == outputs[1]
    # The held-out digits as a reference file are the built-in reference.
    assert main(["--features", "digits", str(sample)]) == 0
    assert _printed(capsys.readouterr().out) == outputs[0]


def test_both_reference_layouts_give_the_same_statistics_inception(weights, tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    plain, with_stats = tmp_path / "ref.npz", tmp_path / "ref_stats.npz"
    np.savez(plain, images)
    kwargs = dict(features="inception", inception_weights=weights, batch_size=2, download_weights=False)
    computing = Evaluator(reference=plain, **kwargs)
    write_reference_batch(with_stats, [images[:2], images[2:]], computing)  # chunks as the evaluator batches
    with np.load(with_stats) as npz:
        assert sorted(npz.files) == ["arr_0", "feature_set", "mu", "mu_s", "sigma", "sigma_s"]
        assert npz["mu"].shape == (2048,) and npz["sigma_s"].shape == (2023, 2023)
        np.testing.assert_array_equal(npz["arr_0"], images)

    computed = computing.reference()
    stored = Evaluator(reference=with_stats, **kwargs).reference()
    assert torch.equal(computed.manifold, stored.manifold)  # precision/recall always use the images
    for kind in ("pool", "spatial"):
        np.testing.assert_array_equal(computed.statistics[kind].mu, stored.statistics[kind].mu)
        np.testing.assert_array_equal(computed.statistics[kind].sigma, stored.statistics[kind].sigma)


@pytest.mark.slow  # two sqrtm of 2048x2048 per evaluation: about 25 s each on one thread
def test_inception_command_line_prints_openais_lines_for_both_layouts(weights, tmp_path, capsys):
    rng = np.random.default_rng(2)
    ref_images = rng.integers(0, 256, (8, 12, 12, 1), dtype=np.uint8)
    samples = rng.integers(0, 256, (6, 12, 12, 1), dtype=np.uint8)
    plain, with_stats, sample = tmp_path / "ref.npz", tmp_path / "ref_stats.npz", tmp_path / "samples.npz"
    np.savez(plain, ref_images)
    np.savez(sample, samples)
    writer = Evaluator(reference=plain, inception_weights=weights, batch_size=4, download_weights=False)
    write_reference_batch(with_stats, [ref_images[:4], ref_images[4:]], writer)
    outputs = []
    for ref in (plain, with_stats):
        args = [str(ref), str(sample), "--inception-weights", str(weights), "--batch-size", "4"]
        assert main(args) == 0
        captured = capsys.readouterr()
        outputs.append(_printed(captured.out))
        assert "6 samples for 2048-d features" in captured.err  # a note, not an error
    assert outputs[0] == outputs[1]
    assert outputs[0]["Precision"] == 1.0  # random-weight features of noise all look alike
    assert 1.0 <= outputs[0]["Inception Score"] <= 1008 and outputs[0]["FID"] > 0


def _save(path, *arrays, **named):
    np.savez(path, *arrays, **named)
    return str(path)


def _bad_batch_cases(tmp_path):
    ok = np.zeros((8, 8, 8, 1), np.uint8)
    (tmp_path / "not_npz.npz").write_bytes(b"hello")
    return [
        (_save(tmp_path / "float.npz", ok.astype(np.float32)), "dtype float32; store uint8"),
        (
            _save(tmp_path / "nchw.npz", np.zeros((8, 3, 16, 16), np.uint8)),
            r"channels first.*transpose\(0, 2, 3, 1\)",
        ),
        (_save(tmp_path / "nhw.npz", np.zeros((8, 16, 16), np.uint8)), r"no channel axis.*\[\.\.\., None\]"),
        (_save(tmp_path / "c4.npz", np.zeros((8, 8, 8, 4), np.uint8)), "C = 1 or 3"),
        (_save(tmp_path / "few.npz", ok[:3]), "holds 3 images; the statistics need at least 4"),
        (_save(tmp_path / "empty.npz", arr_1=np.zeros(3)), "has no arr_0"),
        (str(tmp_path / "not_npz.npz"), r"not an \.npz file"),
        (str(tmp_path / "missing.npz"), "No such file"),
    ]


def test_each_bad_sample_batch_gets_one_line_naming_the_file(tmp_path, capsys):
    for path, message in _bad_batch_cases(tmp_path):
        assert main(["--features", "digits", path]) == 1, path
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and path in err and re.search(message, err), err
        assert "sample batch" in err or "No such file" in err


def test_bad_reference_batches_and_mismatched_batches_are_named(tmp_path, capsys, weights):
    sample = _save(tmp_path / "samples.npz", np.zeros((8, 8, 8, 1), np.uint8))
    cases = [
        (
            _save(tmp_path / "big.npz", np.zeros((8, 16, 16, 1), np.uint8)),
            sample,
            "holds 8x8 images but.*sample at 16x16",
        ),
        (
            _save(tmp_path / "rgb.npz", np.zeros((8, 8, 8, 3), np.uint8)),
            sample,
            "1 channel.*sample with 3 channel",
        ),
        (
            _save(
                tmp_path / "partial.npz", np.zeros((8, 8, 8, 1), np.uint8), mu=np.zeros(45), sigma=np.eye(45)
            ),
            sample,
            r"has \['mu', 'sigma'\] but not \['mu_s', 'sigma_s'\]",
        ),
        (
            _save(
                tmp_path / "inception_stats.npz",
                np.zeros((8, 8, 8, 1), np.uint8),
                mu=np.zeros(2048),
                sigma=np.eye(2048),
                mu_s=np.zeros(2023),
                sigma_s=np.eye(2023),
            ),
            sample,
            "pool statistics of 2048 dims but digits features have 45",
        ),
    ]
    for path, message in _bad_batch_cases(tmp_path):
        cases.append((path, sample, message))
    for ref, smp, message in cases:
        assert main(["--features", "digits", ref, smp]) == 1, ref
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and ref in err and re.search(message, err), err

    digit_stats = tmp_path / "digit_stats.npz"
    write_reference_batch(digit_stats, [np.zeros((8, 8, 8, 1), np.uint8)], Evaluator(features="digits"))
    assert main([str(digit_stats), sample, "--inception-weights", str(weights)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "statistics of digits features, not inception" in err


def test_missing_weights_and_a_missing_reference_get_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    batch = _save(tmp_path / "b.npz", np.zeros((8, 8, 8, 3), np.uint8))
    assert main([batch, batch, "--no-download"]) == 1
    err = capsys.readouterr().err.strip()
    expected_path = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILENAME
    assert "\n" not in err and WEIGHTS_URL in err and f"put it at {expected_path} " in err

    assert main([batch]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "give the reference batch first" in err


@pytest.mark.slow  # two fresh interpreters import torch, scipy and scikit-learn: several seconds on 2 cores
def test_command_line_entry_point(judge, tmp_path):
    # The command `make train` runs on the digits samples.
    images, labels = _digits(judge.held_out[:50], size=16)
    samples = _save(tmp_path / "samples.npz", images, labels)
    done = subprocess.run(
        [sys.executable, "-m", "diffusion.evaluate", "--features", "digits", samples],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split("accuracy vs conditioning labels:")[1].split()[0]) > 0.95
    assert _printed(done.stdout)["Precision"] > 0.8
    # A bad request: one line on stderr, no traceback.
    batch = _save(tmp_path / "b.npz", np.zeros((8, 8, 8, 3), np.uint8))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusion.evaluate",
            batch,
            batch,
            "--inception-weights",
            str(tmp_path / "w.pth"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and WEIGHTS_URL in done.stderr


def test_evaluator_extracts_in_batches_from_arrays_and_tensors(judge):
    images, _ = _digits(np.arange(30), size=16, channels=3)
    one = Evaluator(features="digits", batch_size=7).extract(images)
    other = Evaluator(features="digits", batch_size=30).extract(torch.from_numpy(images))
    assert all(torch.equal(one[k], other[k]) for k in one)
    assert {k: tuple(v.shape) for k, v in one.items()} == {
        "pool": (30, 45),
        "spatial": (30, 64),
        "logits": (30, 10),
    }
    with pytest.raises(ValueError, match="uint8"):
        Evaluator(features="digits").extract(images.astype(np.float32))


def test_evaluator_metrics_from_gathered_features(judge):
    evaluator = Evaluator(features="digits")
    images, _ = _digits(_trained_digits(judge, 100))
    # Features extracted in pieces (as on several ranks) and concatenated give the same metrics as at once.
    pieces = [evaluator.extract(images[i : i + 25]) for i in range(0, 100, 25)]
    gathered = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
    metrics = evaluator.compute_metrics(gathered)
    assert set(metrics) == set(METRICS) and all(isinstance(v, float) for v in metrics.values())
    assert metrics == evaluator.compute_metrics(evaluator.extract(images))
    reference = evaluator.reference().statistics["pool"]
    assert metrics["fid"] == frechet_distance(feature_statistics(gathered["pool"]), reference)
    with pytest.raises(ValueError, match="at least 4"):
        evaluator.compute_metrics(evaluator.extract(images[:3]))


def test_evaluator_settings_are_checked(weights):
    with pytest.raises(ValueError, match="features must be one of"):
        Evaluator(features="clip")
    with pytest.raises(ValueError, match="distance_precision"):
        Evaluator(features="digits", distance_precision="bfloat16")
    # Without a reference an evaluator still extracts features (ranks other than 0 need no more).
    evaluator = Evaluator(features="inception", inception_weights=weights, download_weights=False)
    assert evaluator.extract(np.zeros((1, 8, 8, 1), np.uint8))["pool"].shape == (1, 2048)
    with pytest.raises(ValueError, match="inception features need a reference batch"):
        evaluator.compute_metrics(evaluator.extract(np.zeros((4, 8, 8, 1), np.uint8)))


def test_reference_batch_writer_streams_images_and_chunks(tmp_path):
    evaluator = Evaluator(features="digits")
    images, _ = _digits(np.arange(20))
    items = [images[0], images[1], images[2:10], torch.from_numpy(images[10:])]  # single images and chunks
    batch = write_reference_batch(tmp_path / "ref.npz", items, evaluator, max_images=15)
    assert len(batch) == 15 and batch.shape == (15, 8, 8, 1)
    with np.load(tmp_path / "ref.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0"], images[:15])
        expected = feature_statistics(evaluator.extract(images[:15])["pool"])
        np.testing.assert_allclose(npz["mu"], expected.mu, rtol=1e-12)
        np.testing.assert_allclose(npz["sigma"], expected.sigma, rtol=1e-10, atol=1e-12)
        assert str(npz["feature_set"]) == "digits"
    streamed = np.concatenate(list(batch.batches(4)))
    np.testing.assert_array_equal(streamed, images[:15])
    with pytest.raises(BatchFileError, match="all be"):
        write_reference_batch(
            tmp_path / "mixed.npz", [images[:5], np.zeros((5, 9, 9, 1), np.uint8)], evaluator
        )
    with pytest.raises(BatchFileError, match="uint8"):
        write_reference_batch(tmp_path / "floats.npz", [images.astype(np.float32)], evaluator)
    assert not (tmp_path / "mixed.npz").exists() and not list(tmp_path.glob("*.partial"))


def test_compressed_and_fortran_order_batches_are_read(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (9, 5, 6, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "compressed.npz", images)
    np.savez(tmp_path / "fortran.npz", np.asfortranarray(images))
    for name in ("compressed.npz", "fortran.npz"):
        batch = open_batch(tmp_path / name)
        assert batch.shape == (9, 5, 6, 3)
        np.testing.assert_array_equal(np.concatenate(list(batch.batches(4))), images)
