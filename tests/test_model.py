import numpy as np
import pytest
import torch

from dynprune.config import config_for
from dynprune.flops import CostModel, count_flops, count_parameters
from dynprune.model import build_detector
from tests.conftest import tiny_config


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
    model = build_detector(tiny_config()).eval()
    dets = model.predict(torch.rand(1, 3, 64, 64), conf=0.0)
    assert dets[0]["boxes"].shape[1] == 4 and len(dets[0]["boxes"]) <= 100


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
