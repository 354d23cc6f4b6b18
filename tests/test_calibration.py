"""Threshold calibration: the realised per-frame cost hits the target, for ManiDP and FBS gates."""

import pytest
import torch

from dynprune.calibration import calibrate, realised_cost
from dynprune.checkpoint import make_checkpoint, model_from_checkpoint, save_atomic
from dynprune.cli import main
from dynprune.flops import CostModel
from dynprune.gates import Gate, set_gate_mode
from dynprune.manidp import SaliencyStats
from dynprune.model import build_detector
from tests.conftest import randomize_bn, tiny_config


def trained_like_gates(mode: str = "threshold", seed: int = 0):
    """A gated model with input-dependent saliencies and ManiDP thresholds at remain rate 0.5."""
    torch.manual_seed(seed)
    model = build_detector(tiny_config(widths=(16, 32, 32, 32)))
    randomize_bn(model, seed)
    model.add_gates()
    for gate in (m for m in model.modules() if isinstance(m, Gate)):
        gate.fc1.weight.data.normal_(0, 1.0)
        gate.fc2.weight.data.normal_(0, 0.5)
    model.eval()
    images = torch.rand(24, 3, 64, 64) * torch.linspace(0.2, 1.0, 24).view(24, 1, 1, 1)
    set_gate_mode(model, mode, 0.5)
    if mode == "threshold":
        stats = SaliencyStats(model.blocks)
        with torch.no_grad():
            model(images)
            stats.update(model.blocks)
        stats.apply_thresholds(0.5)
    return model, images


@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("measure,target", [("keep", 0.5), ("keep", 0.7), ("flops", 0.6)])
def test_calibration_hits_the_realised_target(mode, measure, target):
    model, images = trained_like_gates(mode)
    result = calibrate(model, images, target, measure)
    keep, flops = realised_cost(model, images, CostModel(model, 64))
    assert (keep, flops) == pytest.approx((result.keep_mean, result.flops_mean))  # left applied
    assert result.achieved == pytest.approx(keep if measure == "keep" else flops)
    # Channels are discrete (16-32 per layer here): within a few percent, not exactly.
    assert abs(result.achieved - target) < 0.03


def test_thresholds_move_but_weights_do_not():
    model, images = trained_like_gates()
    weights = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("threshold")}
    before = [float(g.threshold) for g in model.modules() if isinstance(g, Gate)]
    calibrate(model, images, 0.8, "keep")
    after = [float(g.threshold) for g in model.modules() if isinstance(g, Gate)]
    assert before != after
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k


def test_first_threshold_tried_is_the_trained_one():
    """Factor 1 on the trained thresholds comes first: a target the model already meets leaves it as is."""
    model, images = trained_like_gates()
    trained = [g.threshold.clone() for g in model.modules() if isinstance(g, Gate)]
    keep, _ = realised_cost(model, images, CostModel(model, 64))
    result = calibrate(model, images, keep, "keep")
    assert result.steps == 1 and result.knob == 1.0 and result.reachable
    for g, t in zip((m for m in model.modules() if isinstance(m, Gate)), trained):
        assert torch.equal(g.threshold, t)


def test_layers_move_in_proportion_and_none_is_shut():
    """Calibrating down scales every layer's kept fraction alike: no layer drops to zero channels."""
    model, images = trained_like_gates()

    def layer_keep():
        with torch.no_grad():
            model(images)
        return torch.tensor([float((m > 0).float().mean()) for b in model.blocks for m in b.last["mask"]])

    before = layer_keep()
    result = calibrate(model, images, 0.5 * float(before.mean()), "keep")
    after = layer_keep()
    assert result.reachable and result.knob < 1
    assert bool((after[before > 0] > 0).all())
    ratio = after[before > 0] / before[before > 0]
    assert float(ratio.max() - ratio.min()) < 0.5  # roughly the same factor everywhere


def test_gates_that_silence_channels_cannot_be_calibrated_up():
    """A saliency of exactly 0 is never kept: the ceiling is below the target, and it is said."""
    model, images = trained_like_gates()
    for gate in (m for m in model.modules() if isinstance(m, Gate)):
        half = gate.groups // 2
        gate.fc2.weight.data[:half] = 0
        gate.fc2.bias.data[:half] = -1.0  # ReLU(-1) = 0 for every frame
    result = calibrate(model, images, 0.9, "keep")
    assert not result.reachable and result.achieved <= 0.55


def test_unreachable_or_invalid_targets_are_refused():
    model, images = trained_like_gates()
    with pytest.raises(ValueError, match="no gate can remove"):
        calibrate(model, images, 0.01, "flops")
    with pytest.raises(ValueError, match="choose one of"):
        calibrate(model, images, 0.5, "latency")
    with pytest.raises(ValueError, match="must be in"):
        calibrate(model, images, 1.5, "keep")


def test_cli_writes_a_calibrated_checkpoint(synthetic_yaml, tmp_path, capsys):
    model, _ = trained_like_gates()
    src = tmp_path / "gate.pt"
    save_atomic(make_checkpoint(model, ["ring"], 64, "gated", gate={"mode": "threshold", "method": "manidp"},
                                data=synthetic_yaml), src)
    assert main(["calibrate", "--weights", str(src), "--keep", "0.6", "--images", "16"]) == 0
    out = tmp_path / "gate_keep0.6.pt"
    assert out.is_file() and str(out) in capsys.readouterr().out
    calibrated, ckpt = model_from_checkpoint(str(out))
    assert ckpt["calibration"]["measure"] == "keep" and ckpt["calibration"]["images"] == 16
    assert abs(ckpt["calibration"]["keep_mean"] - 0.6) < 0.05
    thresholds = [float(g.threshold) for g in calibrated.modules() if isinstance(g, Gate)]
    assert thresholds != [float(g.threshold) for g in model.modules() if isinstance(g, Gate)]
    assert main(["calibrate", "--weights", str(src)]) == 2  # no target
    assert "exactly one target" in capsys.readouterr().err
