"""The compiled CPU runtime (kernels/cpu_gate.c): its gate step and whole blocks against the NumPy
and PyTorch references, on any thread count, in its portable and serial builds, under the
sanitizers, and its fallback without a compiler. Runs whether Triton is installed or not."""

import pytest
import torch


def _threshold_block(c, h1, h2, *, group, threshold, bias_low, seed, weight_std=None, pad_to=(4, 8)):
    """A CompactBottleneck of a freshly gated Bottleneck with threshold gates: fc2 bias drawn
    from ``[bias_low, 1)``, fc2 weights from N(0, ``weight_std``) where given, one threshold."""
    from dynprune.compact import CompactBottleneck
    from dynprune.gates import set_gate_mode
    from dynprune.layers import Bottleneck

    torch.manual_seed(seed)
    block = Bottleneck(c, h1, h2).eval()
    block.add_gates(group=group)
    set_gate_mode(block, "threshold")
    for gate in (block.gate1, block.gate2):
        if weight_std is not None:
            gate.fc2.weight.data.normal_(0, weight_std)
        gate.fc2.bias.data.uniform_(bias_low, 1.0)
        gate.threshold.fill_(threshold)
    return CompactBottleneck(block, pad_to=pad_to)


@pytest.mark.parametrize("group", [1, 8])
@pytest.mark.parametrize("threshold", [0.0, 0.6, 1e9])
@pytest.mark.parametrize("h1, h2, pad_to", [(36, 20, (4, 8)), (32, 24, (16, 8))])
def test_cpu_gate_step_equals_the_numpy_reference(group, threshold, h1, h2, pad_to):
    import numpy as np

    from tests.conftest import require_native_gate_step

    require_native_gate_step()
    # h1 = 36: widths that are not multiples of the group or of 8; h1 = 32 with group 8: whole
    # runs of 8 in gate 1's list, then padding slots (copies of its first channel)
    blk = _threshold_block(24, h1, h2, group=group, threshold=threshold, bias_low=0.0, seed=group, weight_std=1.0,
                           pad_to=pad_to)
    x = torch.rand(1, 24, 6, 10).contiguous(memory_format=torch.channels_last)
    pixels = x.numpy().transpose(0, 2, 3, 1).reshape(1, 60, 24)
    p = blk.np
    native = blk._native
    assert native is not None
    kept1, kept2, slots1, slots2 = native(torch.from_numpy(pixels[0]).data_ptr(), 60)

    saliency, keep = blk.saliency(blk.pool_pixels(pixels))
    index, scale, ref_slots1, ref_kept1, ref_kept2 = blk._plan(keep[0], saliency[0])
    assert (kept1, kept2, slots1, slots1 + slots2) == (ref_kept1, ref_kept2, ref_slots1, index.size)
    np.testing.assert_allclose(native.saliency, saliency[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(native.index[: index.size], index)
    # (saliencies agree to float rounding: C and BLAS sum in different orders)
    np.testing.assert_allclose(native.scale[: index.size], scale, rtol=1e-5, atol=1e-6)
    rows = p["rows"].take(index, axis=0)
    rows[slots1:, :24] *= scale[slots1:, None]
    np.testing.assert_allclose(native.rows_out[: index.size], rows, rtol=1e-5, atol=1e-6)
    if kept1 and kept2:
        ref_w2 = blk.gather_w2(index[slots1:] - blk.h1, index[:slots1], scale[:slots1])
        got_w2 = torch.from_numpy(native.w2(slots1, slots2)).permute(0, 3, 1, 2)
        torch.testing.assert_close(got_w2, ref_w2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 8])
def test_cpu_gate_step_large_inputs_are_the_same_on_any_thread_count(group):
    """Inputs large enough for the parallel pool and W2 gather (where the library is built with
    OpenMP), after a smaller one (the pool's scratch grows): the same result with one thread or
    two, and the NumPy reference's to float rounding."""
    import numpy as np

    from tests.conftest import require_native_gate_step

    require_native_gate_step()
    # threshold 0 keeps every positive saliency: a W2 gather of ~128x9x128
    blk = _threshold_block(64, 128, 128, group=group, threshold=0.0, bias_low=0.5, seed=3)
    small = torch.rand(1, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    x = torch.rand(1, 64, 32, 40).contiguous(memory_format=torch.channels_last)  # 1280 x 64 values
    pixels = x.numpy().transpose(0, 2, 3, 1).reshape(1, 1280, 64)
    _ = blk.np
    native = blk._native
    native(small.data_ptr(), 16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            counts = native(x.data_ptr(), 1280)
            results.append((counts, native.saliency.copy(), native.w2(*counts[2:]).copy()))
    finally:
        torch.set_num_threads(threads)
    (counts, saliency, w2), (counts_2, saliency_2, w2_2) = results
    assert counts == counts_2 and counts[2] * counts[3] * 9 >= 1 << 15
    np.testing.assert_array_equal(saliency, saliency_2)
    np.testing.assert_array_equal(w2, w2_2)
    ref_saliency, keep = blk.saliency(blk.pool_pixels(pixels))
    np.testing.assert_allclose(saliency, ref_saliency[0], rtol=1e-5, atol=1e-6)
    index, scale, slots1, kept1, kept2 = blk._plan(keep[0], ref_saliency[0])
    assert counts[:3] == (kept1, kept2, slots1)
    ref_w2 = blk.gather_w2(index[slots1:] - blk.h1, index[:slots1], scale[:slots1])
    torch.testing.assert_close(torch.from_numpy(w2).permute(0, 3, 1, 2), ref_w2, atol=1e-6, rtol=1e-5)


def test_cpu_gate_step_builds_serial_when_asked(monkeypatch, tmp_path):
    from dynprune.kernels import cpu_gate
    from tests.conftest import require_native_gate_step

    require_native_gate_step()
    monkeypatch.setattr(cpu_gate, "_tried", False)
    monkeypatch.setattr(cpu_gate, "_library", None)
    monkeypatch.setenv("DYNPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DYNPRUNE_NATIVE_OPENMP", "0")
    assert not cpu_gate.shares_torch_openmp()
    lib = cpu_gate.native_library()
    assert lib is not None and not lib.openmp and len(list(tmp_path.glob("*.so"))) == 1


def _fused_and_plain(c=64, hidden=96, seed=5):
    """A gated block twice: the fused compiled call and the compiled step with PyTorch's products."""
    import copy

    blk = _threshold_block(c, hidden, hidden, group=8, threshold=0.6, bias_low=0.2, seed=seed)
    plain = copy.deepcopy(blk)
    plain.fused = False
    return blk, plain


def test_fused_block_is_the_same_on_any_thread_count():
    """Each tile of the fused block sums in a fixed order whichever thread runs it: one thread and
    two give the same bits."""
    import numpy as np

    from tests.conftest import require_native_gate_step

    require_native_gate_step()
    blk, _ = _fused_and_plain()
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


def test_fused_block_portable_build(monkeypatch, tmp_path):
    """DYNPRUNE_NATIVE_ARCH=0 builds without -march=native (a cache shared by unlike CPUs): the
    fused block then runs on the baseline vector width, with the same results."""
    from dynprune.kernels import cpu_gate
    from tests.conftest import require_native_gate_step

    require_native_gate_step()
    native_lib = cpu_gate.native_library()
    monkeypatch.setattr(cpu_gate, "_tried", False)
    monkeypatch.setattr(cpu_gate, "_library", None)
    monkeypatch.setenv("DYNPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DYNPRUNE_NATIVE_ARCH", "0")
    lib = cpu_gate.native_library()
    assert lib is not None and not lib.native and len(list(tmp_path.glob("*.so"))) == 1
    assert int(lib.dp_vector_floats()) <= int(native_lib.dp_vector_floats())
    blk, plain = _fused_and_plain(c=40, hidden=72)
    for size in ((7, 9), (16, 16)):
        x = (torch.randn(1, 40, *size) * 2).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(blk(x), plain(x), atol=1e-4, rtol=1e-4)
    assert blk._counts and blk._native.vector_floats == int(lib.dp_vector_floats())


_ASAN_SCRIPT = """
import torch
from dynprune.kernels import cpu_gate
cpu_gate.CFLAGS = cpu_gate.CFLAGS + ("-fsanitize=address,undefined", "-fno-omit-frame-pointer")
assert cpu_gate.native_library() is not None
from dynprune.compact import CompactBottleneck
from dynprune.fusion import FoldedBottleneck, fuse_conv_bn, pointwise_as_matmul
from tests.conftest import ODD_BLOCK_SHAPES, input_sensitive_block

torch.manual_seed(0)
for c, h1, h2, group, size in ODD_BLOCK_SHAPES:
    block, plain = input_sensitive_block(c, h1, h2, group)
    dense = pointwise_as_matmul(fuse_conv_bn(torch.nn.Sequential(FoldedBottleneck(plain))))[0]
    fused = CompactBottleneck(block)
    with torch.no_grad():
        for _ in range(8):  # the dense block tries both forms on its first frames
            x = (torch.randn(1, c, *size) * 2).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(fused(x), block(x), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(dense(x), plain(x), atol=1e-4, rtol=1e-4)
    assert fused._counts and dense._plan
print("clean")
"""


def test_compiled_blocks_under_address_sanitizer(tmp_path):
    """The fused and dense compiled blocks read whole vectors past their rows' ends (into the
    buffers' slack): built with AddressSanitizer and UBSan, on shapes whose widths and rows
    are no multiple of a tile, no read or write leaves its buffer."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import require_native_gate_step

    require_native_gate_step()
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
    from dynprune.kernels.cpu_gate import _GOMP_FILE

    assert _GOMP_FILE.search("7f00-7f10 r-xp 0 08:01 12 /venv/torch/lib/libgomp.so.1\n")
    assert _GOMP_FILE.search("7f00-7f10 r-xp 0 08:01 12 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0\n")
    assert not _GOMP_FILE.search("7f00-7f10 r-xp 0 08:01 12 /venv/torch.libs/libgomp-a34b3233.so.1\n")
    assert not _GOMP_FILE.search("7f00-7f10 r-xp 0 08:01 12 /opt/intel/libiomp5.so\n")


def test_cpu_gate_step_falls_back_to_numpy_without_a_compiler(monkeypatch, tmp_path, caplog):
    from dynprune.kernels import cpu_gate

    monkeypatch.setattr(cpu_gate, "_tried", False)
    monkeypatch.setattr(cpu_gate, "_library", None)
    monkeypatch.setenv("DYNPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-dynprune")
    with caplog.at_level("WARNING"):
        assert cpu_gate.native_library() is None
    assert "no C compiler" in caplog.text and "NumPy" in caplog.text
    # a compiler that fails: the same fallback, with the command in the message, and no library
    monkeypatch.setattr(cpu_gate, "_tried", False)
    monkeypatch.setenv("CC", "false")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert cpu_gate.native_library() is None
    assert "could not build" in caplog.text and list(tmp_path.glob("*.so")) == []
    monkeypatch.setattr(cpu_gate, "_tried", False)
    monkeypatch.setenv("DYNPRUNE_NATIVE", "0")
    assert cpu_gate.native_library() is None
