"""The frame path that runs on the GPU, checked on the CPU with the same functions: letterboxing on a
tensor against OpenCV's, fixed-shape NMS (the Triton kernel through its interpreter) against
torchvision, fixed-shape detections against :func:`dynprune.boxes.postprocess`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from dynprune.boxes import detections_fixed, postprocess
from dynprune.kernels.nms import greedy_nms_reference, greedy_nms_triton
from dynprune.letterbox import LetterboxInput, boxes_to_image, letterbox_tensor

NMS = [greedy_nms_reference, greedy_nms_triton]


def random_boxes(n: int, classes: int, seed: int, span: float = 200.0):
    """Crowded boxes (many overlaps) and their class probabilities."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * span
    wh = torch.rand(n, 2, generator=g) * span / 3 + 1
    return torch.cat((xy, xy + wh), 1), torch.rand(n, classes, generator=g)


@pytest.mark.parametrize("shape", [(480, 640), (200, 150), (320, 320), (1080, 1920), (37, 411)])
def test_letterbox_on_a_tensor_matches_opencv(shape):
    import cv2

    rng = np.random.default_rng(sum(shape))
    image = cv2.GaussianBlur(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), (5, 5), 2)
    want, fitted = LetterboxInput(320)(image)
    got, got_fitted = letterbox_tensor(torch.from_numpy(image), 320)
    assert got_fitted == fitted and got.shape == want.shape
    diff = (got - want).abs()
    assert diff.mean() <= 1 / 255 and diff.max() <= 1 / 255 + 1e-6
    pad = (want == 114 / 255).all(1)  # the padding: the same pixels, the same colour
    pad_x, pad_y = int(fitted.pad_x), int(fitted.pad_y)
    assert torch.equal(got[:, :, :pad_y], want[:, :, :pad_y]) and torch.equal(got[..., :pad_x], want[..., :pad_x])
    assert pad.any() == (shape[0] != shape[1])


def test_letterbox_on_a_tensor_refuses_what_is_not_a_bgr_frame():
    with pytest.raises(ValueError, match="uint8 BGR"):
        letterbox_tensor(torch.zeros(4, 4, dtype=torch.uint8), 32)


def test_boxes_back_to_image_pixels_as_the_letterbox_maps_them():
    _, fitted = letterbox_tensor(torch.zeros(90, 160, 3, dtype=torch.uint8), 64)
    boxes, _ = random_boxes(20, 1, 0, span=64)
    np.testing.assert_allclose(boxes_to_image(boxes, fitted).numpy(), fitted.to_image(boxes.numpy()), rtol=1e-6)


@pytest.mark.parametrize("nms_keep", NMS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_shape_nms_keeps_torchvisions_set(nms_keep, seed):
    boxes, scores = random_boxes(96, 1, seed)
    scores, order = scores[:, 0].sort(descending=True)
    boxes = boxes[order]
    n = int((scores > 0.3).sum())
    keep = nms_keep(boxes, torch.tensor([n], dtype=torch.int32), 0.5)
    want = torch.zeros(96, dtype=torch.bool)
    want[batched_nms(boxes[:n], scores[:n], torch.zeros(n, dtype=torch.long), 0.5)] = True
    assert keep.shape == (96,) and torch.equal(keep, want)
    assert 0 < int(keep.sum()) < n  # crowded: NMS removed some, kept some


@pytest.mark.parametrize("nms_keep", NMS)
def test_fixed_shape_nms_with_nothing_valid(nms_keep):
    boxes, _ = random_boxes(8, 1, 3)
    assert not nms_keep(boxes, torch.zeros(1, dtype=torch.int32), 0.5).any()


@pytest.mark.parametrize("nms_keep", NMS)
@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.parametrize("conf, max_det", [(0.5, 300), (0.2, 10), (0.999, 100)])
def test_fixed_shape_detections_are_postprocess_detections(nms_keep, classes, conf, max_det):
    boxes, scores = random_boxes(400, classes, classes)
    want = postprocess(boxes[None], scores[None], conf, 0.6, max_det)[0]
    dets, count = detections_fixed(boxes, scores, conf, 0.6, max_det, nms_keep=nms_keep)
    n = int(count)
    assert dets.shape == (max_det, 6) and count.shape == (1,) and n == len(want["boxes"])
    torch.testing.assert_close(dets[:n, :4], want["boxes"])
    torch.testing.assert_close(dets[:n, 4], want["scores"])
    assert torch.equal(dets[:n, 5].long(), want["labels"])
    assert not dets[n:].any()  # the rows past the count are zeros
    if conf == 0.2:
        assert n == max_det  # more survived than the fixed count: the best max_det, as postprocess keeps


@pytest.mark.parametrize("name", ["dense", "dynamic"])
def test_the_device_frame_path_gives_the_engines_detections(bundle, name):
    """The whole-frame path (letterbox, network, fixed-shape NMS, image pixels, one packed read-back),
    run eagerly on the CPU, against the engine's own CPU path on the same frames."""
    from dynprune.serve.bundle import load_bundle
    from dynprune.serve.engines import load_engine
    from dynprune.serve.frame_path import DeviceFramePath

    engine = load_engine(load_bundle(bundle), name, torch.device("cpu"), backend="reference")
    path = DeviceFramePath(engine.device_network, engine.imgsz, torch.device("cpu"), engine.conf, engine.iou)
    rng = np.random.default_rng(0)
    for shape in [(48, 80), (64, 64), (100, 60)]:
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        want = engine(image)
        engine.frame_path = path
        try:
            got = engine(image)
        finally:
            engine.frame_path = None
        assert len(want.boxes) > 0 and len(got.boxes) == len(want.boxes)
        if shape == (64, 64):  # no resize: the same input, so the same detections in the same order
            np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-4)
            np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
            assert (got.labels == want.labels).all()
        else:  # resized letterboxes differ by a level here and there: near-equal scores may swap places
            np.testing.assert_allclose(np.sort(got.scores), np.sort(want.scores), atol=2e-3)
            far = np.abs(got.boxes[:, None] - want.boxes[None]).max(-1)
            assert (far.min(1) <= 0.1).all() and (far.min(0) <= 0.1).all()
        assert set(got.timings) == set(want.timings)
        if name == "dynamic":
            assert got.keep_ratio == pytest.approx(want.keep_ratio, abs=0.02)
            assert got.gflops == pytest.approx(want.gflops, rel=0.05)


def test_the_device_frame_path_reads_the_score_threshold_each_frame(bundle):
    from dynprune.serve.bundle import load_bundle
    from dynprune.serve.engines import load_engine
    from dynprune.serve.frame_path import DeviceFramePath

    engine = load_engine(load_bundle(bundle), "dense", torch.device("cpu"))
    engine.frame_path = DeviceFramePath(engine.device_network, engine.imgsz, torch.device("cpu"), engine.conf,
                                        engine.iou)
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    engine.conf = 0.7
    few = len(engine(image).boxes)
    engine.conf = 0.001
    assert len(engine(image).boxes) > few
    with pytest.raises(ValueError, match="uint8 BGR"):
        engine.frame_path(image.astype(np.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name, zero_copy", [("dense", False), ("dynamic", False), ("dynamic", True)])
def test_the_whole_frame_graph_replays_as_the_eager_path_on_a_gpu(tmp_path, name, zero_copy):
    """On the GPU: the frame replayed from one CUDA graph gives the eager path's detections, frame
    after frame, while the gates keep different channels for different frames; also with the frame
    read in place from pinned memory (an integrated GPU's way; a discrete one reads it over PCIe)."""
    from dynprune.checkpoint import make_checkpoint, save_atomic
    from dynprune.gates import Gate
    from dynprune.model import build_detector
    from dynprune.serve.engines import DenseEngine, DynamicEngine
    from dynprune.serve.frame_path import DeviceFramePath
    from tests.conftest import random_gates, randomize_bn, tiny_config

    torch.manual_seed(0)
    model = build_detector(tiny_config()).eval()
    randomize_bn(model)
    for p in model.pred:
        p.bias.data[:1] = 0.5
    if name == "dynamic":
        model.add_gates(group=8)
        random_gates(model, 0, empty_every=99)
        for g in (m for m in model.modules() if isinstance(m, Gate)):
            g.fc1.weight.data.normal_(0, 2.0)  # saliencies that move with the frame
            g.threshold.fill_(0.5)
    path = str(tmp_path / "m.pt")
    save_atomic(make_checkpoint(model, ["ring"], 64, "gated" if name == "dynamic" else "dense",
                                gate={"mode": "threshold"} if name == "dynamic" else None), path)
    cuda = torch.device("cuda")
    engine = (DynamicEngine(path, cuda, backend="triton", precision="fp32") if name == "dynamic"
              else DenseEngine(path, cuda, precision="fp32"))
    assert engine.frame_path is not None and "whole frame on the GPU" in engine.description
    engine.frame_path.zero_copy = zero_copy
    eager = DeviceFramePath(engine.device_network, engine.imgsz, cuda, engine.conf, engine.iou, cuda_graph=False)
    rng = np.random.default_rng(0)
    # two frame sizes (two graphs); each frame's successor uploads while it runs (across the size change too)
    images = [rng.integers(0, 256, (48 + 8 * (i // 3), 80, 3), dtype=np.uint8) for i in range(6)]
    keeps = set()
    for i, image in enumerate(images):
        got = engine(image, images[i + 1] if i + 1 < len(images) else None)
        want, extras, _ = eager(image)
        np.testing.assert_allclose(got.boxes, want[:, :4], atol=1e-3)
        np.testing.assert_allclose(got.scores, want[:, 4], atol=1e-4)
        if name == "dynamic":
            keeps.add(round(got.keep_ratio, 4))
    assert len(engine.frame_path.graphs) == 2 and all(g.active for g in engine.frame_path.graphs.values())
    assert engine.frame_path.zero_copy == zero_copy  # the in-place read passed its check (or was not asked for)
    if name == "dynamic":
        assert len(keeps) > 1
