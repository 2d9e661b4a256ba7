"""Checkpoint files: atomic writes, a latest pointer that is never dangling, no code run from untrusted files."""

from __future__ import annotations

import errno
import os
import pickle

import pytest
import torch

from diffusion.engine import checkpoint as ckpt


def state(v: float) -> dict:
    return {"step": int(v), "model": {"w": torch.full((3,), v)}}


def test_save_points_latest_and_prunes(tmp_path):
    for step in range(1, 7):
        ckpt.save_checkpoint(state(step), tmp_path, step, keep_last=2, milestone_every=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest.pt", "step_00000003.pt", "step_00000005.pt", "step_00000006.pt"]
    assert os.readlink(tmp_path / "latest.pt") == "step_00000006.pt"
    loaded = ckpt.load_checkpoint(tmp_path / "latest.pt")
    assert loaded["step"] == 6 and loaded["format_version"] == ckpt.FORMAT_VERSION


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(state(1), tmp_path, 1)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # half the bytes reach the file, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        ckpt.CheckpointError, match="disk full while writing .*step_00000002.pt; the previous"
    ):
        ckpt.save_checkpoint(state(2), tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest.pt",
        "step_00000001.pt",
    ]  # no temporary left
    assert ckpt.load_checkpoint(tmp_path / "latest.pt")["step"] == 1


def test_interrupted_write_leaves_old_file(tmp_path, monkeypatch):
    ckpt.save_checkpoint(state(1), tmp_path, 1)

    def killed(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save(state(2), tmp_path / "step_00000001.pt")
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path / "step_00000001.pt")["step"] == 1
    assert not list(tmp_path.glob(".*tmp*"))


class Payload:
    """Unpickling this calls os.system: what a malicious checkpoint from the internet would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload(marker)}, path)
    with pytest.raises(ckpt.CheckpointError, match=f"refusing to load {path}"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    with open(path.with_suffix(".pkl"), "wb") as f:  # a plain pickle, not even a torch zip
        pickle.dump(Payload(marker), f)
    with pytest.raises(ckpt.CheckpointError, match="evil.pkl"):
        ckpt.load_file(path.with_suffix(".pkl"))
    assert not marker.exists()


def test_every_torch_load_in_the_project_is_weights_only():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    offenders = []
    for folder in ("diffusion", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for name in files:
                if name.endswith(".py"):
                    text = open(os.path.join(dirpath, name)).read()
                    for i, line in enumerate(text.splitlines()):
                        if "torch.load(" in line and "weights_only=True" not in line:
                            offenders.append(f"{name}:{i + 1}")
    for name in ("train.py", "sample.py"):
        assert "torch.load(" not in open(os.path.join(root, name)).read()
    assert offenders == []


def test_format_version_and_foreign_files(tmp_path):
    torch.save({"format_version": 99, "model": {}}, tmp_path / "new.pt")
    with pytest.raises(ckpt.CheckpointError, match="format 99, this code reads format 1 \\(newer file\\)"):
        ckpt.load_checkpoint(tmp_path / "new.pt")
    torch.save({"input_blocks.0.0.weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint of this project.*init_from"):
        ckpt.load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a zip file")
    with pytest.raises(ckpt.CheckpointError, match="junk.pt is not a readable PyTorch checkpoint"):
        ckpt.load_file(tmp_path / "junk.pt")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint not found"):
        ckpt.load_file(tmp_path / "missing.pt")
    with pytest.raises(ckpt.CheckpointError, match="is a directory"):
        ckpt.load_file(tmp_path)


def test_mismatch_report_names_keys_and_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    sd = {"0.weight": torch.zeros(4, 2), "1.bias": torch.zeros(1)}
    text = ckpt.describe_mismatch(model, sd)
    assert "0.bias" in text and "1.bias" in text and "0.weight: model (3, 2) vs file (4, 2)" in text
    with pytest.raises(ckpt.CheckpointError, match="does not fit the configured model"):
        ckpt.load_weights(model, sd, "x.pt")
