"""The execution contract of a gated block (kernels/block.py): every backend against the masked
dense block and against the reference backend, on the same cases, and the one dispatcher that
chooses between them. The compiled CPU backend runs where a C compiler works, the Triton one
through its interpreter where Triton imports; the reference always."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dynprune.compact import CompactDetector
from dynprune.gates import Gate, set_gate_mode
from dynprune.kernels.block import CompactBlock
from dynprune.kernels.dispatch import block_class, select_backend
from dynprune.kernels.reference import ReferenceBlock, build_keep_index
from dynprune.layers import Bottleneck
from tests.conftest import ODD_BLOCK_SHAPES, input_sensitive_block, require_compiled_blocks, threshold_block


def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = ["reference", "cpu", pytest.param("triton", marks=pytest.mark.skipif(not _have_triton(),
                                                                                  reason="Triton is not installed"))]


def make_block(backend: str, block: Bottleneck) -> CompactBlock:
    if backend == "cpu":
        require_compiled_blocks()
    compact = block_class(backend)(block).eval()
    return compact.to(memory_format=torch.channels_last).prepare()


def masked_counts(block: Bottleneck) -> list:
    """``[[kept1, kept2], ...]`` per image of the masked dense block's last call."""
    m1, m2 = block.last["mask"]
    return [[int((m1[i] > 0).sum()), int((m2[i] > 0).sum())] for i in range(m1.shape[0])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threshold, kept", [(1e9, "none"), (0.0, "all positive"), (0.6, "some")])
@pytest.mark.parametrize("group", [1, 8])
def test_every_backend_equals_the_masked_dense_block(backend, threshold, kept, group):
    """Empty, full and partial kept sets, groups of 1 and 8, widths that are no multiple of 8
    (37 and 19), a batch of two: the output and each image's kept counts."""
    block = threshold_block(24, 37, 19, group, threshold, seed=group)
    compact = make_block(backend, block)
    x = torch.randn(2, 24, 6, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = block(x)
        out = compact(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    counts = masked_counts(block)
    assert torch.as_tensor(compact.last_kept).tolist() == counts
    if kept == "none":
        assert counts == [[0, 0], [0, 0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c,h1,h2,group,size", ODD_BLOCK_SHAPES)
def test_every_backend_equals_the_reference_on_odd_shapes_and_mixed_batches(backend, c, h1, h2, group, size):
    """Widths that are no multiple of a vector, maps down to one pixel, groups of 1, 8 and 16, and
    a batch of three whose images keep different channels: each backend against the reference
    backend and the masked dense block, batch and single images alike."""
    torch.manual_seed(c + h1 + size[1])
    block, _ = input_sensitive_block(c, h1, h2, group)
    compact, reference = make_block(backend, block), ReferenceBlock(block).eval()
    x = (torch.randn(3, c, *size) * torch.tensor([0.3, 1.0, 3.0]).view(3, 1, 1, 1)).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        dense = block(x)
        out, ref = compact(x), reference(x)
        single = [compact(x[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(ref, dense, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for i in range(3):
        torch.testing.assert_close(single[i][0], out[i], atol=1e-4, rtol=1e-4)
    assert torch.as_tensor(reference.last_kept).tolist() == masked_counts(block)
    assert torch.as_tensor(compact.last_kept).tolist() == masked_counts(block)[2:]  # the last single image


def test_mixed_batch_images_keep_different_channel_sets():
    """The case above is only a test of batches if the images' kept sets differ."""
    block, _ = input_sensitive_block(40, 37, 19, 1)
    x = torch.randn(3, 40, 9, 13) * torch.tensor([0.3, 1.0, 3.0]).view(3, 1, 1, 1)
    with torch.no_grad():
        block(x)
    m1, m2 = block.last["mask"]
    sets = [tuple(torch.cat([m1[i] > 0, m2[i] > 0]).tolist()) for i in range(3)]
    assert len(set(sets)) > 1


@pytest.mark.parametrize("group", [1, 8])
def test_the_compiled_kept_lists_are_the_reference_slot_order_padded(group):
    """The C keep decision and slot order against the reference: kept channels first, ascending,
    each slot scaled by its saliency, then zero-scaled copies of the first kept channel up to the
    padding multiple."""
    require_compiled_blocks()
    block = threshold_block(24, 36, 20, group, 0.6, seed=group)
    compact = make_block("cpu", block)
    x = torch.rand(1, 24, 6, 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        block(x)
        compact(x)
    kernel = compact.kernel
    kept1, kept2, slots1, slots2 = kernel.counts.tolist()
    pad1, pad2 = compact.pad_to
    assert slots1 % pad1 == 0 and slots2 % pad2 == 0 and slots1 - kept1 < pad1 and slots2 - kept2 < pad2
    for mask, (first, kept, slots, offset) in zip(block.last["mask"],
                                                  ((0, kept1, slots1, 0), (slots1, kept2, slots2, block.h1))):
        index, count = build_keep_index(mask)
        assert int(count[0]) == kept
        got_index = kernel.index[first : first + slots] - offset
        got_scale = kernel.scale[first : first + slots]
        np.testing.assert_array_equal(got_index[:kept], index[0, :kept].numpy())
        np.testing.assert_allclose(got_scale[:kept], mask[0, index[0, :kept].long()].numpy(), rtol=1e-5, atol=1e-6)
        if kept:
            assert (got_index[kept:] == got_index[0]).all() and (got_scale[kept:] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("group", [1, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_compact_detector_equals_the_masked_dense_detector(backend, batch, group, seed):
    from tests.conftest import gated_model, random_gates

    if backend == "cpu":
        require_compiled_blocks()
    model, _ = gated_model(group, seed)
    random_gates(model, seed)
    x = torch.rand(batch, 3, 64, 64)
    with torch.no_grad():
        ref_boxes, ref_logits = model(x)
        compact = CompactDetector(model, backend=backend)
        boxes, logits = compact(x)
    assert compact.backend == backend and all(b.backend == backend for b in compact.blocks)
    torch.testing.assert_close(boxes, ref_boxes, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    kept = compact.kept_counts()
    assert kept.shape == (batch, len(model.blocks), 2)
    assert (kept == 0).any() and (kept > 0).any()
    ref_kept = [[int((m[i] > 0).sum()) for b in model.blocks for m in b.last["mask"]] for i in range(batch)]
    assert kept.flatten(1).tolist() == ref_kept


@pytest.mark.parametrize("group", [1, 8])
@pytest.mark.parametrize("keep", [0.3, 1.0])
def test_fbs_topk_gates_run_on_the_reference_backend(group, keep):
    """FBS's k-winners-take-all has no compiled form: ``auto`` gives the reference backend, says
    why, and the result is the masked dense model's."""
    from tests.conftest import gated_model

    model, _ = gated_model(group, seed=3)
    for gate in (m for m in model.modules() if isinstance(m, Gate)):
        gate.fc1.weight.data.normal_(0, 2.0)
        gate.fc2.weight.data.normal_(0, 1.0)
    set_gate_mode(model, "topk", keep)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        kept_ref = [[int((m[i] > 0).sum()) for b in model.blocks for m in b.last["mask"]] for i in range(3)]
        compact = CompactDetector(model)
        out = compact(x)
    assert compact.backend == "reference" and "'topk'" in compact.backend_reason
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert compact.kept_counts().flatten(1).tolist() == kept_ref


def test_the_dispatcher_chooses_and_says_why(monkeypatch):
    from dynprune.kernels import cpu_blocks

    block = threshold_block(8, 8, 8, 1, 0.5)
    if cpu_blocks.compiled_library() is not None:
        name, reason = select_backend("cpu", "auto", [block])
        assert name == "cpu" and "compiled CPU blocks" in reason
    # no compiler: the reference, with the reason; asking for the compiled blocks is an error
    monkeypatch.setattr(cpu_blocks, "compiled_library", lambda: None)
    name, reason = select_backend("cpu", "auto", [block])
    assert name == "reference" and "no C compiler" in reason
    with pytest.raises(ValueError, match="--backend cpu: no C compiler"):
        select_backend("cpu", "cpu", [block])
    assert select_backend("cpu", "reference", [block])[0] == "reference"
    # Triton: never chosen on the CPU by auto (its interpreter is for tests); asked for, it needs a GPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert select_backend("cpu", "auto", [block])[0] != "triton"
    with pytest.raises(ValueError, match="--backend triton"):
        select_backend("cpu", "triton", [block])
    with pytest.raises(ValueError, match="unknown backend 'torch'"):
        select_backend("cpu", "torch", [block])


def test_a_compact_block_copies_and_moves_without_its_compiled_state():
    """deepcopy and .to() drop the compiled kernel (ctypes pointers to the old weights); the next
    call rebuilds it from the current ones."""
    require_compiled_blocks()
    block = threshold_block(16, 16, 16, 8, 0.5)
    compact = make_block("cpu", block)
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        first = compact(x)
        clone = copy.deepcopy(compact)
        assert clone._kernel is None
        torch.testing.assert_close(clone(x), first)
        compact.w3.mul_(2.0)  # in place: the kernel keeps its copy ...
        compact.double().float()  # ... until a move drops it
        assert compact._kernel is None
        assert not torch.allclose(compact(x), first)
