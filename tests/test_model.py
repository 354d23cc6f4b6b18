import copy

import numpy as np
import pytest
import torch

from dynprune.config import config_for
from dynprune.flops import CostModel, count_flops, count_parameters
from dynprune.model import build_detector
from tests.conftest import randomize_bn, tiny_config


@pytest.mark.parametrize("size,lo,hi", [("nano", 1.0e6, 2.0e6), ("small", 5.0e6, 7.0e6)])
def test_sizes_have_the_advertised_parameter_counts(size, lo, hi):
    model = build_detector(config_for(size))
    assert lo <= count_parameters(model) <= hi


@pytest.mark.parametrize("size", ["nano", "small"])
@pytest.mark.parametrize("hw", [(64, 64), (96, 160)])
def test_output_shapes(size, hw):
    model = build_detector(config_for(size, num_classes=3)).eval()
    h, w = hw
    boxes, logits = model(torch.rand(2, 3, h, w))
    anchors = sum((h // s) * (w // s) for s in (8, 16, 32))
    assert boxes.shape == (2, anchors, 4) and logits.shape == (2, anchors, 3)
    assert torch.all(boxes[..., 2] >= boxes[..., 0]) and torch.all(boxes[..., 3] >= boxes[..., 1])


def test_input_not_multiple_of_32_is_refused():
    model = build_detector(tiny_config()).eval()
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.rand(1, 3, 100, 64))


def test_predict_returns_boxes_in_input_pixels():
    """On a 96x64 input every anchor's box comes back (no threshold, no suppression) centred on
    its anchor point in input pixels: x from 4 to 92, y from 4 to 60 (strides 8 to 32)."""
    torch.manual_seed(0)
    model = build_detector(tiny_config()).eval()
    with torch.no_grad():
        dets = model.predict(torch.rand(1, 3, 64, 96), conf=0.0, iou=1.0, max_det=1000)
    boxes = dets[0]["boxes"]
    assert boxes.shape == (12 * 8 + 6 * 4 + 3 * 2, 4)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    torch.testing.assert_close(centres.min(0).values, torch.tensor([4.0, 4.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(centres.max(0).values, torch.tensor([92.0, 60.0]), atol=1e-3, rtol=0)


def test_cost_model_agrees_with_flop_counter_for_pruned_widths():
    cfg = tiny_config()
    model = build_detector(cfg)
    cost = CostModel(model, 64)
    hidden = [[max(1, b.h1 // 2), max(1, b.h2 // 3)] for b in model.blocks]
    slim = build_detector(tiny_config(hidden=hidden))
    assert cost.widths_flops(hidden) == count_flops(slim, 64)
    assert cost.dense == count_flops(model, 64)


def test_onnx_export_matches_pytorch(tmp_path):
    import onnxruntime as ort

    from dynprune.export import export_onnx
    from tests.conftest import randomize_bn

    model = build_detector(tiny_config()).eval()
    randomize_bn(model)
    path = export_onnx(model, str(tmp_path / "m.onnx"), 64)
    x = torch.rand(1, 3, 64, 64)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    boxes, scores = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref_boxes, ref_logits = model(x)
    np.testing.assert_allclose(boxes, ref_boxes.numpy(), atol=1e-4)
    np.testing.assert_allclose(scores, ref_logits.sigmoid().numpy(), atol=1e-4)


def test_dense_inference_equals_the_model_and_runs_1x1_layers_as_matmul():
    """BN folded, channels_last and PointwiseConv change nothing but float rounding; only
    1x1 stride-1 layers run as matrix products (the stride-2 and 3x3 layers stay convolutions)."""
    from torch import nn

    from dynprune.compact import DenseInference
    from dynprune.fusion import FoldedBottleneck, FoldedConv, PointwiseConv
    from dynprune.layers import Bottleneck, ConvBNAct

    torch.manual_seed(0)
    model = build_detector(tiny_config()).eval()
    for m in model.modules():  # non-trivial BN statistics, so that folding is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fast = DenseInference(model)
    pointwise = [m for m in fast.modules() if isinstance(m, PointwiseConv)]
    assert pointwise, "no 1x1 layer was replaced"
    # every convolution is now a FoldedConv (the Conv-BN-SiLU layers) or a PointwiseConv (the predictions)
    assert not any(isinstance(m, nn.Conv2d) for m in fast.modules())
    folded = [m for m in fast.modules() if isinstance(m, FoldedConv)]
    assert folded and not any(isinstance(m, (ConvBNAct, nn.BatchNorm2d)) for m in fast.modules())
    assert {m.matmul for m in folded} == {True, False}  # 1x1 stride-1 layers as matmul, the rest convolutions
    assert all(m.matmul == (m.weight.shape[-1] == 1 and m.stride == (1, 1)) for m in folded)
    blocks = [m for m in fast.modules() if isinstance(m, FoldedBottleneck)]
    assert len(blocks) == len(model.blocks) and not any(isinstance(m, Bottleneck) for m in fast.modules())
    # a batch runs each block's layers; one image its one-call CPU form
    for x in (torch.rand(2, 3, 64, 96), torch.rand(1, 3, 64, 96)):
        with torch.no_grad():
            (b_ref, l_ref), (b, l) = model(x), fast(x)
        assert torch.allclose(l, l_ref, atol=1e-4) and torch.allclose(b, b_ref, atol=1e-3)
    assert all(m._weights for m in blocks)  # the one-image form ran
    if torch.backends.mkldnn.is_available():  # with the 3x3 weights in oneDNN's layout
        assert all(m._weights[2].is_mkldnn for m in blocks)


def test_folded_bottleneck_equals_the_block_in_every_form():
    """One channels-last float32 image takes the one-call form; NCHW memory, a batch, float64
    or a tensor that needs grad run the layers; all equal the block. .to() drops the cached views."""
    from dynprune.fusion import FoldedBottleneck, fuse_conv_bn, pointwise_as_matmul
    from dynprune.layers import Bottleneck

    torch.manual_seed(0)
    block = Bottleneck(8, 12, 6).eval()
    randomize_bn(block, 0)
    folded = pointwise_as_matmul(fuse_conv_bn(torch.nn.Sequential(FoldedBottleneck(block))))[0]
    cl = torch.channels_last
    x = torch.randn(1, 8, 5, 7)
    with torch.no_grad():
        ref = block(x)
        for inp in (x.contiguous(memory_format=cl), x, torch.cat([x, x]).contiguous(memory_format=cl)):
            torch.testing.assert_close(folded(inp)[:1], ref, atol=1e-5, rtol=1e-5)
    out = folded(x.contiguous(memory_format=cl).requires_grad_())
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-5)
    assert out.requires_grad  # the layers ran, under autograd
    assert folded._weights
    folded.double()
    assert folded._weights is None
    with torch.no_grad():
        out = folded(x.double().contiguous(memory_format=cl))
    assert out.dtype == torch.float64 and folded._weights == ()
    torch.testing.assert_close(out.float(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("c,h1,h2,size", [(8, 12, 6, (5, 7)), (24, 40, 20, (1, 9)), (32, 32, 32, (12, 10))])
def test_folded_bottleneck_measures_both_one_image_forms(c, h1, h2, size):
    """One image at a time, a dense block runs the compiled block and bottleneck_pixels on its
    first frames, FormTrials.frames each, then keeps the faster for that input size; both equal the
    block. With allow_compiled off it never runs the compiled one."""
    from dynprune.fusion import FoldedBottleneck, fuse_conv_bn, pointwise_as_matmul
    from dynprune.layers import Bottleneck
    from tests.conftest import require_compiled_blocks

    require_compiled_blocks()
    torch.manual_seed(c)
    block = Bottleneck(c, h1, h2).eval()
    randomize_bn(block, 1)
    folded = pointwise_as_matmul(fuse_conv_bn(torch.nn.Sequential(FoldedBottleneck(block))))[0]
    plain = copy.deepcopy(folded)
    plain.allow_compiled = False
    n = folded._forms.frames
    with torch.no_grad():
        for i in range(2 * n + 2):
            x = torch.randn(1, c, *size).contiguous(memory_format=torch.channels_last)
            ref = block(x)
            out = folded(x)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            assert out.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(plain(x), ref, atol=1e-5, rtol=1e-5)
            if i < 2 * n - 1:
                assert size not in folded._forms.chosen
    assert [len(t) for t in folded._forms.trials[size]] == [n, n] and size in folded._forms.chosen
    assert folded._kernel and int(folded._kernel.macs[0]) > 0  # the compiled block ran
    assert plain._forms.chosen == {size: 0} and not plain._kernel
    folded.double()  # .to() drops the compiled block and the choice with the weights
    assert folded._kernel is None and not folded._forms.chosen


@pytest.mark.parametrize("k,stride,act", [(3, 2, True), (3, 1, True), (1, 1, True), (1, 1, False)])
@pytest.mark.parametrize("prepack", [False, True])
def test_folded_conv_equals_conv_bn_act_in_both_layouts(k, stride, act, prepack):
    from torch import nn

    from dynprune.fusion import FoldedConv, pointwise_as_matmul, prepack_convolutions
    from dynprune.layers import ConvBNAct

    torch.manual_seed(0)
    layer = ConvBNAct(6, 10, k, stride, act=act).eval()
    layer.bn.running_mean.uniform_(-0.5, 0.5)
    layer.bn.running_var.uniform_(0.5, 2.0)
    layer.bn.weight.data.uniform_(0.5, 1.5)
    layer.bn.bias.data.uniform_(-0.5, 0.5)
    holder = pointwise_as_matmul(nn.Sequential(FoldedConv(layer)))
    if prepack:
        prepack_convolutions(holder)
    folded = holder[0]
    assert folded.matmul == (k == 1 and stride == 1)
    assert folded.prepack == (prepack and not folded.matmul)
    x = torch.randn(2, 6, 8, 12)
    with torch.no_grad():
        ref = layer(x)
        for inp in (x, x.contiguous(memory_format=torch.channels_last), x[:1]):  # batch and size change too
            torch.testing.assert_close(folded(inp), ref[: inp.shape[0]], atol=1e-5, rtol=1e-5)
    if folded.prepack and torch.backends.mkldnn.is_available():
        assert isinstance(folded._packed, torch.Tensor) and folded._packed.is_mkldnn
    # an input that needs grad runs through conv2d (oneDNN's fused op has no autograd kernel)
    x.requires_grad_()
    folded(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_prepacked_layers_copy_save_and_change_dtype():
    """A oneDNN weight cannot be copied or pickled: copies, saves and .to() drop it and remake it
    on use; a float64 model runs as conv2d."""
    import io

    from dynprune.compact import DenseInference
    from dynprune.fusion import FoldedConv

    torch.manual_seed(0)
    model = build_detector(tiny_config()).eval()
    randomize_bn(model, 0)
    fast = DenseInference(model)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = fast(x)
        copied = copy.deepcopy(fast)(x)
        buf = io.BytesIO()
        torch.save(fast, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)(x)
        fast.double()
        assert all(m._packed is None for m in fast.modules() if isinstance(m, FoldedConv))
        doubled = fast(x.double())
    for got in (out, copied, loaded, doubled):
        torch.testing.assert_close(got[1].float(), ref[1], atol=1e-4, rtol=1e-4)
    assert all(m._packed is False for m in fast.modules() if isinstance(m, FoldedConv) and m.prepack)


def test_pointwise_conv_falls_back_to_a_convolution_for_nchw_input():
    from torch import nn

    from dynprune.fusion import PointwiseConv

    conv = nn.Conv2d(5, 7, 1)
    pw = PointwiseConv(conv)
    x = torch.randn(2, 5, 4, 6)
    with torch.no_grad():
        ref = conv(x)
        assert torch.allclose(pw(x), ref, atol=1e-5)  # NCHW: the convolution itself
        out = pw(x.contiguous(memory_format=torch.channels_last))  # channels_last: addmm
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match="1x1"):
        PointwiseConv(nn.Conv2d(5, 7, 3))


def test_convolutions_run_as_conv2d_where_onednn_cannot_prepack(monkeypatch, caplog):
    """A PyTorch without oneDNN's prepacking: said once in the log, and the layers run as conv2d."""
    import logging

    from dynprune import fusion
    from dynprune.compact import DenseInference

    def missing(*args, **kwargs):
        raise RuntimeError("mkldnn_reorder_conv2d_weight: not built with oneDNN")

    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", missing)
    monkeypatch.setattr(fusion, "_prepack_failure_logged", False)
    torch.manual_seed(0)
    model = build_detector(tiny_config()).eval()
    fast = DenseInference(model)
    x = torch.rand(1, 3, 64, 64)
    with caplog.at_level(logging.INFO, logger="dynprune.fusion"), torch.no_grad():
        ref, out = model(x), fast(x)
    torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-4)
    assert all(m._packed is False for m in fast.modules() if isinstance(m, fusion.FoldedConv) and m.prepack)
    assert sum("prepacking unavailable" in r.message for r in caplog.records) == 1
