"""Tile sizes of the Triton gather convolution: a default per layer shape, or the fastest measured
on this GPU at this SM count.

Which tiles win depends on the GPU as much as on the layer: on 132 SMs at batch 1 a 20x20 layer
needs short tiles so that enough programs run, while on a Jetson's 8-16 SMs a handful of programs
fills the GPU and longer tiles (more work per loaded index slice and weight tile) should win
(docs/DESIGN.md, "The GPU path"). So the runtime uses, per layer:

1. the tile ``dynprune tune`` measured fastest for this layer on this GPU, Triton version and SM
   count (a green-context limit, :mod:`dynprune.sm_limit`, counts as its own GPU), kept in
   ``<cache>/conv_tiles.json`` (:mod:`dynprune.cache`), else
2. :func:`default_tile`, the tiles swept on the H100 at all 132 SMs.

A tile is a dict: ``block_m`` (output pixels), ``block_n`` (output channels), ``block_k`` (input
channels per step), ``num_warps``, ``num_stages`` and ``flat`` (1: the k x k taps and the
input-channel steps in one loop, which software pipelining can overlap; 0: the taps unrolled inside
the channel loop, one index load for all nine; kernels/gather_conv.py says why both exist).
An un-gated layer (all channels in and out: the stem, the stride-2 convolutions, the laterals, the
predictions) has one more candidate, :data:`CUDNN`: PyTorch's convolution and a separate SiLU,
its default; a Triton tile wins it only where fusing the SiLU is measured to pay on this GPU.

Tuning (:func:`tune_calls`) times every candidate tile on the layer's real inputs, recorded from a
forward pass (:func:`record_calls`), in CUDA graphs so that the GPU's time is measured, not the
launches'; a candidate whose output differs from the default tile's is refused, and the default
is always a candidate, so a tuned layer is never slower than its default as measured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from dynprune.cache import cache_dir
from dynprune.sm_limit import active_sms
from dynprune.timing import graph_ms

log = logging.getLogger(__name__)

Tile = Dict[str, int]
TILE_FIELDS = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "flat")
CACHE_FILE = "conv_tiles.json"
#: bumped when the kernel's tile parameters change meaning: tables tuned before are not read
KERNEL_REVISION = 1


class LayerKey(NamedTuple):
    """What a gather convolution's best tile depends on: its shape, batch, precision and whether
    its input and output channels come from kept lists (read in runs of ``in_run``/``out_run``).
    A tuple, not a dataclass: one is made per launch, and a frozen dataclass costs microseconds."""

    c_out: int
    c_in: int
    k: int
    stride: int
    ho: int
    wo: int
    batch: int
    dtype: str
    in_listed: bool
    out_listed: bool
    in_run: int
    out_run: int
    residual: bool

    def text(self) -> str:
        ins = f"list/r{self.in_run}" if self.in_listed else "all"
        outs = f"list/r{self.out_run}" if self.out_listed else "all"
        res = " +res" if self.residual else ""
        return (f"{self.k}x{self.k}/{self.stride} {self.c_in}->{self.c_out} @{self.ho}x{self.wo} b{self.batch} "
                f"{self.dtype} in:{ins} out:{outs}{res}")


_dtype_names: Dict[torch.dtype, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    """``float16`` for ``torch.float16``: a dict lookup, as it runs on every launch."""
    name = _dtype_names.get(dtype)
    if name is None:
        name = _dtype_names[dtype] = str(dtype).removeprefix("torch.")
    return name


def default_tile(c_out: int, c_in: int, k: int, pixels: int, in_run: int = 1) -> Tile:
    """Tiles for a layer shape, from ``benchmarks/gpu_kernels.py --sweep`` on the H100 at all its
    SMs (NHWC fp16, the nano detector's layers at 640, keep 1.0 and 0.5): large maps want long
    pixel tiles; the small deep layers want short tiles and a deep input-channel step, so that
    enough programs run (a 20x20 map has only 400 pixels) and each loads its index slice and
    weights once per 64 channels. With kept lists read a run at a time (``in_run``) the 3x3 layers
    at 40x40 want longer pixel tiles. Another GPU or SM count: ``dynprune tune``."""
    if k > 1 and in_run > 1 and 1600 <= pixels < 6400:
        tile = {"block_m": 64, "block_n": 32, "block_k": 64}
    elif pixels >= 6400:  # 80x80 and larger
        tile = {"block_m": 128 if c_out <= 32 else 64, "block_n": 32, "block_k": 32}
    elif k == 1:
        tile = {"block_m": 16, "block_n": 32, "block_k": 64}
    else:
        tile = {"block_m": 32, "block_n": 16, "block_k": 64}
    return {**tile, "num_warps": 4, "num_stages": 3, "flat": 0}


#: the "tile" that runs an un-gated layer as PyTorch does (cuDNN, then the SiLU): such a layer's default
CUDNN: Tile = {"cudnn": 1}


def is_cudnn(tile: Tile) -> bool:
    """Whether ``tile`` is :data:`CUDNN` (PyTorch's form), not a Triton tile."""
    return bool(tile.get("cudnn"))


def default_for(key: LayerKey) -> Tile:
    """A layer's default: :data:`CUDNN` for an un-gated layer, else :func:`default_tile` of its shape."""
    if not key.in_listed and not key.out_listed:
        return CUDNN
    return default_tile(key.c_out, key.c_in, key.k, key.ho * key.wo, key.in_run)


#: (block_m, block_n, block_k, num_warps, num_stages): the sweep's configurations, and the longer
#: tiles a GPU with few SMs may want
_SHAPES = [(16, 32, 64, 4, 3), (32, 16, 64, 4, 3), (32, 32, 32, 4, 3), (32, 32, 64, 4, 3), (64, 32, 32, 4, 3),
           (64, 32, 64, 4, 3), (64, 64, 32, 4, 3), (64, 64, 64, 4, 3), (128, 32, 32, 4, 3), (128, 64, 32, 4, 3),
           (128, 64, 64, 8, 3), (128, 128, 32, 8, 3), (64, 32, 64, 4, 4), (32, 64, 64, 4, 3)]


def candidate_tiles(key: LayerKey) -> List[Tile]:
    """The tiles tuning tries for a layer: its default first (:func:`default_for`; an un-gated layer's
    is :data:`CUDNN`, then the shape's Triton default), then every configuration that keeps the run
    promises (``block_k`` a multiple of ``in_run``, ``block_n`` of ``out_run``) and is not far
    larger than the layer; k x k layers in both loop orders."""
    p2 = _next_power_of_2
    tiles = [default_for(key)]
    if is_cudnn(tiles[0]):
        tiles.append(default_tile(key.c_out, key.c_in, key.k, key.ho * key.wo, key.in_run))
    for bm, bn, bk, warps, stages in _SHAPES:
        if bk % key.in_run or bn % key.out_run:
            continue
        if bm > max(16, p2(key.ho * key.wo)) or bn > max(16, p2(key.c_out)) or bk > max(16, p2(key.c_in)):
            continue
        for flat in ((0, 1) if key.k > 1 else (0,)):
            tile = {"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": warps, "num_stages": stages,
                    "flat": flat}
            if tile not in tiles:
                tiles.append(tile)
    return tiles


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# -- where the tiles are used: this GPU at this SM count --------------------------------------------

def gpu_table_key(device: torch.device, sms: int) -> str:
    """The name a tuned table is kept under: the GPU, its compute capability, Triton's version,
    the SM count and the kernel's revision."""
    from dynprune.kernels.triton_trial import triton_version

    major, minor = torch.cuda.get_device_capability(device)
    return (f"{torch.cuda.get_device_name(device)} | {major}.{minor} | triton {triton_version()} | {sms} SMs | "
            f"kernel r{KERNEL_REVISION}")


def sms_in_use(device: torch.device) -> int:
    """The SMs the current work runs on: the active green-context limit, else the whole GPU."""
    limited = active_sms()
    if limited is not None:
        return limited
    return torch.cuda.get_device_properties(device).multi_processor_count


def _valid_tile(tile: Any) -> bool:
    return tile == CUDNN or isinstance(tile, dict) and all(isinstance(tile.get(f), int) for f in TILE_FIELDS)


def tiles_file() -> Path:
    """Where the tuned tables are kept: ``<cache>/conv_tiles.json``."""
    return cache_dir() / CACHE_FILE


def read_tables() -> Dict[str, dict]:
    """Every tuned table in the cache file, by :func:`gpu_table_key` (an unreadable file: none)."""
    try:
        data = json.loads(tiles_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_table(table_key: str, layers: Dict[str, dict], about: Dict[str, Any]) -> Path:
    """Keep ``layers`` (layer text -> tile and times) as the table of ``table_key``, merged into
    what the file holds for it (written to a temporary name, then renamed)."""
    data = read_tables()
    entry = data.get(table_key) if isinstance(data.get(table_key), dict) else {}
    merged = {**(entry.get("layers") or {}), **layers}
    data[table_key] = {**about, "tuned": time.strftime("%Y-%m-%d %H:%M"), "layers": merged}
    path = tiles_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    forget_tables()
    return path


_tables: Dict[str, Dict[str, Tile]] = {}  # this process's tuned tiles, by table key then layer text
_chosen: Dict[tuple, Tile] = {}  # the tile of each (layer, device, SM limit, tuned or not) met so far
_tuned_in_use = [True]


@contextlib.contextmanager
def default_tiles_only() -> Iterator[None]:
    """Inside, every layer runs its default tile, tuned or not: what a benchmark compares tuning with.
    (A CUDA graph keeps the tiles it was captured with.)"""
    before = _tuned_in_use[0]
    _tuned_in_use[0] = False
    try:
        yield
    finally:
        _tuned_in_use[0] = before


def tuned_tiles(device: torch.device) -> Tuple[str, Dict[str, Tile]]:
    """``(table key, {layer text: tile})`` for ``device`` at the SMs in use (read once per process)."""
    table_key = gpu_table_key(device, sms_in_use(device))
    tiles = _tables.get(table_key)
    if tiles is None:
        layers = (read_tables().get(table_key) or {}).get("layers") or {}
        tiles = {name: CUDNN if entry["tile"] == CUDNN else {f: entry["tile"][f] for f in TILE_FIELDS}
                 for name, entry in layers.items() if isinstance(entry, dict) and _valid_tile(entry.get("tile"))}
        _tables[table_key] = tiles
    return table_key, tiles


def forget_tables() -> None:
    """Forget the tables this process read (the file is read again on the next use)."""
    _tables.clear()
    _chosen.clear()


def tile_for(key: LayerKey, device: torch.device) -> Tile:
    """The tile to run ``key`` with on ``device``: tuned on this GPU at these SMs, else the default.
    Looked up once per layer, device and SM limit; later calls are one dict lookup."""
    memo = (key, device, active_sms(), _tuned_in_use[0])
    tile = _chosen.get(memo)
    if tile is None:
        tile = tuned_tiles(device)[1].get(key.text()) if device.type == "cuda" and _tuned_in_use[0] else None
        tile = _chosen[memo] = tile or default_for(key)
    return tile


def tuning_state(device: torch.device) -> str:
    """One line on the tiles ``device`` runs with at the SMs in use (doctor, bench, tune)."""
    table_key, tiles = tuned_tiles(device)
    if tiles:
        return f"{len(tiles)} layer shapes tuned for {table_key.split(' | kernel')[0]}"
    return f"default tiles (none tuned for {table_key.split(' | kernel')[0]}: dynprune tune)"


# -- recording a forward pass's convolutions, and timing their tiles -------------------------------

@dataclass
class RecordedCall:
    """One gather convolution of a forward pass: its key and how to run it again with a tile:
    ``run(tile, out)`` returns the output, written into ``out`` by a Triton tile (the
    :data:`CUDNN` form returns a new tensor)."""

    key: LayerKey
    run: Callable[[Tile, torch.Tensor], torch.Tensor]
    out_like: torch.Tensor


_recording: List[Optional[List[RecordedCall]]] = [None]


@contextlib.contextmanager
def record_calls() -> Iterator[List[RecordedCall]]:
    """Every gather convolution run inside the block, with its inputs, in call order."""
    calls: List[RecordedCall] = []
    outer = _recording[0]
    _recording[0] = calls
    try:
        yield calls
    finally:
        _recording[0] = outer


def recorder() -> Optional[List[RecordedCall]]:
    """The list calls are being recorded into, or ``None`` (kernels/gather_conv.py asks)."""
    return _recording[0]


@dataclass
class TunedLayer:
    """A layer's tuning: the tile kept, its GPU time and the default tile's (ms), the candidates
    tried and refused, and how many launches of the layer the recorded calls held."""

    key: LayerKey
    tile: Tile
    ms: float
    default_ms: float
    tried: int
    refused: int
    launches: int = 1

    def as_json(self) -> Dict[str, Any]:
        return {"tile": self.tile, "ms": self.ms, "default_ms": self.default_ms, "tried": self.tried,
                "refused": self.refused, "launches": self.launches, "key": self.key._asdict()}


def tune_calls(calls: List[RecordedCall], timer: Callable[[Callable[[], Any]], float] = graph_ms,
               candidates: Optional[Callable[[LayerKey], List[Tile]]] = None,
               progress: Callable[[str], None] = lambda line: None) -> List[TunedLayer]:
    """The fastest correct tile of every distinct layer among ``calls`` (the first call of a key
    stands for all). A candidate that fails to compile or launch (shared memory, registers) or
    whose output differs from the default tile's is refused. ``candidates``: the tiles to try for
    a layer, the default first (:func:`candidate_tiles`)."""
    candidates = candidates or candidate_tiles
    done: Dict[LayerKey, TunedLayer] = {}
    for call in calls:
        if call.key in done:
            continue
        tiles = candidates(call.key)
        expected = call.run(tiles[0], torch.zeros_like(call.out_like)).float()
        # fp16 outputs of another summation order differ by ~1e-3 of the largest value
        scale = float(expected.nan_to_num(0.0, 0.0, 0.0).abs().max())
        tolerance = (1e-2 if call.out_like.dtype != torch.float32 else 1e-4) * max(1.0, scale)
        times: List[Tuple[float, Tile]] = []
        refused = 0
        for tile in tiles:
            out = torch.zeros_like(call.out_like)
            try:
                got = call.run(tile, out).float()
                if not torch.isclose(got, expected, rtol=0.0, atol=tolerance, equal_nan=True).all():
                    refused += 1
                    log.warning("tile %s of %s: output differs from the default tile's; refused", tile,
                                call.key.text())
                    continue
                times.append((timer(lambda run=call.run, tile=tile, out=out: run(tile, out)), tile))
            except Exception as exc:  # noqa: BLE001 - a tile this GPU cannot hold costs the tile, not the run
                refused += 1
                log.info("tile %s of %s: %s", tile, call.key.text(), f"{type(exc).__name__}: {exc}"[:200])
        if not times:
            raise RuntimeError(f"no tile runs {call.key.text()} correctly, not even the default")
        default_ms = times[0][0] if times[0][1] == tiles[0] else float("nan")
        ms, tile = min(times, key=lambda t: t[0])
        done[call.key] = TunedLayer(call.key, tile, ms, default_ms, len(tiles), refused)
        progress(f"{call.key.text():<58} {default_ms * 1e3:8.1f} us -> {ms * 1e3:8.1f} us  {_tile_text(tile)}")
    for key, launches in Counter(call.key for call in calls).items():
        done[key].launches = launches
    return list(done.values())


def _tile_text(tile: Tile) -> str:
    if is_cudnn(tile):
        return "cuDNN (PyTorch's form)"
    order = "flat loop" if tile["flat"] else "taps unrolled"
    return (f"{tile['block_m']}x{tile['block_n']}x{tile['block_k']} w{tile['num_warps']} s{tile['num_stages']} "
            f"{order}")


def tune_network(forward: Callable[[], Any], device: torch.device, progress: Callable[[str], None] = lambda line: None,
                 timer: Callable[[Callable[[], Any]], float] = graph_ms) -> List[TunedLayer]:
    """Tune the gather convolutions one call of ``forward()`` runs, on ``device`` at the SMs in use,
    and keep the tiles in the cache (``dynprune tune`` for a bundle; the benchmarks for their
    networks)."""
    with record_calls() as calls:
        forward()
    tuned = tune_calls(calls, timer, progress=progress)
    sms = sms_in_use(device)
    write_table(gpu_table_key(device, sms), {t.key.text(): t.as_json() for t in tuned},
                {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device), "sms": sms})
    return tuned
