"""A Jetson-class GPU on a big one: confine a run's GPU work to N SMs with a CUDA green context.

An AGX Orin has 16 SMs, an Orin NX or Nano 8, an H100 132 (docs/DESIGN.md, "Numbers to know"). At
batch 1 the nano detector's layers are launch- and latency-bound on 132 SMs and much closer to
compute-bound on 8-16: ``--sms N`` (``dynprune bench``, ``benchmarks/gpu_kernels.py``) runs every
kernel of the run, CUDA graphs included, on a green context limited to N SMs, so the board's regime
can be measured where a board is not.

The limit is checked, not assumed (:meth:`SMLimit.check`): an fp16 matrix product's throughput
confined over its throughput on the whole GPU should be about N over the GPU's SMs (Hopper grants
SMs in multiples of 8, so N is rounded up by the driver). A run whose ratio is far above that says
"not confined", and its figures do not count.

PyTorch's green contexts changed between releases: ``GreenContext(num_sms=N).Stream()`` (a stream
to run on) in recent ones, ``GreenContext.create(N, device)`` with ``set_context()`` /
``pop_context()`` in 2.9-2.11. Both are handled; anything else is a :class:`SMLimitError` that
names what is missing.
"""

from __future__ import annotations

import contextlib
import time
from types import ModuleType
from typing import Any, Callable, ContextManager, Dict, Iterator, Optional, Tuple

import torch


class SMLimitError(ValueError):
    """``--sms`` cannot be honoured here: the message says what is missing (a usage error, exit 2)."""


_entered: list = []  # the SM counts of the limits entered, innermost last


def active_sms() -> Optional[int]:
    """The SMs the innermost active limit grants (its count rounded up to Hopper's multiple of 8),
    or ``None`` outside any: what tuned kernel tiles are looked up by (kernels/conv_tiles.py)."""
    return _entered[-1] if _entered else None


def _green_module() -> Optional[ModuleType]:
    try:
        import torch.cuda.green_contexts as green
    except ImportError:
        return None
    return green


class SMLimit:
    """GPU work inside ``with limit:`` runs on at most ``sms`` SMs of ``device``."""

    def __init__(self, sms: int, device: int = 0, green: Optional[ModuleType] = None,
                 cuda_available: Optional[bool] = None) -> None:
        if sms < 1:
            raise SMLimitError(f"--sms {sms}: give a positive number of SMs")
        available = torch.cuda.is_available() if cuda_available is None else cuda_available
        if not available:
            raise SMLimitError(f"--sms {sms}: needs a CUDA GPU, and none is visible here")
        green = green if green is not None else _green_module()
        if green is None or not hasattr(green, "GreenContext"):
            raise SMLimitError(f"--sms {sms}: this PyTorch ({torch.__version__}) has no torch.cuda.green_contexts; "
                               "green contexts need PyTorch 2.9+ built with CUDA 12.8+")
        self.sms, self.device = sms, device
        cls = green.GreenContext
        try:
            if hasattr(cls, "Stream"):  # recent PyTorch: a stream of the context
                self._ctx = cls(num_sms=sms, device_id=device)
                self._stream = self._ctx.Stream()
            elif hasattr(cls, "create"):  # PyTorch 2.9-2.11: make the context current around the work
                self._ctx = cls.create(sms, device)
                self._stream = None
            else:
                raise SMLimitError(f"--sms {sms}: torch.cuda.green_contexts.GreenContext offers neither Stream() "
                                   "nor create(); this PyTorch's green-context API is not one dynprune knows")
        except SMLimitError:
            raise
        except Exception as exc:  # an old driver, a GPU without green contexts, N above the GPU's SMs
            raise SMLimitError(f"--sms {sms}: the green context could not be made ({type(exc).__name__}: {exc}); "
                               "it needs a CUDA 12.8+ driver and a GPU of compute capability 9.0 or newer") from exc

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                yield
            return
        self._ctx.set_context()
        try:
            yield
        finally:
            self._ctx.pop_context()

    @property
    def granted(self) -> int:
        """The SMs the driver gives the context: Hopper grants multiples of 8, at most the GPU's."""
        rounded = -(-self.sms // 8) * 8
        if not torch.cuda.is_available():  # (the tests' stand-in contexts)
            return rounded
        return min(torch.cuda.get_device_properties(self.device).multi_processor_count, rounded)

    def __enter__(self) -> SMLimit:
        self._cm = self._active()
        self._cm.__enter__()
        _entered.append(self.granted)
        return self

    def __exit__(self, *exc: Any) -> None:
        _entered.pop()
        self._cm.__exit__(*exc)

    def check(self, n: int = 4096, iters: int = 20) -> Dict[str, Any]:
        """Throughput of an ``n x n`` fp16 matrix product inside the limit over outside it, against the
        expected ``sms / the GPU's SMs``; ``confined`` when the ratio is below 1.5 times that expected
        (with Hopper's rounding to multiples of 8 allowed for)."""
        total = torch.cuda.get_device_properties(self.device).multi_processor_count
        a = torch.randn(n, n, device=f"cuda:{self.device}", dtype=torch.float16)

        def tflops() -> float:
            for _ in range(3):
                a @ a
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                a @ a
            torch.cuda.synchronize()
            return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12

        whole = tflops()
        with self:
            confined = tflops()
        expected = self.granted / total
        ratio = confined / whole
        return {"sms": self.sms, "gpu_sms": total, "tflops_all": whole, "tflops_confined": confined,
                "ratio": ratio, "expected": expected, "confined": ratio < 1.5 * expected}


def format_check(check: Dict[str, Any]) -> str:
    """One line for the tables: the limit and whether it held."""
    verdict = "confined" if check["confined"] else "NOT CONFINED: these figures do not count"
    return (f"{check['sms']} of {check['gpu_sms']} SMs: fp16 matmul {check['tflops_confined']:.0f} of "
            f"{check['tflops_all']:.0f} TFLOP/s ({check['ratio']:.3f}, expected about {check['expected']:.3f}): "
            f"{verdict}")


def checked_limit(sms: Optional[int], device: int = 0, log: Callable[[str], None] = print,
                  cuda_available: Optional[bool] = None) -> Tuple[ContextManager, Optional[Dict[str, Any]]]:
    """``(context, check)`` for a run confined to ``sms`` SMs: the :class:`SMLimit`, its
    :meth:`~SMLimit.check` made and logged (:func:`format_check`); for no ``sms``, a null context and
    ``None``. Raises :class:`SMLimitError` where the limit cannot be had."""
    if not sms:
        return contextlib.nullcontext(), None
    limit = SMLimit(sms, device, cuda_available=cuda_available)
    check = limit.check()
    log(format_check(check))
    return limit, check
