"""``--sms``: confining a run to N SMs with a CUDA green context. Without a GPU only the refusals run:
each names what is missing; the two PyTorch APIs are checked with stand-ins."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dynprune.cli import main
from dynprune.sm_limit import SMLimit, SMLimitError, format_check


def test_a_limit_needs_a_gpu_and_a_positive_count():
    with pytest.raises(SMLimitError, match="positive"):
        SMLimit(0, cuda_available=True)
    with pytest.raises(SMLimitError, match="needs a CUDA GPU"):
        SMLimit(8, cuda_available=False)


def test_a_pytorch_without_green_contexts_is_named():
    with pytest.raises(SMLimitError, match="PyTorch 2.9"):
        SMLimit(8, cuda_available=True, green=SimpleNamespace())
    with pytest.raises(SMLimitError, match="neither Stream"):
        SMLimit(8, cuda_available=True, green=SimpleNamespace(GreenContext=type("GreenContext", (), {})))


def test_a_green_context_the_driver_refuses_says_what_it_needs():
    class Refused:
        @staticmethod
        def create(sms, device):
            raise RuntimeError("cuda driver too old to use green context!")

    with pytest.raises(SMLimitError, match="CUDA 12.8"):
        SMLimit(8, cuda_available=True, green=SimpleNamespace(GreenContext=Refused))


def test_the_context_stack_api_wraps_the_work():
    calls = []

    class Ctx:
        def set_context(self):
            calls.append("set")

        def pop_context(self):
            calls.append("pop")

    class Stack:
        @staticmethod
        def create(sms, device):
            calls.append(("create", sms, device))
            return Ctx()

    limit = SMLimit(16, device=0, cuda_available=True, green=SimpleNamespace(GreenContext=Stack))
    with limit:
        calls.append("work")
    assert calls == [("create", 16, 0), "set", "work", "pop"]
    with pytest.raises(KeyError), limit:
        raise KeyError("a failure inside still pops the context")
    assert calls[-1] == "pop"


def test_the_stream_api_is_preferred():
    made = []

    class WithStream:
        def __init__(self, num_sms, device_id):
            made.append((num_sms, device_id))

        def Stream(self):  # noqa: N802 (PyTorch's name)
            return "stream"

    limit = SMLimit(8, cuda_available=True, green=SimpleNamespace(GreenContext=WithStream))
    assert made == [(8, 0)] and limit._stream == "stream"


def test_the_check_line_says_whether_the_limit_held():
    held = {"sms": 8, "gpu_sms": 132, "tflops_all": 700.0, "tflops_confined": 45.0, "ratio": 0.064,
            "expected": 0.061, "confined": True}
    assert "confined" in format_check(held) and "NOT" not in format_check(held)
    assert "NOT CONFINED" in format_check({**held, "tflops_confined": 690.0, "ratio": 0.99, "confined": False})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the limit would be made")
def test_bench_sms_without_a_gpu_is_a_usage_error(bundle, tmp_path, capsys):
    assert main(["bench", bundle, "--source", str(tmp_path), "--sms", "8", "--out", str(tmp_path / "b")]) == 2
    assert "--sms 8: needs a CUDA GPU" in capsys.readouterr().err


def test_a_run_without_sms_gets_no_limit_and_a_refused_one_says_why():
    from dynprune.sm_limit import checked_limit

    lines = []
    limit, check = checked_limit(None, log=lines.append)
    with limit:
        pass
    assert check is None and lines == []
    with pytest.raises(SMLimitError, match="needs a CUDA GPU"):
        checked_limit(8, cuda_available=False, log=lines.append)
    assert lines == []
