"""Checkpoints load without running code, still load when older dynprune wrote NumPy values into
them, and leave no temporaries behind."""

import os

import numpy as np
import pytest
import torch

from dynprune.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_pretrained,
    make_checkpoint,
    remove_stale_temporaries,
    save_atomic,
)
from dynprune.cli import main
from dynprune.model import build_detector
from tests.conftest import tiny_config


class _CreatesAFile:
    """A pickle payload that creates a file when unpickled (what a malicious checkpoint would do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "planted"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "dynprune-1", "payload": _CreatesAFile(str(marker))}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"refused, it asks to call (io|builtins)\.open"):
        load_checkpoint(evil)
    assert not marker.exists()
    assert main(["val", "--weights", str(evil)]) == 2
    assert "evil.pt: refused" in capsys.readouterr().err
    assert main(["train", "--data", "synthetic", "--pretrained", str(evil)]) == 2
    assert not marker.exists()


def test_a_planted_pickle_in_a_bundle_is_refused(bundle, video, tmp_path, capsys):
    import shutil

    marker = tmp_path / "planted"
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    torch.save({"format": "dynprune-1", "payload": _CreatesAFile(str(marker))}, b / "dynamic.pt")
    assert main(["serve", str(b), "--source", video, "--engine", "dynamic", "--frames", "1"]) == 2
    assert "dynamic.pt: refused" in capsys.readouterr().err
    assert not marker.exists()


def test_checkpoints_with_numpy_values_from_older_releases_still_load(tmp_path):
    model = build_detector(tiny_config()).eval()
    ckpt = make_checkpoint(model, ["ring"], 64, "dense", metrics={"ap50": np.float64(0.5), "n": np.int64(3)},
                           calibration={"levels": np.arange(3, dtype=np.float32)})
    path = tmp_path / "old.pt"
    torch.save(ckpt, path)  # as older releases wrote it: NumPy values pickled as they are
    loaded = load_checkpoint(path)
    assert loaded["metrics"]["ap50"] == 0.5 and int(loaded["metrics"]["n"]) == 3
    np.testing.assert_array_equal(loaded["calibration"]["levels"], [0, 1, 2])


def test_new_checkpoints_hold_plain_values_only(tmp_path):
    model = build_detector(tiny_config()).eval()
    path = tmp_path / "new.pt"
    save_atomic(make_checkpoint(model, ["ring"], 64, "dense", metrics={"ap50": np.float64(0.5)}), path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    assert type(load_checkpoint(path)["metrics"]["ap50"]) is float


def test_pretrained_state_dict_loads_and_random_bytes_are_refused(tmp_path):
    model = build_detector(tiny_config())
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    loaded, total = load_pretrained(build_detector(tiny_config()), str(path))
    assert loaded == total
    (tmp_path / "junk.bin").write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="junk.bin: not a readable checkpoint"):
        load_pretrained(model, str(tmp_path / "junk.bin"))
    with pytest.raises(FileNotFoundError):
        load_pretrained(model, str(tmp_path / "none.pt"))


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    """A writer killed mid-write leaves ``.last.pt.<pid>.<random>``; the next write of last.pt
    removes those whose process is gone and keeps a live writer's."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    orphan = tmp_path / f".last.pt.{dead_pid}.abc123"
    orphan.write_bytes(b"partial")
    live = tmp_path / f".last.pt.{os.getpid()}.xyz789"
    live.write_bytes(b"in progress")
    other = tmp_path / ".best.pt.1.q"
    other.write_bytes(b"another file's")
    save_atomic({"x": 1}, tmp_path / "last.pt")
    assert not orphan.exists() and live.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path / "last.pt") == []
