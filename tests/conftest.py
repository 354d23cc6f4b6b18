"""Shared fixtures: tiny models and tiny datasets written by the tests themselves."""

from __future__ import annotations

import os

# Triton kernels run on the CPU through Triton's interpreter; the variable must be set
# before triton.jit decorates them. On a machine with a GPU they run for real.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

from dynprune.config import DetectorConfig

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def grad_mode_is_not_leaked():
    """A test (or the CLI it drives in-process) that switches autograd off globally breaks every
    training test after it; fail the culprit instead."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("autograd was left disabled globally (use a scoped torch.no_grad())")


def require_compiled_blocks() -> None:
    """Skip the calling test where the compiled CPU blocks (kernels/cpu_blocks.c) cannot be built."""
    from dynprune.kernels.cpu_blocks import compiled_library

    if compiled_library() is None:
        pytest.skip("no working C compiler: the compiled CPU blocks cannot be built here")


def tiny_config(num_classes: int = 1, **kw) -> DetectorConfig:
    """A model small enough for CI: same structure as nano, a few thousand parameters."""
    d = dict(num_classes=num_classes, stem=8, widths=(8, 16, 16, 16), depths=(1, 1, 1, 1), neck=16)
    d.update(kw)
    return DetectorConfig(**d)


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics so that folding and masking are really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)


#: (c, h1, h2, group, map size): widths that are no multiple of a vector, rows that are no
#: multiple of a tile, maps down to one pixel, the three group sizes
ODD_BLOCK_SHAPES = [(8, 5, 37, 1, (1, 1)), (24, 24, 24, 8, (3, 7)), (40, 37, 19, 1, (9, 13)),
                    (20, 48, 64, 16, (20, 12))]


def threshold_block(c: int, h1: int, h2: int, group: int, threshold: float, seed: int = 0, *,
                    bias_low: float = 0.0, weight_std: float | None = 1.0, randomize: bool = True):
    """A gated Bottleneck with threshold gates: fc2 bias drawn from ``[bias_low, 1)``, fc2 weights
    from N(0, ``weight_std``) (``None``: as initialised), one threshold for both gates; BatchNorm
    randomized unless ``randomize`` is off."""
    from dynprune.gates import set_gate_mode
    from dynprune.layers import Bottleneck

    torch.manual_seed(seed)
    block = Bottleneck(c, h1, h2).eval()
    if randomize:
        randomize_bn(block, seed)
    block.add_gates(group=group)
    set_gate_mode(block, "threshold")
    for gate in (block.gate1, block.gate2):
        if weight_std is not None:
            gate.fc2.weight.data.normal_(0, weight_std)
        gate.fc2.bias.data.uniform_(bias_low, 1.0)
        gate.threshold.fill_(threshold)
    return block


def input_sensitive_block(c: int, h1: int, h2: int, group: int, seed: int = 1):
    """A gated Bottleneck (BN randomized) whose threshold gates keep different channels for
    different inputs, and an un-gated copy of it taken before the gates were added."""
    import copy

    from dynprune.gates import set_gate_mode
    from dynprune.layers import Bottleneck

    block = Bottleneck(c, h1, h2).eval()
    randomize_bn(block, seed)
    plain = copy.deepcopy(block)
    block.add_gates(group=group)
    set_gate_mode(block, "threshold")
    for gate in (block.gate1, block.gate2):
        gate.fc1.weight.data.normal_(0, 2.0)
        gate.fc2.weight.data.normal_(0, 2.0)
        gate.threshold.fill_(0.5)
    return block, plain


def gated_model(group: int = 1, seed: int = 0):
    """A tiny gated detector (BN randomized) and its dense twin with the same weights."""
    from dynprune.model import build_detector

    torch.manual_seed(seed)
    model = build_detector(tiny_config(widths=(8, 16, 24, 16)))
    dense = build_detector(tiny_config(widths=(8, 16, 24, 16)))
    randomize_bn(model, seed)
    dense.load_state_dict(model.state_dict())
    model.add_gates(group=group)
    return model.eval(), dense.eval()


def random_gates(model, seed, empty_every=3):
    """Random saliencies and thresholds: some layers keep nothing, some everything."""
    from dynprune.gates import Gate, set_gate_mode

    g = torch.Generator().manual_seed(seed)
    set_gate_mode(model, "threshold")
    for i, gate in enumerate(m for m in model.modules() if isinstance(m, Gate)):
        gate.fc2.weight.data.normal_(0, 1.0, generator=g)
        gate.fc2.bias.data.uniform_(0.0, 1.0, generator=g)
        if i % empty_every == 0:
            gate.threshold.fill_(1e9)  # empty mask
        elif i % empty_every == 1:
            gate.threshold.fill_(0.0)  # full mask (saliency > 0 still required)
        else:
            gate.threshold.fill_(0.8)


@pytest.fixture
def synthetic_yaml(tmp_path):
    from dynprune.data.synthetic import write_synthetic

    return write_synthetic(str(tmp_path / "syn"), n_train=24, n_val=8, seed=3, size=128)


def write_jpg(path, w=64, h=48, seed=0):
    import cv2

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


BUNDLE_IMGSZ = 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A bundle of tiny random engines (dense, gated, l1-slimmed static), 64 px, one class."""
    from dynprune.checkpoint import make_checkpoint, save_atomic
    from dynprune.flops import CostModel
    from dynprune.gates import set_gate_mode
    from dynprune.model import build_detector
    from dynprune.pruning.importance import l1_norm
    from dynprune.pruning.select import select_widths
    from dynprune.pruning.surgery import slim_model
    from dynprune.serve.bundle import export_bundle

    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    dense = build_detector(tiny_config()).eval()
    randomize_bn(dense)
    for p in dense.pred:  # confident enough to produce boxes on random weights
        p.bias.data[:1] = 0.5
    gated = build_detector(tiny_config()).eval()
    gated.load_state_dict(dense.state_dict())
    gated.add_gates()
    set_gate_mode(gated, "threshold")
    for b in gated.blocks:
        for g in (b.gate1, b.gate2):
            g.threshold.fill_(1.0)
    keep = select_widths(CostModel(dense, BUNDLE_IMGSZ), l1_norm(dense), 0.6, round_to=4)
    static = slim_model(dense, keep)
    paths = {}
    for name, model, kind, ap in (("dense", dense, "dense", 0.50), ("gated", gated, "gated", 0.50),
                                  ("static", static, "pruned", 0.495)):
        paths[name] = str(root / f"{name}.pt")
        save_atomic(make_checkpoint(model, ["ring"], BUNDLE_IMGSZ, kind, gate={"mode": "threshold"} if kind == "gated"
                                    else None, metrics={"ap50": ap + 0.3, "ap50_95": ap}), paths[name])
    export_bundle(str(root / "b"), dynamic=paths["gated"], static=paths["static"], dense=paths["dense"])
    return str(root / "b")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from dynprune.data.synthetic import write_synthetic_video

    return write_synthetic_video(str(tmp_path_factory.mktemp("v") / "v.mp4"), frames=24, size=96)
