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


class _FakeTensorRT:
    """Stand-in of the tensorrt module with the API surface of one version: 8.5 has the binding
    API and needs EXPLICIT_BATCH; 10 has only name-based I/O and execute_async_v3."""

    float32, float16, int32 = "f32", "f16", "i32"

    def __init__(self, version: str):
        import types

        self.__version__ = version
        self.calls = []
        major = int(version.split(".")[0])
        fake = self
        io = [("images", (1, 3, 64, 64), True), ("boxes", (1, 10, 4), False), ("scores", (1, 10), False)]
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: None})
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(FP16="fp16", INT8="int8")
        self.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool, size))

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("create_network", flags))
                return object()

            def create_builder_config(self):
                return Config()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network",))
                return b"plan-bytes"

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse(self, data):
                return True

        class Context:
            def set_tensor_address(self, name, ptr):
                fake.calls.append(("set_tensor_address", name))

            def execute_async_v3(self, stream):
                fake.calls.append(("execute_async_v3",))
                return True

            def execute_async_v2(self, bindings, stream):
                fake.calls.append(("execute_async_v2", len(bindings)))
                return True

        class Engine:
            def create_execution_context(self):
                return Context()

        if major >= 10:
            Engine.num_io_tensors = len(io)
            Engine.get_tensor_name = lambda s, i: io[i][0]
            Engine.get_tensor_shape = lambda s, n: dict((a, b) for a, b, _ in io)[n]
            Engine.get_tensor_dtype = lambda s, n: fake.float32
            Engine.get_tensor_mode = lambda s, n: "in" if n == "images" else "out"
        else:
            del Context.execute_async_v3, Context.set_tensor_address
            Engine.num_bindings = len(io)
            Engine.get_binding_name = lambda s, i: io[i][0]
            Engine.get_binding_shape = lambda s, i: io[i][1]
            Engine.get_binding_dtype = lambda s, i: fake.float32
            Engine.binding_is_input = lambda s, i: io[i][2]

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                assert data == b"plan-bytes"
                return Engine()

        self.Builder, self.OnnxParser, self.Runtime = Builder, Parser, Runtime


@pytest.mark.parametrize("version, execute", [("8.5.2", "execute_async_v2"), ("10.3.0", "execute_async_v3")])
def test_api_is_chosen_by_what_the_installed_tensorrt_has(tmp_path, monkeypatch, version, execute):
    """Without TensorRT here, stand-ins of 8.5 and 10 check the branches: EXPLICIT_BATCH only
    before 10, the workspace through set_memory_pool_limit, the binding API on 8.5 and the
    name-based one on 10."""
    import sys

    from dynprune.serve.tensorrt_engine import TensorRTRunner, build_plan

    fake = _FakeTensorRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    plan = build_plan(str(tmp_path / "m.onnx"), str(tmp_path / "m.plan"), precision="fp16")
    assert ("create_network", 1 if version.startswith("8") else 0) in fake.calls
    assert ("set_memory_pool_limit", "workspace", 1 << 30) in fake.calls and ("set_flag", "fp16") in fake.calls
    runner = TensorRTRunner(plan, device="cpu")
    boxes, scores = runner(torch.rand(1, 3, 64, 64))
    assert boxes.shape == (1, 10, 4) and scores.shape == (1, 10)
    assert any(c[0] == execute for c in fake.calls)
    other = {"execute_async_v2", "execute_async_v3"} - {execute}
    assert not any(c[0] in other for c in fake.calls)
    with pytest.raises(ValueError, match="calibrator"):
        build_plan(str(tmp_path / "m.onnx"), str(tmp_path / "m8.plan"), precision="int8")
