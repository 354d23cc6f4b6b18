"""Triton gather convolutions against their PyTorch references (TRITON_INTERPRET=1 on the CPU)."""

import os

import pytest
import torch

from dynprune.kernels.reference import (
    build_keep_index,
    gather_conv2d,
    gather_conv2d_padded,
)

triton = pytest.importorskip("triton", reason="Triton is not installed")
ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from dynprune.kernels.gather_conv import gather_conv2d_triton  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def masks_with_counts(b, c, counts, gen):
    """Boolean masks of width ``c`` with exactly ``counts[i]`` kept channels, at random places."""
    m = torch.zeros(b, c, dtype=torch.bool)
    for i, n in enumerate(counts):
        m[i, torch.randperm(c, generator=gen)[:n]] = True
    return m


def check(out, ref, counts, atol, rtol=0.0):
    for i, n in enumerate(counts):
        assert not torch.isnan(out[i, :n]).any(), "an element that must be written was not"
        torch.testing.assert_close(out[i, :n].float().cpu(), ref[i, :n].float().cpu(), atol=atol, rtol=rtol)


CASES = [
    # (C_in, C_out, H, W, k, stride, pad, in_counts, out_counts)
    (12, 10, 7, 9, 3, 1, 1, [5, 12], [9, 1]),
    (12, 10, 7, 9, 3, 2, 1, [0, 3], [10, 4]),  # stride 2, an image with no input channel
    (33, 17, 5, 6, 1, 1, 0, [33, 1], [0, 17]),  # odd sizes, an image with no output channel
    (8, 40, 11, 3, 3, 2, 1, [8, 7], [40, 39]),  # more than one output tile
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("act,with_scale,layout", [("silu", True, "nchw"), (None, False, "nchw"),
                                                   ("silu", True, "nhwc")])
def test_gather_conv_matches_reference(case, act, with_scale, layout):
    c_in, c_out, h, w, k, stride, pad, in_counts, out_counts = case
    g = torch.Generator().manual_seed(sum(case[:5]))
    b = len(in_counts)
    x = torch.randn(b, c_in, h, w, generator=g)
    weight = torch.randn(c_out, c_in, k, k, generator=g)
    bias = torch.randn(c_out, generator=g)
    ii, ic = build_keep_index(masks_with_counts(b, c_in, in_counts, g).float())
    oi, oc = build_keep_index(masks_with_counts(b, c_out, out_counts, g).float())
    scale = torch.rand(b, c_out, generator=g) if with_scale else None
    ref = gather_conv2d_padded(x, weight, bias, ii, ic, oi, oc, stride, pad, act, scale)
    out = torch.full_like(ref, float("nan"), device=DEVICE)
    if layout == "nhwc":  # activations channels_last, weights in each layout the runtime may use
        from dynprune.kernels.gather_conv import with_layout

        x, out = x.contiguous(memory_format=torch.channels_last), out.contiguous(memory_format=torch.channels_last)
        weight = with_layout(weight, ("ohwi", "hwio")[k % 2])
    args = [t.to(DEVICE) if t is not None else None for t in (x, weight, bias, ii, ic, oi, oc)]
    gather_conv2d_triton(*args, stride, pad, act, scale.to(DEVICE) if scale is not None else None, out=out)
    check(out, ref, out_counts, atol=1e-4, rtol=1e-4)
    for i, n in enumerate(out_counts):  # the padding tail is never touched
        assert torch.isnan(out[i, n:]).all()


def group_masks(b, c, run, group_counts, gen):
    """Masks that keep ``group_counts[i]`` whole aligned groups of ``run`` channels, as group gates do."""
    m = torch.zeros(b, c // run, dtype=torch.bool)
    for i, n in enumerate(group_counts):
        m[i, torch.randperm(c // run, generator=gen)[:n]] = True
    return m.repeat_interleave(run, 1)


@pytest.mark.parametrize("run,k,layout", [(8, 3, "ohwi"), (8, 1, "oihw"), (16, 3, "ohwi"), (8, 3, "oihw")])
def test_run_structured_input_lists_match_reference(run, k, layout):
    """``in_run``/``out_run``: kept lists of whole groups, loaded a run at a time; counts 0, 1
    group, some, all; several input and output tiles (block_k and block_n 16); compact output
    (its list in runs too) and full-width output."""
    from dynprune.kernels.gather_conv import with_layout

    g = torch.Generator().manual_seed(run + k)
    c_in, c_out, h, w = 3 * max(run, 16), 2 * max(run, 16), 6, 5
    group_counts = [0, 1, c_in // run // 2, c_in // run]
    b = len(group_counts)
    x = torch.randn(b, c_in, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, k, k, generator=g)
    bias = torch.randn(c_out, generator=g)
    ii, ic = build_keep_index(group_masks(b, c_in, run, group_counts, g).float())
    oi, oc = build_keep_index(group_masks(b, c_out, run, [c_out // run, 1, 0, c_out // run - 1], g).float())
    scale = torch.rand(b, c_out, generator=g)
    dev = [t.to(DEVICE) for t in (x, with_layout(weight, layout), bias, ii, ic, oi, oc)]
    for out_index in (True, False):
        ref = gather_conv2d_padded(x, weight, bias, ii, ic, oi if out_index else None, oc if out_index else None,
                                   1, k // 2, "silu", scale)
        out = torch.full_like(ref, float("nan"), device=DEVICE).contiguous(memory_format=torch.channels_last)
        gather_conv2d_triton(dev[0], dev[1], dev[2], dev[3], dev[4], dev[5] if out_index else None,
                             dev[6] if out_index else None, 1, k // 2, "silu", scale.to(DEVICE), out=out,
                             block_k=16, block_n=16, in_run=run, out_run=run if out_index else 1)
        check(out, ref, oc.tolist() if out_index else [c_out] * b, atol=1e-4, rtol=1e-4)
        for i, n in enumerate(oc.tolist() if out_index else []):  # the padding tail is never touched
            assert torch.isnan(out[i, n:]).all()
    with pytest.raises(ValueError, match="in_run"):
        gather_conv2d_triton(*dev, padding=k // 2, in_run=8, block_k=4)
    with pytest.raises(ValueError, match="out_run"):
        gather_conv2d_triton(*dev[:5], None, None, padding=k // 2, out_run=8)


def test_dense_output_with_residual_epilogue():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 6, 6, generator=g)
    weight = torch.randn(24, 16, 1, 1, generator=g)
    bias = torch.randn(24, generator=g)
    res = torch.randn(2, 24, 6, 6, generator=g)
    ii, ic = build_keep_index(masks_with_counts(2, 16, [4, 0], g).float())
    ref = gather_conv2d_padded(x, weight, bias, ii, ic, None, None, residual=res)
    out = torch.full((2, 24, 6, 6), float("nan"), device=DEVICE)
    gather_conv2d_triton(x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), ii.to(DEVICE), ic.to(DEVICE), None,
                         None, residual=res.to(DEVICE), out=out)
    check(out, ref, [24, 24], atol=1e-4, rtol=1e-4)
    # An image that keeps nothing reduces the block to its shortcut plus the bias.
    torch.testing.assert_close(out[1].cpu(), res[1] + bias.view(-1, 1, 1))


def test_dense_input_compact_output_matches_index_select_path():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 8, 5, 5, generator=g)
    weight = torch.randn(12, 8, 3, 3, generator=g)
    oi, oc = build_keep_index(masks_with_counts(1, 12, [5], g).float())
    out = torch.full((1, 12, 5, 5), float("nan"), device=DEVICE)
    gather_conv2d_triton(x.to(DEVICE), weight.to(DEVICE), None, None, None, oi.to(DEVICE), oc.to(DEVICE),
                         padding=1, out=out)
    ref = gather_conv2d(x, weight, None, None, oi[0, :5].long(), padding=1)
    torch.testing.assert_close(out[0, :5].cpu(), ref[0], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not ON_GPU, reason="fp16 tensor-core path needs a GPU (the interpreter computes in fp32)")
def test_fp16_relative_error():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, 40, 40, generator=g)
    weight = torch.randn(64, 64, 3, 3, generator=g) / 24
    ii, ic = build_keep_index(masks_with_counts(2, 64, [32, 64], g).float())
    oi, oc = build_keep_index(masks_with_counts(2, 64, [32, 17], g).float())
    ref = gather_conv2d_padded(x.double(), weight.double(), None, ii, ic, oi, oc, padding=1)
    out = gather_conv2d_triton(x.half().cuda(), weight.half().cuda(), None, ii.cuda(), ic.cuda(), oi.cuda(),
                               oc.cuda(), padding=1)
    for i, n in enumerate([32, 17]):
        err = (out[i, :n].double().cpu() - ref[i, :n]).norm() / ref[i, :n].norm()
        assert err < 1e-3


@pytest.mark.skipif(not ON_GPU, reason="fp32 on the GPU's matrix units (the interpreter is always fp32)")
def test_fp32_relative_error_is_ieee_level():
    """fp32 must not silently run as TF32 (~3e-4): the fp32 path promises 1e-5."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 96, 20, 20, generator=g)
    weight = torch.randn(80, 96, 3, 3, generator=g) / 30
    ii, ic = build_keep_index(masks_with_counts(1, 96, [71], g).float())
    oi, oc = build_keep_index(masks_with_counts(1, 80, [45], g).float())
    ref = gather_conv2d_padded(x.double(), weight.double(), None, ii, ic, oi, oc, padding=1)
    out = gather_conv2d_triton(x.cuda(), weight.cuda(), None, ii.cuda(), ic.cuda(), oi.cuda(), oc.cuda(), padding=1)
    err = (out[0, :45].double().cpu() - ref[0, :45]).norm() / ref[0, :45].norm()
    assert err < 1e-5


def test_build_keep_index_without_host_sync():
    mask = torch.tensor([[0.0, 0.5, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    index, count = build_keep_index(mask)
    assert count.tolist() == [2, 0, 4] and index.dtype == torch.int32
    assert index[0, :2].tolist() == [1, 3] and index[2].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("group", [1, 8])
def test_triton_engine_equals_the_compiled_cpu_engine(group, monkeypatch):
    """The whole dynamic detector through the Triton blocks equals the compiled CPU blocks; with
    group-8 gates the blocks read kept lists a run of 8 at a time (``in_run``)."""
    from dynprune.compact import CompactDetector
    from dynprune.kernels import gather_conv
    from dynprune.model import build_detector
    from tests.conftest import random_gates, randomize_bn, tiny_config

    torch.manual_seed(0)
    model = build_detector(tiny_config(widths=(8, 16, 24, 16)))
    randomize_bn(model)
    model.add_gates(group=group)
    model.eval()
    random_gates(model, 0)
    runs = []
    launch = gather_conv.gather_conv2d_triton
    monkeypatch.setattr(gather_conv, "gather_conv2d_triton", lambda *a, **kw: runs.append(kw.get("in_run", 1))
                        or launch(*a, **kw))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = CompactDetector(model, backend="cpu")(x)
        tri = CompactDetector(model, backend="triton", device=DEVICE)
        assert tri.backend == "triton", tri.backend_reason
        out = tri.to(DEVICE)(x.to(DEVICE))
    assert set(runs) == ({1} if group == 1 else {1, 8})
    torch.testing.assert_close(out[0].cpu(), ref[0], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out[1].cpu(), ref[1], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_dynamic_forward_captures_in_one_cuda_graph_and_replays_new_kept_sets():
    from dynprune.compact import CompactDetector
    from dynprune.gates import Gate
    from dynprune.model import build_detector
    from tests.conftest import random_gates, randomize_bn, tiny_config

    torch.manual_seed(0)
    model = build_detector(tiny_config(widths=(8, 16, 24, 16)))
    randomize_bn(model)
    model.add_gates()
    model.eval()
    random_gates(model, 1, empty_every=100)
    for gate in model.modules():  # gates that react strongly to the frame (checked on the CPU path:
        if isinstance(gate, Gate):  # these four frames give two different kept sets)
            gate.fc1.weight.data.normal_(0, 1.0)
    eng = CompactDetector(model, backend="triton", device="cuda").cuda()
    static_x = torch.rand(1, 3, 64, 64, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            eng(static_x)  # warm-up compiles the kernels
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = eng(static_x)
            static_kept = eng.kept_counts()
        kept_sets = set()
        for seed in range(4):
            frame = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * (seed + 1) / 4
            static_x.copy_(frame.cuda())
            graph.replay()
            ref = CompactDetector(model, backend="cpu")(frame)
            torch.testing.assert_close(static_out[1].cpu(), ref[1], atol=1e-3, rtol=1e-3)
            kept_sets.add(tuple(static_kept.flatten().tolist()))
        assert len(kept_sets) > 1  # different frames, different kept sets, same graph


def _gate_pair(c_in, ch1, ch2, group, mode, seed):
    from dynprune.gates import Gate

    torch.manual_seed(seed)
    gates = [Gate(c_in, ch1, group=group), Gate(c_in, ch2, group=group)]
    for g in gates:
        torch.nn.init.normal_(g.fc1.weight, std=0.5)
        torch.nn.init.normal_(g.fc2.weight, std=0.5)
        torch.nn.init.normal_(g.fc2.bias, std=0.5)  # some saliencies ReLU to exactly 0
        g.mode, g.keep_ratio = mode, 0.4
    return gates


@pytest.mark.parametrize("mode", ["threshold", "topk", "open"])
@pytest.mark.parametrize("group", [1, 8])
def test_block_gates_kernel_matches_the_pytorch_gates(mode, group):
    from dynprune.kernels.gate_index import block_gates_triton
    from dynprune.kernels.reference import gate_keep_index

    gates = _gate_pair(c_in=19, ch1=21, ch2=40, group=group, mode=mode, seed=group)
    pooled = torch.rand(3, 19)
    pooled[2] *= 4  # a different frame statistic, a different kept set
    with torch.no_grad():
        for g in gates:  # a threshold halfway between two saliencies actually produced, so that
            # rounding differences of the two MLPs (well below the gap) cannot flip a decision
            values = g.group_saliency(pooled).flatten().unique()
            mid = len(values) // 2
            g.threshold.fill_(float(values[mid - 1] + values[mid]) / 2)
        dev = [g.to(DEVICE) for g in gates]
        i1, s1, i2, s2, counts = block_gates_triton(pooled.to(DEVICE), *dev, torch.float32)
        for gate, index, scale, count in ((gates[0], i1, s1, counts[0]), (gates[1], i2, s2, counts[1])):
            ref_index, ref_count, ref_scale = gate_keep_index(pooled, gate.cpu())
            assert count.cpu().tolist() == ref_count.tolist()
            assert torch.equal(index.cpu(), ref_index)  # kept first, then dropped, each ascending
            torch.testing.assert_close(scale.cpu(), ref_scale, atol=1e-6, rtol=1e-5)
    if mode != "open":
        assert 0 < int(counts.sum()) < 3 * (21 + 40)


def test_block_gates_kernel_with_no_kept_channel():
    from dynprune.kernels.gate_index import block_gates_triton

    gates = _gate_pair(c_in=8, ch1=16, ch2=12, group=1, mode="threshold", seed=0)
    for g in gates:
        g.threshold.fill_(1e9)
    with torch.no_grad():
        i1, s1, i2, s2, counts = block_gates_triton(torch.rand(2, 8, device=DEVICE), *[g.to(DEVICE) for g in gates],
                                                    torch.float32)
    assert counts.cpu().tolist() == [[0, 0], [0, 0]]
    assert torch.equal(i1.cpu(), torch.arange(16, dtype=torch.int32).expand(2, 16))
    assert not s1.any() and not s2.any()


@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("layout,h,w", [("nhwc", 7, 9), ("nchw", 5, 4), ("nhwc", 1, 1)])
def test_pool_and_gates_in_one_kernel_match_pool_then_gates(mode, layout, h, w, monkeypatch):
    """The fused pool (several programs per image adding into one sum, the last one running the
    gates) equals the pool followed by the gates' kernel, call after call on one workspace."""
    import dynprune.kernels.gate_index as gate_index

    monkeypatch.setattr(gate_index, "POOL_TILE", 64)  # 32 channels: tiles of 2 pixels,
    monkeypatch.setattr(gate_index, "POOL_PROGRAMS", 5)  # each program summing several of them
    gates = _gate_pair(c_in=19, ch1=21, ch2=40, group=8, mode=mode, seed=3)
    dev = [g.to(DEVICE) for g in gates]
    workspace = gate_index.pool_workspace(3, 19, DEVICE)
    with torch.no_grad():
        for call in range(2):  # the second call reuses the workspace the first left behind
            x = torch.rand(3, 19, h, w, generator=torch.Generator().manual_seed(call))
            x = (x * torch.tensor([1.0, 2.0, 6.0])[:, None, None, None]).to(DEVICE)  # three kept sets
            if layout == "nhwc":
                x = x.contiguous(memory_format=torch.channels_last)
            pooled = x.double().mean((2, 3)).float()
            for g in dev:  # a threshold halfway between two saliencies (see the test above)
                values = g.group_saliency(pooled).flatten().unique()
                g.threshold.fill_(float(values[len(values) // 2 - 1] + values[len(values) // 2]) / 2)
            fused = gate_index.pooled_block_gates_triton(x, *dev, torch.float32, workspace)
            apart = gate_index.block_gates_triton(pooled, *dev, torch.float32)
            for a, b in zip(fused, apart):
                torch.testing.assert_close(a.cpu(), b.cpu(), atol=1e-6, rtol=1e-5)
            assert not workspace[0].any() and not workspace[1].any(), "the kernel must leave its workspace at zero"
    with pytest.raises(ValueError, match="pool_workspace"):
        gate_index.pooled_block_gates_triton(x[:2], *dev, torch.float32, workspace)

