"""The compiled CPU blocks built for ARM (aarch64: the NEON tiles a Jetson runs) and run without an
ARM machine: kernels/cpu_blocks.c is cross-compiled with tests/cpu_blocks_harness.c and run under
qemu user-mode emulation, on the tables kernels/cpu_blocks.py lays out here, against the reference
backend computed here. The same harness also runs natively, so that a failure on ARM is the ARM
build's and not the harness's.

Needs Debian's ``gcc-aarch64-linux-gnu`` and ``qemu-user`` (``apt-get install gcc-aarch64-linux-gnu
qemu-user``; .ci/run installs them where it can). Without them the ARM cases skip and say so.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dynprune.kernels.cpu_blocks import SOURCE, CompiledCpuBlock, DenseBlockKernel
from dynprune.kernels.reference import ReferenceBlock
from tests.conftest import ODD_BLOCK_SHAPES, input_sensitive_block, require_compiled_blocks, threshold_block

HARNESS = Path(__file__).with_name("cpu_blocks_harness.c")
CROSS_CC = os.environ.get("DYNPRUNE_AARCH64_CC", "aarch64-linux-gnu-gcc")
QEMU = "qemu-aarch64"
FLAGS = ("-O3", "-std=c99", "-ffp-contract=fast")

#: the builds run: (name, compiler, extra flags, runner). The ARM builds: the architecture's
#: baseline (ARMv8-A, which every aarch64 CPU runs), Orin's CPU (what -march=native gives on the
#: board), and the OpenMP build the runtime makes where PyTorch runs on GNU OpenMP.
BUILDS = {
    "native": ("cc", ("-fopenmp",), ()),
    "aarch64": (CROSS_CC, ("-static",), (QEMU,)),
    "aarch64-orin": (CROSS_CC, ("-static", "-mcpu=cortex-a78ae", "-DDP_NATIVE"), (QEMU,)),
    "aarch64-openmp": (CROSS_CC, ("-static", "-fopenmp"), (QEMU,)),
}


def _missing(build: str) -> str | None:
    compiler, _, runner = BUILDS[build]
    needed = [(compiler, "gcc-aarch64-linux-gnu" if runner else "gcc")] + [(r, "qemu-user") for r in runner]
    for tool, package in needed:
        if shutil.which(os.environ.get("CC", tool) if tool == "cc" else tool) is None:
            return f"{tool} not found (apt-get install {package})"
    return None


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """``build name -> path of the built harness`` (built once per module and build)."""
    built = {}
    folder = tmp_path_factory.mktemp("harness")

    def get(build: str) -> Path:
        why = _missing(build)
        if why is not None:
            pytest.skip(f"the {build} build cannot run here: {why}")
        if build not in built:
            compiler, flags, _ = BUILDS[build]
            compiler = os.environ.get("CC", compiler) if compiler == "cc" else compiler
            target = folder / build
            cmd = [compiler, *FLAGS, *flags, "-I", str(SOURCE.parent), str(HARNESS), "-o", str(target), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"
            built[build] = target
        return built[build]

    return get


def write_case(path: Path, kernel, dense, pixels: np.ndarray) -> None:
    """The case file tests/cpu_blocks_harness.c reads (its header comment is the format)."""
    b = kernel._block
    images, height, width, _ = pixels.shape
    head = [b.c, b.h1, b.h2, b.hid1, b.hid2, b.g1, b.g2, b.group1, b.group2, b.pad_to1, b.pad_to2,
            height, width, images, int(dense is not None), 0]
    tables = list(kernel.tables().values()) + (list(dense.tables().values()) if dense is not None else [])
    with open(path, "wb") as f:
        f.write(b"DPCASE01" + struct.pack("<16q", *head))
        for array in tables + [pixels]:
            flat = np.ascontiguousarray(array, dtype="<f4").ravel()
            f.write(struct.pack("<q", flat.size) + flat.tobytes())


def run_case(binary: Path, build: str, case: Path, images: int, hw: int, c: int, dense: bool):
    """(records (images, 6), block outputs (images, hw, c), dense outputs or None) of one run."""
    out = case.with_suffix(f".{build}.out")
    runner = BUILDS[build][2]
    done = subprocess.run([*runner, str(binary), str(case), str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, f"{build} harness failed: {done.stderr}"
    raw = out.read_bytes()
    step = 6 * 8 + hw * c * 4
    records, outputs = [], []
    for i in range(images):
        chunk = raw[i * step : (i + 1) * step]
        records.append(np.frombuffer(chunk[:48], "<i8"))
        outputs.append(np.frombuffer(chunk[48:], "<f4").reshape(hw, c))
    dense_out = None
    if dense:
        rest = raw[images * step :]
        dstep = 8 + hw * c * 4
        assert all(np.frombuffer(rest[i * dstep : i * dstep + 8], "<i8")[0] == 0 for i in range(images))
        dense_out = np.stack([np.frombuffer(rest[i * dstep + 8 : (i + 1) * dstep], "<f4").reshape(hw, c)
                              for i in range(images)])
    return np.stack(records), np.stack(outputs), dense_out


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _case(tmp_path, block, plain, x, pad_to=(4, 8)):
    """Writes the case of ``block`` (and ``plain``, its un-gated twin, or None) on images ``x``;
    returns (case path, reference block outputs, reference kept counts, dense reference)."""
    require_compiled_blocks()
    from dynprune.kernels.cpu_blocks import compiled_library

    compact = CompiledCpuBlock(block, pad_to=pad_to).eval()
    reference = ReferenceBlock(block).eval()
    dense = None
    if plain is not None:
        r = reference
        dense = DenseBlockKernel(compiled_library(), w1=r.w1.view(r.h1, r.c).numpy(), b1=r.b1.numpy(),
                                 w2=r.w2.numpy(), b2=r.b2.numpy(), w3=r.w3.view(r.c, r.h2).numpy(),
                                 b3=r.b3.numpy())
    with torch.no_grad():
        outs, kept = [], []
        for i in range(x.shape[0]):  # one image at a time, as the harness runs them
            outs.append(_nhwc(reference(x[i : i + 1]))[0])
            kept.append(np.asarray(reference.last_kept)[0])
        dense_ref = _nhwc(plain(x)) if plain is not None else None
    case = tmp_path / "case.bin"
    write_case(case, compact.kernel, dense, _nhwc(x))
    return case, np.stack(outs), np.stack(kept), dense_ref


ARM_BUILDS = ["aarch64", "aarch64-orin", "aarch64-openmp"]
# (the tolerance: the builds add in another order than PyTorch's products, and the 3x-scaled images
# reach outputs of a few units)


@pytest.mark.parametrize("build", ["native", *ARM_BUILDS])
@pytest.mark.parametrize("c,h1,h2,group,size", ODD_BLOCK_SHAPES)
def test_the_built_blocks_equal_the_reference_on_odd_shapes(harness, tmp_path, build, c, h1, h2, group, size):
    """Widths that are no multiple of a vector (the tiles' partial vectors), rows that are no
    multiple of a tile (the scalar edges), maps down to one pixel, groups of 1, 8 and 16; images
    whose kept sets differ, the first one twice (the second reuses its gather); and the un-gated block."""
    torch.manual_seed(c + h1)
    block, plain = input_sensitive_block(c, h1, h2, group)
    x = torch.randn(3, c, *size) * torch.tensor([0.3, 1.0, 3.0]).view(3, 1, 1, 1)
    x = torch.cat([x[:1], x])
    case, ref, kept, dense_ref = _case(tmp_path, block, plain, x)
    records, outs, dense_out = run_case(harness(build), build, case, 4, size[0] * size[1], c, dense=True)
    assert (records[:, 0] == 0).all()
    assert records[:, 1:3].tolist() == kept.tolist()
    np.testing.assert_allclose(outs.reshape(ref.shape), ref, atol=5e-4, rtol=1e-3)
    np.testing.assert_allclose(dense_out.reshape(dense_ref.shape), dense_ref, atol=5e-4, rtol=1e-3)
    if records[0, 3] and records[0, 4]:  # (a gate that keeps nothing gathers nothing)
        assert records[1, 5] == 1, "the repeated image should reuse the first one's gather"


@pytest.mark.parametrize("build", ["native", *ARM_BUILDS])
@pytest.mark.parametrize("threshold, kept", [(1e9, "none"), (0.0, "all positive"), (0.6, "some")])
def test_the_built_blocks_keep_empty_full_and_partial_sets(harness, tmp_path, build, threshold, kept):
    """A gate that keeps nothing (the block's constant row), everything, or part, in groups of 8
    on widths that are no multiple of 8."""
    block = threshold_block(24, 37, 19, 8, threshold, seed=8)
    x = torch.randn(2, 24, 6, 7)
    case, ref, counts, _ = _case(tmp_path, block, None, x)
    records, outs, _ = run_case(harness(build), build, case, 2, 42, 24, dense=False)
    assert records[:, 1:3].tolist() == counts.tolist()
    if kept == "none":
        assert counts.tolist() == [[0, 0], [0, 0]]
    np.testing.assert_allclose(outs.reshape(ref.shape), ref, atol=5e-4, rtol=1e-3)


def test_the_harness_refuses_a_file_that_is_no_case(harness, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a case")
    done = subprocess.run([str(harness("native")), str(bad), str(tmp_path / "o")], capture_output=True, text=True)
    assert done.returncode == 2 and "not a case file" in done.stderr
