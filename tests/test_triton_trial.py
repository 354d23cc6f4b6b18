"""Triton's floor by trial (kernels/triton_trial.py): GPUs below Triton's documented floor, failed
and passing trials, and the verdicts kept per GPU, Triton version and driver. The GPU is faked; the
trial itself runs for real through Triton's interpreter."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dynprune.kernels import triton_trial
from dynprune.kernels.dispatch import select_backend
from tests.conftest import require_compiled_blocks, threshold_block

triton = pytest.importorskip("triton")


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Fakes a CUDA GPU's identity (``set(**fields)`` changes it) with a fresh verdict cache; the
    trial fails the test unless a test replaces it."""
    identity = {"gpu": "Orin (faked)", "capability": "8.7", "triton": "3.8.0", "driver": "12060"}
    monkeypatch.setenv("DYNPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(triton_trial, "gpu_identity", lambda device: dict(identity))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: identity["gpu"])

    def no_trial(device):
        raise AssertionError("the trial should not run")

    monkeypatch.setattr(triton_trial, "run_trial", no_trial)
    triton_trial.forget_verdicts()
    yield identity
    triton_trial.forget_verdicts()


def _blocks():
    require_compiled_blocks()
    return [threshold_block(16, 16, 16, 8, 0.5)]


@pytest.mark.parametrize("capability", ["7.2", "6.2", "5.3"])
def test_a_gpu_below_tritons_floor_gets_the_cpu_backend_without_a_trial(fake_gpu, capability):
    fake_gpu["capability"] = capability
    backend, reason = select_backend(torch.device("cuda"), "auto", _blocks())
    assert backend == "cpu"
    assert f"not Triton: compute capability {capability} is below 8.0" in reason
    with pytest.raises(ValueError, match=f"--backend triton: compute capability {capability}"):
        select_backend(torch.device("cuda"), "triton", _blocks())


def test_a_failed_trial_sends_the_engine_to_the_cpu_and_is_remembered(fake_gpu, monkeypatch, tmp_path, caplog):
    def compile_failure(device):
        raise RuntimeError("ptxas fatal : Value 'sm_87' is not defined for option 'gpu-name'\nmore")

    monkeypatch.setattr(triton_trial, "run_trial", compile_failure)
    with caplog.at_level(logging.WARNING):
        backend, reason = select_backend(torch.device("cuda"), "auto", _blocks())
    assert backend == "cpu"
    assert "the Triton trial failed on Orin (faked) (RuntimeError: ptxas fatal" in reason
    assert "runs on the CPU backends" in caplog.text and "triton_trials.json" in caplog.text
    with pytest.raises(ValueError, match="--backend triton: the Triton trial failed"):
        select_backend(torch.device("cuda"), "triton", _blocks())
    saved = json.loads((tmp_path / "triton_trials.json").read_text())
    (entry,) = saved.values()
    assert entry["runs"] is False and entry["gpu"] == "Orin (faked)" and "ptxas" in entry["reason"]

    # a later process reads the verdict instead of trying again
    triton_trial.forget_verdicts()
    monkeypatch.setattr(triton_trial, "run_trial", lambda device: pytest.fail("tried again"))
    assert select_backend(torch.device("cuda"), "auto", _blocks())[0] == "cpu"

    # a new driver (or Triton) is tried again
    tried = []
    monkeypatch.setattr(triton_trial, "run_trial", tried.append)
    fake_gpu["driver"] = "12080"
    assert select_backend(torch.device("cuda"), "auto", _blocks())[0] == "triton"
    assert len(tried) == 1
    assert len(json.loads((tmp_path / "triton_trials.json").read_text())) == 2


def test_a_passing_trial_gives_triton_once(fake_gpu, monkeypatch):
    tried = []
    monkeypatch.setattr(triton_trial, "run_trial", tried.append)
    for _ in range(3):
        backend, reason = select_backend(torch.device("cuda"), "auto", _blocks())
        assert (backend, reason) == ("triton", "Triton kernels on Orin (faked)")
    assert len(tried) == 1


def test_the_trial_runs_the_kernels_and_catches_a_wrong_result(monkeypatch):
    triton_trial.run_trial(torch.device("cpu"))  # the real kernels, through Triton's interpreter
    from dynprune.kernels.triton_block import TritonBlock

    right = TritonBlock.forward
    monkeypatch.setattr(TritonBlock, "forward", lambda self, x: right(self, x) * 0.5)
    with pytest.raises(RuntimeError, match="differs from the reference"):
        triton_trial.run_trial(torch.device("cpu"))


def test_the_floor_is_tritons_documented_one():
    assert triton_trial.TRITON_MIN_CAPABILITY == (8, 0)
    assert triton_trial.below_floor("8.7") is None and triton_trial.below_floor("9.0") is None
    assert "7.5 is below 8.0" in triton_trial.below_floor("7.5")
