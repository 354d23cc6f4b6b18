"""The TensorRT static engine: built from the bundle's ONNX where tensorrt and CUDA exist."""

import numpy as np
import pytest
import torch

from dynprune.serve.tensorrt_engine import tensorrt_status

OK, REASON = tensorrt_status()


def test_status_says_why_when_unavailable():
    assert isinstance(REASON, str) and REASON
    if not OK:
        assert "tensorrt" in REASON.lower() or "cuda" in REASON.lower()


@pytest.mark.skipif(not OK, reason=f"TensorRT engine not testable here: {REASON}")
def test_plan_matches_onnx_runtime(tmp_path):
    import onnxruntime as ort

    from dynprune.export import export_onnx
    from dynprune.model import build_detector
    from dynprune.serve.tensorrt_engine import TensorRTRunner, build_plan, plan_name
    from tests.conftest import randomize_bn, tiny_config

    model = build_detector(tiny_config()).eval()
    randomize_bn(model)
    onnx_path = export_onnx(model, str(tmp_path / "m.onnx"), 64)
    plan = build_plan(onnx_path, str(tmp_path / plan_name("fp32")), precision="fp32")
    x = torch.rand(1, 3, 64, 64)
    boxes, scores = TensorRTRunner(plan)(x.cuda())
    ref_boxes, ref_scores = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()})
    np.testing.assert_allclose(boxes.cpu().numpy(), ref_boxes, atol=1e-2)
    np.testing.assert_allclose(scores.cpu().numpy(), ref_scores, atol=1e-3)
