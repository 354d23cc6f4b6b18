"""The compiled CPU backend (kernels/cpu_blocks.c) beyond the shared contract of
tests/test_backends.py: large inputs on any thread count, its portable and serial builds, the
sanitizers, and the reference backend where no compiler works. Runs whether Triton is installed
or not."""

import pytest
import torch


def _threshold_block(c, h1, h2, *, group, threshold, bias_low, seed, weight_std=None):
    """A gated block (BN as initialised; fc2 weights too unless ``weight_std`` is given) and its
    compiled CPU block."""
    from dynprune.kernels.cpu_blocks import CompiledCpuBlock
    from tests.conftest import threshold_block

    block = threshold_block(c, h1, h2, group, threshold, seed, bias_low=bias_low, weight_std=weight_std,
                            randomize=False)
    return block, CompiledCpuBlock(block)


@pytest.mark.parametrize("group", [1, 8])
def test_compiled_block_large_inputs_are_the_same_on_any_thread_count(group):
    """Inputs large enough for the parallel pool, gathers and products (where the library is built
    with OpenMP), after a smaller one (the scratch grows): the same bits with one thread or two,
    and the reference backend's result to float rounding."""
    import numpy as np

    from dynprune.kernels.reference import ReferenceBlock
    from tests.conftest import require_compiled_blocks

    require_compiled_blocks()
    # threshold 0 keeps every positive saliency: gathers of ~128x9x128
    block, compiled = _threshold_block(64, 128, 128, group=group, threshold=0.0, bias_low=0.5, seed=3)
    small = torch.rand(1, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    x = torch.rand(1, 64, 32, 40).contiguous(memory_format=torch.channels_last)  # 1280 x 64 values
    threads = torch.get_num_threads()
    outs = []
    with torch.no_grad():
        compiled(small)
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                outs.append(compiled(x).numpy().copy())
        finally:
            torch.set_num_threads(threads)
        ref = ReferenceBlock(block)(x)
    counts = compiled.kernel.counts.tolist()
    assert counts[2] * counts[3] * 9 >= 1 << 15
    np.testing.assert_array_equal(outs[0], outs[1])
    torch.testing.assert_close(torch.from_numpy(outs[0]), ref, atol=1e-4, rtol=1e-4)


def test_compiled_blocks_build_serial_when_asked(monkeypatch, tmp_path):
    from dynprune.kernels import cpu_blocks
    from tests.conftest import require_compiled_blocks

    require_compiled_blocks()
    monkeypatch.setattr(cpu_blocks, "_tried", False)
    monkeypatch.setattr(cpu_blocks, "_library", None)
    monkeypatch.setenv("DYNPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DYNPRUNE_COMPILED_OPENMP", "0")
    assert not cpu_blocks.shares_torch_openmp()
    lib = cpu_blocks.compiled_library()
    assert lib is not None and not lib.openmp and len(list(tmp_path.glob("*.so"))) == 1


def _compiled_and_reference(c=64, hidden=96, seed=5):
    """A gated block on the compiled backend and on the reference backend."""
    from dynprune.kernels.reference import ReferenceBlock

    block, compiled = _threshold_block(c, hidden, hidden, group=8, threshold=0.6, bias_low=0.2, seed=seed)
    return compiled, ReferenceBlock(block)


def test_compiled_block_is_the_same_on_any_thread_count():
    """Each tile of the compiled block sums in a fixed order whichever thread runs it: one thread and
    two give the same bits."""
    import numpy as np

    from tests.conftest import require_compiled_blocks

    require_compiled_blocks()
    blk, _ = _compiled_and_reference()
    x = torch.rand(1, 64, 20, 30).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(blk(x).numpy().copy())
    finally:
        torch.set_num_threads(threads)
    assert blk._counts
    np.testing.assert_array_equal(outs[0], outs[1])


def test_compiled_block_portable_build(monkeypatch, tmp_path):
    """DYNPRUNE_NATIVE_ARCH=0 builds without -march=native (a cache shared by unlike CPUs): the
    compiled block then runs on the baseline vector width, with the same results."""
    from dynprune.kernels import cpu_blocks
    from tests.conftest import require_compiled_blocks

    require_compiled_blocks()
    native_lib = cpu_blocks.compiled_library()
    monkeypatch.setattr(cpu_blocks, "_tried", False)
    monkeypatch.setattr(cpu_blocks, "_library", None)
    monkeypatch.setenv("DYNPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DYNPRUNE_NATIVE_ARCH", "0")
    lib = cpu_blocks.compiled_library()
    assert lib is not None and not lib.for_this_cpu and len(list(tmp_path.glob("*.so"))) == 1
    assert int(lib.dp_vector_floats()) <= int(native_lib.dp_vector_floats())
    blk, plain = _compiled_and_reference(c=40, hidden=72)
    for size in ((7, 9), (16, 16)):
        x = (torch.randn(1, 40, *size) * 2).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(blk(x), plain(x), atol=1e-4, rtol=1e-4)
    assert blk._counts and blk.kernel.vector_floats == int(lib.dp_vector_floats())


_ASAN_SCRIPT = """
import torch
from dynprune.kernels import cpu_blocks
cpu_blocks.CFLAGS = cpu_blocks.CFLAGS + ("-fsanitize=address,undefined", "-fno-omit-frame-pointer")
assert cpu_blocks.compiled_library() is not None
from dynprune.kernels.cpu_blocks import CompiledCpuBlock
from dynprune.fusion import FoldedBottleneck, fuse_conv_bn, pointwise_as_matmul
from tests.conftest import ODD_BLOCK_SHAPES, input_sensitive_block

torch.manual_seed(0)
for c, h1, h2, group, size in ODD_BLOCK_SHAPES:
    block, plain = input_sensitive_block(c, h1, h2, group)
    dense = pointwise_as_matmul(fuse_conv_bn(torch.nn.Sequential(FoldedBottleneck(plain))))[0]
    compiled = CompiledCpuBlock(block)
    with torch.no_grad():
        for _ in range(8):  # the dense block tries both forms on its first frames
            x = (torch.randn(1, c, *size) * 2).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(compiled(x), block(x), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(dense(x), plain(x), atol=1e-4, rtol=1e-4)
    assert compiled._counts and dense._kernel
print("clean")
"""


def test_compiled_blocks_under_address_sanitizer(tmp_path):
    """The gated and dense compiled blocks read whole vectors past their rows' ends (into the
    buffers' slack): built with AddressSanitizer and UBSan, on shapes whose widths and rows
    are no multiple of a tile, no read or write leaves its buffer."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import require_compiled_blocks

    require_compiled_blocks()
    compiler = os.environ.get("CC") or "cc"
    runtimes = []
    for name in ("libasan.so", "libubsan.so"):
        found = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(found) or not os.path.exists(found):
            pytest.skip(f"{compiler} has no {name}")
        runtimes.append(found)
    if shutil.which(compiler) is None:
        pytest.skip("no C compiler")
    env = dict(os.environ, DYNPRUNE_CACHE_DIR=str(tmp_path), LD_PRELOAD=":".join(runtimes),
               ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, "-c", _ASAN_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-4000:]
    assert "runtime error" not in done.stderr, done.stderr[-4000:]


def test_openmp_runtime_is_recognised_by_its_file_name():
    """Only GNU OpenMP under its soname counts: a renamed copy (auditwheel's libgomp-<hash>.so.1)
    would be a second runtime beside the build's libgomp.so.1."""
    from dynprune.kernels.cpu_blocks import _GOMP_FILE

    assert _GOMP_FILE.search("7f00-7f10 r-xp 0 08:01 12 /venv/torch/lib/libgomp.so.1\n")
    assert _GOMP_FILE.search("7f00-7f10 r-xp 0 08:01 12 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0\n")
    assert not _GOMP_FILE.search("7f00-7f10 r-xp 0 08:01 12 /venv/torch.libs/libgomp-a34b3233.so.1\n")
    assert not _GOMP_FILE.search("7f00-7f10 r-xp 0 08:01 12 /opt/intel/libiomp5.so\n")


def test_without_a_compiler_gated_blocks_fall_back_to_the_reference(monkeypatch, tmp_path, caplog):
    from dynprune.kernels import cpu_blocks

    monkeypatch.setattr(cpu_blocks, "_tried", False)
    monkeypatch.setattr(cpu_blocks, "_library", None)
    monkeypatch.setenv("DYNPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-dynprune")
    with caplog.at_level("WARNING"):
        assert cpu_blocks.compiled_library() is None
    assert "no C compiler" in caplog.text and "reference backend" in caplog.text
    # a compiler that fails: the same fallback, with the command in the message, and no library
    monkeypatch.setattr(cpu_blocks, "_tried", False)
    monkeypatch.setenv("CC", "false")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert cpu_blocks.compiled_library() is None
    assert "could not build" in caplog.text and list(tmp_path.glob("*.so")) == []
    monkeypatch.setattr(cpu_blocks, "_tried", False)
    monkeypatch.setenv("DYNPRUNE_COMPILED", "0")
    assert cpu_blocks.compiled_library() is None
