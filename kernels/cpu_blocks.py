"""The compiled CPU backend: whole gated blocks (and un-gated ones) in C.

``cpu_blocks.c`` is compiled on first use with the system C compiler (``$CC``, else ``cc``) into
a per-user cache (``$DYNPRUNE_CACHE_DIR``, else ``~/.cache/dynprune``) and loaded with
``ctypes``; later runs load the cached library. Where no compiler works, or with
``DYNPRUNE_COMPILED=0``, :func:`compiled_library` says why once in the log and returns ``None``,
and the dispatcher gives the model the reference backend (kernels/reference.py), the
specification these kernels are tested against.

- :class:`CompiledCpuBlock`: the backend of a gated block (kernels/block.py); each image is one
  call of :meth:`BlockKernel.forward`: pool, both gates, kept lists, weight gathers, then the
  block's three products on the kept channels with their bias, SiLU, saliency scale and shortcut
  fused, tiled in vector registers.
- :class:`DenseBlockKernel`: the same products on every channel of an un-gated block, which
  :class:`~dynprune.fusion.FoldedBottleneck` runs where it measures faster than oneDNN.

The library is built for the CPU it runs on (``-march=native``: the products' vectors as wide
as its registers; the cache key names the CPU) where the compiler takes it, else for the
architecture's baseline (also with ``DYNPRUNE_NATIVE_ARCH=0``). Where PyTorch runs on GNU
OpenMP (its Linux wheels), it is built with ``-fopenmp`` and its parallel loops run on
PyTorch's own thread pool (:func:`shares_torch_openmp`); elsewhere it is built serial.

Why whole blocks in C (docs/DESIGN.md, "The CPU path"): in NumPy the gate step is a few dozen
calls of about a microsecond each, and inside the running network each call finds cold caches
and costs three to five times that; and PyTorch's products on compact widths run at half the
dense layers' speed per FLOP, each with a pass of its own for the bias, the SiLU or the add.
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
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from dynprune.cache import cache_dir
from dynprune.kernels.block import CompactBlock
from dynprune.layers import Bottleneck

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_blocks.c")
# -ffp-contract=fast: ISO C mode (-std=c99) would keep every a * b + c as two roundings, no FMA
CFLAGS = ("-O3", "-std=c99", "-ffp-contract=fast", "-shared", "-fPIC")
OPENMP_FLAGS = ("-fopenmp",)
NATIVE_FLAGS = ("-march=native", "-DDP_NATIVE")
_GOMP_FILE = re.compile(r"/libgomp\.so\.1(\.\d+)*$")

_float_p = ctypes.POINTER(ctypes.c_float)
_int64_p = ctypes.POINTER(ctypes.c_int64)
_double_p = ctypes.POINTER(ctypes.c_double)


class _Block(ctypes.Structure):
    """Mirror of ``dp_block`` in cpu_blocks.c (same fields, same order)."""

    _fields_ = [(name, ctypes.c_int64) for name in
                ("c", "h1", "h2", "hid1", "hid2", "g1", "g2", "group1", "group2", "taps", "pad_to1", "pad_to2")] + [
        ("fc1_t", _float_p), ("fc2a_t", _float_p), ("fc2b_t", _float_p), ("fc2_b", _float_p),
        ("thresholds", _float_p), ("rows", _float_p), ("pooled", _double_p),
        ("chunk_sums", _float_p), ("chunk_capacity", ctypes.c_int64), ("hidden", _float_p),
        ("saliency", _float_p), ("index", _int64_p), ("scale", _float_p), ("rows_out", _float_p),
        ("counts", _int64_p), ("run_bounds", _int64_p), ("run_bounds2", _int64_p),
        ("w1_kn", _float_p), ("w2_tio", _float_p), ("b3", _float_p), ("w1_out", _float_p), ("b1_out", _float_p),
        ("w2t_out", _float_p), ("b2_out", _float_p), ("maps", _float_p), ("map_capacity", ctypes.c_int64),
        ("gate_seconds", _double_p), ("macs", _int64_p), ("gathered", _int64_p), ("reused", _int64_p),
        ("constant_row", _float_p)]

class _Dense(ctypes.Structure):
    """Mirror of ``dp_dense`` in cpu_blocks.c."""

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
    zero-bordered map, then the 3x3's output; ``map_floats`` in cpu_blocks.c) at ``owner._widths``,
    the largest kept widths; the array is kept alive as ``owner.maps``."""
    width1, width2 = owner._widths
    need = (height + 2) * (width + 2) * width1 + height * width * width2
    if need > struct.map_capacity:
        owner.maps = np.zeros(need + _SLACK, np.float32)
        struct.maps = _ptr(owner.maps)
        struct.map_capacity = need


_library: Optional[ctypes.CDLL] = None
_tried = False


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


def compiled_library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or ``None`` (with one log line saying why) where it cannot be had."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    if os.environ.get("DYNPRUNE_COMPILED", "1") == "0":
        log.info("DYNPRUNE_COMPILED=0: gated blocks run on the reference backend (PyTorch)")
        return None
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        log.warning("no C compiler (%r) found: gated blocks run on the reference backend (PyTorch), far "
                    "slower than compiled; install gcc (apt install gcc) or set CC", compiler)
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
            log.info("build of the CPU blocks with %s failed (%s)", " ".join(flags), err)
    if lib is None:
        log.warning("could not build the CPU blocks (%s); gated blocks run on the reference backend. "
                    "Set DYNPRUNE_CACHE_DIR to a writable folder if the cache is the problem", errors[-1])
        return None
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
    lib.for_this_cpu = NATIVE_FLAGS[0] in flags
    _library = lib
    return lib


def _load(compiler: str, flags: Tuple[str, ...]) -> ctypes.CDLL:
    """The library built from SOURCE with ``flags``, from the cache or compiled now."""
    # A -march=native build runs only on CPUs like this one: the key names the CPU too, so that a
    # cache folder shared between machines (a network home) never hands one another's build.
    cpu = cpu_signature() if NATIVE_FLAGS[0] in flags else ""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *flags, platform.machine(), cpu)).encode())
    target = cache_dir() / f"dynprune_cpu_blocks_{key.hexdigest()[:16]}.so"
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
    library is built serial. ``DYNPRUNE_COMPILED_OPENMP=0`` forces it serial."""
    if os.environ.get("DYNPRUNE_COMPILED_OPENMP", "1") == "0":
        return False
    try:
        if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
            return False
        with open("/proc/self/maps") as fh:
            return any(_GOMP_FILE.search(line) for line in fh)
    except OSError:
        return False


def image_pixels(x: torch.Tensor) -> Optional[np.ndarray]:
    """One float32 CPU image in channels-last memory as its ``(H, W, C)`` NumPy pixels (a view),
    or ``None`` for anything else: a batch, another dtype or device, NCHW memory, a tensor that
    needs grad. The checks are the NumPy conversion's own and its array's flags, which cost far
    less inside a running network than asking the tensor (see :func:`~dynprune.fusion.bottleneck_pixels`)."""
    try:
        nhwc = x.numpy().transpose(0, 2, 3, 1)  # raises for a GPU tensor or one that needs grad
    except (TypeError, RuntimeError):
        return None
    if nhwc.shape[0] != 1 or nhwc.dtype != np.float32 or not nhwc.flags.c_contiguous:
        return None
    return nhwc[0]


def compiled_forward(kernel, x: torch.Tensor, h: int, w: int, c: int) -> Tuple[torch.Tensor, Any]:
    """A compiled block (:class:`BlockKernel` or :class:`DenseBlockKernel`) on one channels-last
    float32 image ``x`` of ``h x w`` pixels: its new ``(1, c, h, w)`` channels-last output
    (NumPy-made: one torch call), and what ``kernel.forward`` returned."""
    out = torch.from_numpy(np.empty((1, h, w, c), np.float32).transpose(0, 3, 1, 2))
    return out, kernel.forward(x.data_ptr(), h, w, out.data_ptr())


def _ptr(array: np.ndarray, kind=_float_p):
    return array.ctypes.data_as(kind)


class BlockKernel:
    """One gated block's compiled forward (``dp_block_forward``), with its tables and output
    buffers (reused every call, so one forward pass at a time per model, as for any PyTorch
    module). Threshold gates and a 3x3 middle layer only (:func:`unsupported` says why not)."""

    def __init__(self, lib: ctypes.CDLL, *, fc1_t: np.ndarray, fc2a_t: np.ndarray, fc2b_t: np.ndarray,
                 fc2_b: np.ndarray, thresholds: np.ndarray, rows: np.ndarray, w2: np.ndarray,
                 groups: Tuple[int, int], group_sizes: Tuple[int, int], pad_to: Tuple[int, int],
                 b3: np.ndarray) -> None:
        h2, h1, kh, kw = w2.shape
        if (kh, kw) != (3, 3):
            raise ValueError(f"the compiled block runs 3x3 middle layers (got {kh}x{kw})")
        c = rows.shape[1] - 1
        taps = kh * kw
        capacity = h1 + pad_to[0] + h2 + pad_to[1]
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        # Keep every array alive as long as the struct points at it.
        self._inputs = [f32(a) for a in (fc1_t, fc2a_t, fc2b_t, fc2_b, thresholds, rows)]
        self.pooled = np.zeros(c, np.float64)
        self._pool_chunk = int(lib.dp_pool_chunk())
        self.chunk_sums = np.zeros(0, np.float32)  # grows with the largest input seen (see _reserve)
        self.hidden = np.zeros(fc1_t.shape[1], np.float32)
        self.saliency = np.zeros(groups[0] + groups[1], np.float32)
        self.index = np.zeros(capacity, np.int64)
        self.scale = np.zeros(capacity + _SLACK, np.float32)  # (the products read whole vectors of it)
        self._rows_out = np.zeros(capacity * (c + 1) + _SLACK, np.float32)
        self.counts = np.zeros(4, np.int64)
        self.run_bounds = np.zeros(h1 + pad_to[0] + 1, np.int64)
        self.run_bounds2 = np.zeros(h2 + pad_to[1] + 1, np.int64)
        fc1, fc2a, fc2b, bias, thr, table = self._inputs
        self._block = _Block(c, h1, h2, fc2a.shape[0], fc2b.shape[0], groups[0], groups[1], group_sizes[0],
                             group_sizes[1], taps, pad_to[0], pad_to[1], _ptr(fc1), _ptr(fc2a), _ptr(fc2b),
                             _ptr(bias), _ptr(thr), _ptr(table), _ptr(self.pooled, _double_p),
                             _ptr(self.chunk_sums), 0, _ptr(self.hidden), _ptr(self.saliency),
                             _ptr(self.index, _int64_p), _ptr(self.scale), _ptr(self._rows_out),
                             _ptr(self.counts, _int64_p), _ptr(self.run_bounds, _int64_p),
                             _ptr(self.run_bounds2, _int64_p))
        ld1, ld2 = _round16(h1 + pad_to[0]), _round16(h2 + pad_to[1])
        self._product_inputs = [f32(table[:h1, :c].T), f32(w2.transpose(2, 3, 1, 0).reshape(taps, h1, h2)),
                                _padded_rows(f32(b3)[None], _round16(c))]
        self._product_outputs = [np.zeros(c * ld1 + _SLACK, np.float32), np.zeros(ld1 + _SLACK, np.float32),
                                 np.zeros(taps * (h1 + pad_to[0]) * ld2 + _SLACK, np.float32),
                                 np.zeros(ld2 + _SLACK, np.float32)]
        for name, array in zip(("w1_kn", "w2_tio", "b3", "w1_out", "b1_out", "w2t_out", "b2_out"),
                               self._product_inputs + self._product_outputs):
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
        self._forward = lib.dp_block_forward

    def tables(self) -> Dict[str, np.ndarray]:
        """The weight tables ``dp_block`` reads, by field name, laid out as the C side reads them
        (what tests/cpu_blocks_harness.c replays where Python cannot run)."""
        names = ("fc1_t", "fc2a_t", "fc2b_t", "fc2_b", "thresholds", "rows", "w1_kn", "w2_tio", "b3")
        return dict(zip(names, self._inputs + self._product_inputs))

    def forward(self, pixels_address: int, height: int, width: int, out_address: int) -> bytes:
        """The whole block on one image: ``(height * width, C)`` float32 NHWC pixels at
        ``pixels_address`` in, the block's output in the same layout written at ``out_address``.
        Returns the counts ``(kept1, kept2, slots1, slots2)`` as the bytes of :attr:`counts`:
        hashable, a key for what the caller made for the same counts before, with no Python ints
        to make."""
        status = self._forward(self._ref, pixels_address, height, width, out_address)
        if status != 0:  # the first input this large: room for its pool and maps, then again
            self._reserve(height * width)
            _grow_maps(self, self._block, height, width)
            if self._forward(self._ref, pixels_address, height, width, out_address) != 0:
                raise RuntimeError(f"compiled CPU block: no room for a {height}x{width} input")
        return self.counts.tobytes()

    def _reserve(self, pixels: int) -> None:
        """Room in ``chunk_sums`` for the pool of an input of ``pixels`` pixels (the C side checks
        the room before it starts and returns -1 without it)."""
        chunks = -(-pixels // self._pool_chunk)
        if chunks <= self._block.chunk_capacity:
            return
        self.chunk_sums = np.zeros(chunks * self.pooled.size, np.float32)
        self._block.chunk_sums = _ptr(self.chunk_sums)
        self._block.chunk_capacity = chunks


def unsupported(block: Bottleneck) -> Optional[str]:
    """Why the compiled backend cannot run a gated block, or ``None`` where it can."""
    if block.gate1.mode != "threshold" or block.gate2.mode != "threshold":
        return f"its gates are {block.gate1.mode!r} (the compiled blocks run ManiDP's thresholds)"
    kernel = tuple(block.cv2.conv.weight.shape[-2:])
    if kernel != (3, 3):
        return f"its middle layer is {kernel[0]}x{kernel[1]} (the compiled blocks run 3x3)"
    return None


class CompiledCpuBlock(CompactBlock):
    """The compiled CPU backend of a gated block: each image one call of
    :meth:`BlockKernel.forward`, float32 on the CPU.

    ``pad_to = (pad1, pad2)``: gate 1's and gate 2's kept lists are padded to a multiple of that
    many slots with *zero-scaled* copies of a kept channel, so that the products' widths fill
    whole vectors (docs/DESIGN.md, "The CPU path"). A padded slot is computed but its scale is
    exactly 0, so the next layer adds exactly 0 from it: the result is unchanged, and
    :attr:`last_kept` counts only real channels.
    """

    backend = "cpu"

    def __init__(self, block: Bottleneck, pad_to: int | Tuple[int, int] = (4, 8)) -> None:
        super().__init__(block)
        why = unsupported(block)
        if why is not None:
            raise ValueError(f"the compiled CPU backend cannot run this block: {why}")
        pad_to = (pad_to, pad_to) if isinstance(pad_to, int) else tuple(pad_to)
        if len(pad_to) != 2 or min(pad_to) < 1:
            raise ValueError(f"pad_to must be one or two integers >= 1 (gate 1, gate 2), got {pad_to}")
        self.pad_to: Tuple[int, int] = pad_to
        self._kernel: Optional[BlockKernel] = None
        self._counts: Dict[bytes, np.ndarray] = {}  # the kept-count array for each key of counts

    def _apply(self, fn, recurse: bool = True):
        # .to(), .float(), ...: the kernel's tables hold the old weights; remade on the next call
        self._kernel, self._counts = None, {}
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        # the kernel holds ctypes pointers, which cannot be copied or pickled; remade on the next call
        state = dict(self.__dict__)
        state["_kernel"], state["_counts"] = None, {}
        return state

    @property
    def kernel(self) -> BlockKernel:
        """The compiled block, built on the first call from the current weights."""
        if self._kernel is None:
            lib = compiled_library()
            if lib is None:
                raise RuntimeError("the compiled CPU backend needs a C compiler (see the log); "
                                   "use the reference backend")
            self._kernel = self._build(lib)
        return self._kernel

    def _build(self, lib: ctypes.CDLL) -> BlockKernel:
        g1, g2 = self.gate1, self.gate2

        def arr(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().float().contiguous().numpy().copy()

        # Both gates as one MLP: fc1 side by side, fc2 per gate. The 1x1 weights as rows: kept
        # outputs of cv1 are rows of W1 (C_out, C_in), kept inputs of cv3 rows of W3^T (C_in,
        # C_out); one table, rows of W1 with b1 beside them, then rows of W3^T with b2 beside them
        # (b2 belongs to the 3x3, whose output channels are W3's inputs).
        rows = torch.cat([torch.cat([self.w1.flatten(1), self.b1[:, None]], 1),
                          torch.cat([self.w3.flatten(1).t(), self.b2[:, None]], 1)])
        # saliency >= threshold and > 0 as one comparison: a zero threshold becomes the smallest
        # positive float (Gate.group_keep)
        thresholds = torch.cat([g1.threshold.expand(g1.groups), g2.threshold.expand(g2.groups)])
        return BlockKernel(lib, fc1_t=arr(torch.cat([g1.fc1.weight, g2.fc1.weight]).t()),
                           fc2a_t=arr(g1.fc2.weight.t()), fc2b_t=arr(g2.fc2.weight.t()),
                           fc2_b=arr(torch.cat([g1.fc2.bias, g2.fc2.bias])),
                           thresholds=np.maximum(arr(thresholds), np.finfo(np.float32).tiny), rows=arr(rows),
                           w2=arr(self.w2), groups=(g1.groups, g2.groups),
                           group_sizes=(g1.group, g2.group), pad_to=self.pad_to, b3=arr(self.b3))

    def forward(self, x):
        # One float32 image in channels-last memory (every serving and benchmark frame): no check
        # that the NumPy conversion does not make for free, nothing built that an earlier frame
        # with the same kept counts built, no attribute set (docs/DESIGN.md, "The CPU path").
        kernel = self._kernel
        if kernel is None:
            kernel = self.kernel
        nhwc = image_pixels(x)
        if nhwc is None:
            return self._forward_batch(x)
        h, w, c = nhwc.shape
        out, key = compiled_forward(kernel, x, h, w, c)
        kept = self._counts.get(key)
        if kept is None:
            kept = self._counts[key] = np.frombuffer(key, dtype=np.int64)[None, :2].copy()
        self._kept[0] = kept
        if self.profile:
            self._gate_ms[0] += kernel.gate_seconds[0] * 1e3
        return out

    def _forward_batch(self, x):
        """A batch (or an input in another memory format), one compiled call per image."""
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise ValueError(f"the compiled CPU backend runs float32 on the CPU (got {x.dtype} on {x.device}); "
                             "use the Triton backend on a GPU")
        x = x.detach().contiguous(memory_format=torch.channels_last)
        b, c, h, w = x.shape
        kernel = self.kernel
        outs, kept = [], np.empty((b, 2), dtype=np.int64)
        gate_seconds = 0.0
        for i in range(b):
            out, key = compiled_forward(kernel, x[i : i + 1], h, w, c)
            outs.append(out)
            kept[i] = np.frombuffer(key, dtype=np.int64)[:2]
            gate_seconds += kernel.gate_seconds[0]
        self.last_kept = kept
        if self.profile:
            self.gate_ms += gate_seconds * 1e3
        return torch.cat(outs).contiguous(memory_format=torch.channels_last)


class DenseBlockKernel:
    """An un-gated bottleneck (BN folded) as one compiled call: the gated block's products on
    every channel, its weights laid out for them once. ``w1`` ``(h1, c)``, ``w2`` ``(h2, h1, 3,
    3)``, ``w3`` ``(c, h2)``, float32 NumPy arrays; biases ``(h1,)``, ``(h2,)``, ``(c,)``."""

    def __init__(self, lib: ctypes.CDLL, *, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray,
                 w3: np.ndarray, b3: np.ndarray) -> None:
        h2, h1, kh, kw = w2.shape
        if (kh, kw) != (3, 3):
            raise ValueError(f"DenseBlockKernel runs 3x3 middle layers (got {kh}x{kw})")
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

    def tables(self) -> Dict[str, np.ndarray]:
        """The weight tables ``dp_dense`` reads, by field name, laid out as the C side reads them."""
        return dict(zip(("w1", "b1", "w2", "b2", "w3", "b3"), self._arrays))

    def forward(self, pixels_address: int, height: int, width: int, out_address: int) -> None:
        """The block on one image's ``(height * width, C)`` float32 NHWC pixels, its output
        written in the same layout at ``out_address``."""
        if self._forward(self._ref, pixels_address, height, width, out_address) != 0:
            _grow_maps(self, self._dense, height, width)
            if self._forward(self._ref, pixels_address, height, width, out_address) != 0:
                raise RuntimeError(f"CPU dense block: no room for a {height}x{width} input")
