"""The PyTorch engines' CUDA-graph replay and their precision on each device."""

import pytest
import torch

from dynprune.model import build_detector
from dynprune.serve.cuda_graph import GraphedForward
from dynprune.serve.engines import network_dtype
from tests.conftest import randomize_bn, tiny_config


def test_precision_per_device():
    assert network_dtype(torch.device("cpu"), "fp16") == torch.float32  # the CPU paths are float32
    assert network_dtype(torch.device("cuda"), "fp16") == torch.float16
    assert network_dtype(torch.device("cuda"), "int8") == torch.float16  # int8 is TensorRT's; PyTorch runs fp16
    assert network_dtype(torch.device("cuda"), "fp32") == torch.float32
    with pytest.raises(ValueError, match="bf8"):
        network_dtype(torch.device("cuda"), "bf8")


def test_off_the_gpu_the_network_runs_directly():
    calls = []

    def forward(x):
        calls.append(x)
        return (x * 2,)

    graphed = GraphedForward(forward)
    x = torch.rand(1, 3, 8, 8)
    (out,) = graphed(x)
    assert torch.equal(out, x * 2) and len(calls) == 1 and not graphed.active


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replays_equal_eager_and_outputs_survive_the_next_frame():
    model = build_detector(tiny_config()).eval()
    randomize_bn(model)
    model = model.cuda()
    graphed = GraphedForward(model)
    frames = [torch.rand(1, 3, 64, 64, device="cuda") for _ in range(3)]
    with torch.no_grad():
        outs = [graphed(f) for f in frames]
        assert graphed.active
        for f, (boxes, logits) in zip(frames, outs):  # earlier outputs were copied out of the graph
            ref_boxes, ref_logits = model(f)
            torch.testing.assert_close(boxes, ref_boxes, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
