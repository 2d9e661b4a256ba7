"""The evaluation benchmark runs offline (random weights when the real file is absent) and reports a rate."""

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import eval_bench  # noqa: E402


@pytest.mark.slow  # builds and saves a 95 MB random-weights file, then runs Inception: several seconds
def test_benchmark_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no weights there: random ones are used
    args = ["--device", "cpu", "--batch", "2", "--image-size", "8", "--seconds", "0", "--threads", "1"]
    assert eval_bench.main([*args, "--json", str(tmp_path / "rows.json")]) == 0
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["weights"] == "random" and row["batch"] == 2 and row["images_timed"] == 4
    assert row["images_per_s"] > 0
    assert f"{row['images_per_s']:9.2f} images/s" in capsys.readouterr().out
