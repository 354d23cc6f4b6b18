import numpy as np
import pytest
import torch

from dynprune.boxes import _detections_torch, detections_numpy, postprocess
from dynprune.letterbox import Letterbox


def _random_detections(anchors: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(anchors, 2, generator=g) * 60  # crowded: many overlaps for NMS to remove
    sizes = torch.rand(anchors, 2, generator=g) * 30 + 5
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], 1)
    scores = torch.rand(anchors, classes, generator=g)
    return boxes[None], scores[None]


@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.parametrize("conf,pre_nms", [(0.25, 1000), (0.05, 50), (0.999999, 1000)])
def test_numpy_detections_equal_postprocess(classes, conf, pre_nms):
    """The CPU post-processing in NumPy keeps the same boxes, scores and labels in the same order as
    the torch steps (the GPU's): with many boxes above conf, more than pre_nms of them, and none.
    postprocess() takes the NumPy one for float32 CPU tensors and the torch one for float64."""
    for seed in range(3):
        boxes, scores = _random_detections(400, classes, seed)
        ref = _detections_torch(boxes[0], scores[0], conf, 0.5, max_det=30, pre_nms=pre_nms)
        got = detections_numpy(boxes[0].numpy(), scores[0].numpy(), conf, 0.5, max_det=30, pre_nms=pre_nms)
        np.testing.assert_array_equal(got[0], ref["boxes"].numpy())
        np.testing.assert_array_equal(got[1], ref["scores"].numpy())
        np.testing.assert_array_equal(got[2], ref["labels"].numpy())
        assert got[0].dtype == np.float32 and got[2].dtype == np.int64
        via = postprocess(boxes, scores, conf, 0.5, max_det=30, pre_nms=pre_nms)[0]
        assert all(torch.equal(via[k], torch.from_numpy(v)) for k, v in zip(("boxes", "scores", "labels"), got))
        via64 = postprocess(boxes.double(), scores.double(), conf, 0.5, max_det=30, pre_nms=pre_nms)[0]
        assert via64["boxes"].dtype == torch.float64  # the torch steps
        torch.testing.assert_close(via64["boxes"].float(), ref["boxes"])


def test_letterbox_maps_boxes_back_and_clips():
    lb = Letterbox(scale=0.5, pad_x=10.0, pad_y=20.0, width=200, height=100)
    image_boxes = np.array([[0, 0, 50, 40], [100, 50, 199, 99]], dtype=np.float32)
    np.testing.assert_allclose(lb.to_image(lb.to_model(image_boxes)), image_boxes, atol=1e-4)
    outside = lb.to_model(np.array([[-30, -10, 260, 140]], dtype=np.float32))
    np.testing.assert_array_equal(lb.to_image(outside), [[0, 0, 200, 100]])


def test_letterbox_input_equals_letterbox_and_to_tensor_across_frame_sizes():
    """Kept buffers, bit for bit the one-shot functions: frames of one size, a new size (new padding),
    back again, a frame already at model size, and a float image (the one-shot fallback)."""
    from dynprune.letterbox import LetterboxInput, letterbox, to_tensor

    rng = np.random.default_rng(0)
    prepare = LetterboxInput(64)
    shapes = [(48, 80, 3), (48, 80, 3), (100, 30, 3), (48, 80, 3), (64, 64, 3), (40, 50, 3)]
    for i, shape in enumerate(shapes):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        if i == len(shapes) - 1:
            image = image.astype(np.float32)
        x, fitted = prepare(image)
        boxed, ref_fitted = letterbox(image, 64)
        assert torch.equal(x, to_tensor(boxed)) and x.shape == (1, 3, 64, 64)
        assert fitted == ref_fitted
