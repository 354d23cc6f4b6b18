"""Compiled CPU kernels of the blocks: the gate step, the whole compact block, the dense block.

``cpu_gate.c`` is compiled on first use with the system C compiler (``$CC``, else ``cc``) into
a per-user cache (``$DYNPRUNE_CACHE_DIR``, else ``~/.cache/dynprune``) and loaded with
``ctypes``; later runs load the cached library. Where no compiler works, or with
``DYNPRUNE_NATIVE=0``, :func:`native_library` says why once in the log and returns ``None``,
and :class:`~dynprune.compact.CompactBottleneck` keeps its NumPy path, the reference these
kernels are tested against.

Three entry points, one object each here:

- :meth:`BlockPlan.step`: pool, both gates, kept lists and weight gathers of a gated block in
  one call; PyTorch then runs the products on the gathered weights.
- :meth:`BlockPlan.forward`: the same step, then the block's three products on the kept
  channels with their bias, SiLU and shortcut fused, tiled in registers: the CPU runtime's
  path for one image (BENCHMARKS.md: the dynamic nano network 17% faster than the
  step with PyTorch's products, on two cores at 320 px).
- :meth:`DenseBlockPlan.forward`: the same products on every channel of an un-gated block,
  which :class:`~dynprune.fusion.FoldedBottleneck` runs where it measures faster than oneDNN.

The library is built for the CPU it runs on (``-march=native``: the products' vectors as wide
as its registers; the cache key names the CPU) where the compiler takes it, else for the
architecture's baseline (also with ``DYNPRUNE_NATIVE_ARCH=0``). Where PyTorch runs on GNU
OpenMP (its Linux wheels), it is built with ``-fopenmp`` and its parallel loops run on
PyTorch's own thread pool (:func:`shares_torch_openmp`); elsewhere it is built serial.

Why: in NumPy the gate step is a few dozen calls of about a microsecond each, and inside the
running network each call finds cold caches and costs three to five times that (4.5 ms a frame
for the nano detector at 320 on two cores, measured with perf counters in the forward pass,
against 10.7 ms for the blocks' convolutions, matrix products and SiLUs in the same run). And
PyTorch's products on compact widths run at half the dense layers' speed per FLOP, each with a
pass of its own for the bias, the SiLU or the add.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_gate.c")
# -ffp-contract=fast: ISO C mode (-std=c99) would keep every a * b + c as two roundings, no FMA
CFLAGS = ("-O3", "-std=c99", "-ffp-contract=fast", "-shared", "-fPIC")
OPENMP_FLAGS = ("-fopenmp",)
NATIVE_FLAGS = ("-march=native", "-DDP_NATIVE")
_GOMP_FILE = re.compile(r"/libgomp\.so\.1(\.\d+)*$")

_float_p = ctypes.POINTER(ctypes.c_float)
_int64_p = ctypes.POINTER(ctypes.c_int64)
_double_p = ctypes.POINTER(ctypes.c_double)


class _Block(ctypes.Structure):
    """Mirror of ``dp_block`` in cpu_gate.c (same fields, same order)."""

    _fields_ = [(name, ctypes.c_int64) for name in
                ("c", "h1", "h2", "hid1", "hid2", "g1", "g2", "group1", "group2", "taps", "pad_to1", "pad_to2")] + [
        ("fc1_t", _float_p), ("fc2a_t", _float_p), ("fc2b_t", _float_p), ("fc2_b", _float_p),
        ("thresholds", _float_p), ("rows", _float_p), ("w2_ohwi", _float_p), ("pooled", _double_p),
        ("chunk_sums", _float_p), ("chunk_capacity", ctypes.c_int64), ("hidden", _float_p),
        ("saliency", _float_p), ("index", _int64_p), ("scale", _float_p), ("rows_out", _float_p),
        ("w2_out", _float_p), ("counts", _int64_p), ("run_bounds", _int64_p), ("run_bounds2", _int64_p),
        ("w1_kn", _float_p), ("w2_tio", _float_p), ("b3", _float_p), ("w1_out", _float_p), ("b1_out", _float_p),
        ("w2t_out", _float_p), ("b2_out", _float_p), ("maps", _float_p), ("map_capacity", ctypes.c_int64),
        ("gate_seconds", _double_p), ("macs", _int64_p), ("gathered", _int64_p), ("reused", _int64_p),
        ("constant_row", _float_p)]

class _Dense(ctypes.Structure):
    """Mirror of ``dp_dense`` in cpu_gate.c."""

    _fields_ = [(name, ctypes.c_int64) for name in ("c", "h1", "h2", "taps")] + [
        (name, _float_p) for name in ("w1", "b1", "w2", "b2", "w3", "b3")] + [
        (name, ctypes.c_int64) for name in ("ld1", "ld2", "ld3")] + [
        ("maps", _float_p), ("map_capacity", ctypes.c_int64), ("macs", _int64_p)]


#: floats of slack after every buffer the block's products read: they load whole vectors of 16
#: floats (the lanes past a row's end are never stored)
_SLACK = 32


def _round16(n: int) -> int:
    return -(-n // 16) * 16


def _padded_rows(matrix: np.ndarray, ld: int) -> np.ndarray:
    """``matrix`` (rows, n) with each row padded with zeros to ``ld`` floats, flat, then slack for
    the products' whole-vector reads past the last row."""
    rows = matrix.reshape(-1, matrix.shape[-1])
    out = np.zeros(rows.shape[0] * ld + _SLACK, np.float32)
    out[: rows.shape[0] * ld].reshape(rows.shape[0], ld)[:, : rows.shape[1]] = rows
    return out


def _grow_maps(owner, struct: ctypes.Structure, height: int, width: int) -> None:
    """Room in ``struct.maps`` for the products' scratch on a ``height x width`` input (cv1's
    zero-bordered map, then the 3x3's output; ``map_floats`` in cpu_gate.c) at ``owner._widths``,
    the largest kept widths; the array is kept alive as ``owner.maps``."""
    width1, width2 = owner._widths
    need = (height + 2) * (width + 2) * width1 + height * width * width2
    if need > struct.map_capacity:
        owner.maps = np.zeros(need + _SLACK, np.float32)
        struct.maps = _ptr(owner.maps)
        struct.map_capacity = need


_library: Optional[ctypes.CDLL] = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("DYNPRUNE_CACHE_DIR") or Path.home() / ".cache" / "dynprune")


def _compile(target: Path, compiler: str, flags: Tuple[str, ...] = CFLAGS) -> None:
    """Compile to a temporary name, then rename: a concurrent or interrupted build never
    leaves a half-written library under the cached name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, "-o", tmp, str(SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def native_library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or ``None`` (with one log line saying why) where it cannot be had."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    if os.environ.get("DYNPRUNE_NATIVE", "1") == "0":
        log.info("DYNPRUNE_NATIVE=0: the CPU gate step runs in NumPy")
        return None
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        log.warning("no C compiler (%r) found: the CPU gate step runs in NumPy and the blocks' products in "
                    "PyTorch, the dynamic nano network about 1.4x slower at 320 px on two cores; install gcc "
                    "(apt install gcc) or set CC", compiler)
        return None
    # The best build first: for this CPU (-march=native: the block's products as wide as its
    # vector registers), on PyTorch's OpenMP pool; then without -march=native (a compiler that
    # lacks it), then serial.
    openmp = OPENMP_FLAGS if shares_torch_openmp() else ()
    native = NATIVE_FLAGS if os.environ.get("DYNPRUNE_NATIVE_ARCH", "1") != "0" else ()
    builds = [CFLAGS + native + openmp] + ([CFLAGS + openmp] if native else []) + ([CFLAGS] if openmp else [])
    lib, errors = None, []
    for flags in builds:
        try:
            lib = _load(compiler, flags)
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:  # (RuntimeError: also no home directory)
            errors.append(err)
            log.info("build of the CPU gate step with %s failed (%s)", " ".join(flags), err)
    if lib is None:
        log.warning("could not build the CPU gate kernel (%s); the CPU gate step runs in NumPy. "
                    "Set DYNPRUNE_CACHE_DIR to a writable folder if the cache is the problem", errors[-1])
        return None
    lib.dp_block_plan.argtypes = [ctypes.POINTER(_Block), ctypes.c_void_p, ctypes.c_int64]
    lib.dp_block_plan.restype = ctypes.c_int
    lib.dp_block_forward.argtypes = [ctypes.POINTER(_Block), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_void_p]
    lib.dp_block_forward.restype = ctypes.c_int
    lib.dp_dense_forward.argtypes = [ctypes.POINTER(_Dense), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_void_p]
    lib.dp_dense_forward.restype = ctypes.c_int
    lib.dp_vector_floats.argtypes = []
    lib.dp_vector_floats.restype = ctypes.c_int64
    lib.dp_pool_chunk.argtypes = []
    lib.dp_pool_chunk.restype = ctypes.c_int64
    lib.openmp = OPENMP_FLAGS[0] in flags
    lib.native = NATIVE_FLAGS[0] in flags
    _library = lib
    return lib


def _load(compiler: str, flags: Tuple[str, ...]) -> ctypes.CDLL:
    """The library built from SOURCE with ``flags``, from the cache or compiled now."""
    # A -march=native build runs only on CPUs like this one: the key names the CPU too, so that a
    # cache folder shared between machines (a network home) never hands one another's build.
    cpu = cpu_signature() if NATIVE_FLAGS[0] in flags else ""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *flags, platform.machine(), cpu)).encode())
    target = cache_dir() / f"dynprune_cpu_gate_{key.hexdigest()[:16]}.so"
    if not target.exists():
        _compile(target, compiler, flags)
    return ctypes.CDLL(str(target))


def cpu_signature() -> str:
    """The CPU's model and instruction-set flags (``/proc/cpuinfo``; elsewhere what ``platform``
    knows), for the cache key of a build for this CPU."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = fh.read().split("\n\n")[0].splitlines()
        wanted = ("model name", "flags", "features", "cpu part", "cpu implementer")
        return "\n".join(line for line in lines if line.split(":")[0].strip().lower() in wanted)
    except OSError:
        return f"{platform.processor()} {platform.machine()}"


def shares_torch_openmp() -> bool:
    """Whether a ``-fopenmp`` build would run on PyTorch's own OpenMP thread pool.

    It does where PyTorch's parallel backend is OpenMP and the process has already loaded GNU
    OpenMP as ``libgomp.so.1`` (PyTorch's wheels ship it under that name, distributions as
    ``libgomp.so.1.0.0`` behind that soname): the loader then binds the build's
    ``libgomp.so.1`` to that copy. Elsewhere (Intel OpenMP, a renamed libgomp, no ``/proc``) a
    second OpenMP runtime would start its own threads and fight PyTorch's for the cores, so the
    step is built serial. ``DYNPRUNE_NATIVE_OPENMP=0`` forces it serial."""
    if os.environ.get("DYNPRUNE_NATIVE_OPENMP", "1") == "0":
        return False
    try:
        import torch

        if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
            return False
        with open("/proc/self/maps") as fh:
            return any(_GOMP_FILE.search(line) for line in fh)
    except (ImportError, OSError):
        return False


def _ptr(array: np.ndarray, kind=_float_p):
    return array.ctypes.data_as(kind)


class BlockPlan:
    """The native step of one gated block, with its output buffers (reused every call, so one
    forward pass at a time per model, as for any PyTorch module).

    Two entry points: :meth:`step` (pool, gates, kept lists and the gathered weights that
    PyTorch's products then read) and, where ``b3`` is given, :meth:`forward` (the whole block,
    its products included, in one call)."""

    def __init__(self, lib: ctypes.CDLL, *, fc1_t: np.ndarray, fc2a_t: np.ndarray, fc2b_t: np.ndarray,
                 fc2_b: np.ndarray, thresholds: np.ndarray, rows: np.ndarray, w2_ohwi: np.ndarray,
                 groups: Tuple[int, int], group_sizes: Tuple[int, int], pad_to: Tuple[int, int],
                 b3: Optional[np.ndarray] = None) -> None:
        h2, kh, kw, h1 = w2_ohwi.shape
        c = rows.shape[1] - 1
        taps = kh * kw
        capacity = h1 + pad_to[0] + h2 + pad_to[1]
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        # Keep every array alive as long as the struct points at it.
        self._inputs = [f32(a) for a in (fc1_t, fc2a_t, fc2b_t, fc2_b, thresholds, rows, w2_ohwi)]
        self.kernel = (kh, kw)
        self.pooled = np.zeros(c, np.float64)
        self._pool_chunk = int(lib.dp_pool_chunk())
        self.chunk_sums = np.zeros(0, np.float32)  # grows with the largest input seen (see __call__)
        self.hidden = np.zeros(fc1_t.shape[1], np.float32)
        self.saliency = np.zeros(groups[0] + groups[1], np.float32)
        self.index = np.zeros(capacity, np.int64)
        self.scale = np.zeros(capacity + _SLACK, np.float32)  # (forward's products read whole vectors of it)
        self._rows_out = np.zeros(capacity * (c + 1) + _SLACK, np.float32)
        self.rows_out = self._rows_out[: capacity * (c + 1)].reshape(capacity, c + 1)
        self.w2_out = np.zeros((h2 + pad_to[1]) * taps * (h1 + pad_to[0]), np.float32)
        self.counts = np.zeros(4, np.int64)
        self.run_bounds = np.zeros(h1 + pad_to[0] + 1, np.int64)
        self.run_bounds2 = np.zeros(h2 + pad_to[1] + 1, np.int64)
        fc1, fc2a, fc2b, bias, thr, table, w2 = self._inputs
        self._block = _Block(c, h1, h2, fc2a.shape[0], fc2b.shape[0], groups[0], groups[1], group_sizes[0],
                             group_sizes[1], taps, pad_to[0], pad_to[1], _ptr(fc1), _ptr(fc2a), _ptr(fc2b),
                             _ptr(bias), _ptr(thr), _ptr(table), _ptr(w2), _ptr(self.pooled, _double_p),
                             _ptr(self.chunk_sums), 0, _ptr(self.hidden), _ptr(self.saliency),
                             _ptr(self.index, _int64_p), _ptr(self.scale), _ptr(self._rows_out), _ptr(self.w2_out),
                             _ptr(self.counts, _int64_p), _ptr(self.run_bounds, _int64_p),
                             _ptr(self.run_bounds2, _int64_p))
        self.fused = b3 is not None and (kh, kw) == (3, 3)  # the C side's taps are 3x3
        if self.fused:  # the tables and buffers of forward()
            ld1, ld2 = _round16(h1 + pad_to[0]), _round16(h2 + pad_to[1])
            self._fused_inputs = [f32(table[:h1, :c].T), f32(w2.transpose(1, 2, 3, 0).reshape(taps, h1, h2)),
                                  _padded_rows(f32(b3)[None], _round16(c))]
            self._fused_outputs = [np.zeros(c * ld1 + _SLACK, np.float32), np.zeros(ld1 + _SLACK, np.float32),
                                   np.zeros(taps * (h1 + pad_to[0]) * ld2 + _SLACK, np.float32),
                                   np.zeros(ld2 + _SLACK, np.float32)]
            for name, array in zip(("w1_kn", "w2_tio", "b3", "w1_out", "b1_out", "w2t_out", "b2_out"),
                                   self._fused_inputs + self._fused_outputs):
                setattr(self._block, name, _ptr(array))
            self.maps = np.zeros(0, np.float32)  # grows with the largest input seen (see forward)
            self.gate_seconds = np.zeros(1, np.float64)  # forward's time before its products
            self.macs = np.zeros(1, np.int64)  # multiply-adds forward's products ran (whole vectors)
            # forward's last gather (its kept lists; -1: none yet), and whether a call reused it
            self.gathered = np.full(capacity + 2, -1, np.int64)
            self.reused = np.zeros(1, np.int64)
            self.constant_row = np.zeros(c, np.float32)
            self._block.gate_seconds = _ptr(self.gate_seconds, _double_p)
            self._block.macs = _ptr(self.macs, _int64_p)
            self._block.gathered = _ptr(self.gathered, _int64_p)
            self._block.reused = _ptr(self.reused, _int64_p)
            self._block.constant_row = _ptr(self.constant_row)
            self.vector_floats = int(lib.dp_vector_floats())
            self._widths = (h1 + pad_to[0], h2 + pad_to[1])
        self._ref = ctypes.byref(self._block)
        self._call = lib.dp_block_plan
        self._forward = lib.dp_block_forward

    def __call__(self, pixels_address: int, pixels: int) -> Tuple[int, int, int, int]:
        """Run on one image's ``(pixels, C)`` float32 NHWC memory at ``pixels_address``;
        returns ``(kept1, kept2, slots1, slots2)``; results are in this object's buffers."""
        self.step(pixels_address, pixels)
        kept1, kept2, slots1, slots2 = self.counts.tolist()
        return kept1, kept2, slots1, slots2

    def step(self, pixels_address: int, pixels: int) -> bytes:
        """As a call, but the four counts come back as the bytes of ``counts``: hashable, a key
        for what the caller built for the same counts before, with no Python ints to make."""
        if self._call(self._ref, pixels_address, pixels) != 0:  # the first input this large
            self._reserve(pixels)
            if self._call(self._ref, pixels_address, pixels) != 0:
                raise RuntimeError(f"CPU gate step: no room for the pool of {pixels} pixels")
        return self.counts.tobytes()

    def forward(self, pixels_address: int, height: int, width: int, out_address: int) -> bytes:
        """The whole block on one image: ``(height * width, C)`` float32 NHWC pixels at
        ``pixels_address`` in, the block's output in the same layout written at ``out_address``;
        returns the counts as :meth:`step` does. Needs ``b3`` at construction."""
        status = self._forward(self._ref, pixels_address, height, width, out_address)
        if status != 0:  # the first input this large: room for its pool and maps, then again
            self._reserve(height * width)
            _grow_maps(self, self._block, height, width)
            if self._forward(self._ref, pixels_address, height, width, out_address) != 0:
                raise RuntimeError(f"CPU block step: no room for a {height}x{width} input")
        return self.counts.tobytes()

    def _reserve(self, pixels: int) -> None:
        """Room in ``chunk_sums`` for the pool of an input of ``pixels`` pixels (the C step checks
        the room before it starts and returns -1 without it)."""
        chunks = -(-pixels // self._pool_chunk)
        if chunks <= self._block.chunk_capacity:
            return
        self.chunk_sums = np.zeros(chunks * self.pooled.size, np.float32)
        self._block.chunk_sums = _ptr(self.chunk_sums)
        self._block.chunk_capacity = chunks

    def w2(self, slots1: int, slots2: int) -> np.ndarray:
        """The gathered 3x3 weight as ``(slots2, kh, kw, slots1)`` (OHWI) of the last call."""
        kh, kw = self.kernel
        return self.w2_out[: slots2 * kh * kw * slots1].reshape(slots2, kh, kw, slots1)


class DenseBlockPlan:
    """An un-gated bottleneck (BN folded) as one compiled call: the fused block's products on
    every channel, its weights laid out for them once. ``w1`` ``(h1, c)``, ``w2`` ``(h2, h1, 3,
    3)``, ``w3`` ``(c, h2)``, float32 NumPy arrays; biases ``(h1,)``, ``(h2,)``, ``(c,)``."""

    def __init__(self, lib: ctypes.CDLL, *, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray,
                 w3: np.ndarray, b3: np.ndarray) -> None:
        h2, h1, kh, kw = w2.shape
        if (kh, kw) != (3, 3):
            raise ValueError(f"DenseBlockPlan runs 3x3 middle layers (got {kh}x{kw})")
        c = w1.shape[1]
        ld1, ld2, ld3 = _round16(h1), _round16(h2), _round16(c)
        padded = _padded_rows
        self._arrays = [padded(w1.T, ld1), padded(b1[None], ld1),
                        padded(w2.transpose(2, 3, 1, 0).reshape(9 * h1, h2), ld2), padded(b2[None], ld2),
                        padded(w3.T, ld3), padded(b3[None], ld3)]
        self.macs = np.zeros(1, np.int64)
        self.maps = np.zeros(0, np.float32)
        self._widths = (h1, h2)
        self._dense = _Dense(c, h1, h2, 9, *(_ptr(a) for a in self._arrays), ld1, ld2, ld3,
                             _ptr(self.maps), 0, _ptr(self.macs, _int64_p))
        self._ref = ctypes.byref(self._dense)
        self._forward = lib.dp_dense_forward

    def forward(self, pixels_address: int, height: int, width: int, out_address: int) -> None:
        """The block on one image's ``(height * width, C)`` float32 NHWC pixels, its output
        written in the same layout at ``out_address``."""
        if self._forward(self._ref, pixels_address, height, width, out_address) != 0:
            _grow_maps(self, self._dense, height, width)
            if self._forward(self._ref, pixels_address, height, width, out_address) != 0:
                raise RuntimeError(f"CPU dense block: no room for a {height}x{width} input")
