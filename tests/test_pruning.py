import numpy as np
import pytest
import torch

from dynprune.checkpoint import make_checkpoint, model_from_checkpoint, save_atomic
from dynprune.config import config_for
from dynprune.data import load_dataset
from dynprune.flops import CostModel, count_flops
from dynprune.model import build_detector
from dynprune.pruning.importance import bn_gamma, cluster_keep, l1_norm
from dynprune.pruning.select import select_widths
from dynprune.pruning.surgery import hidden_masks, slim_model, zero_filters
from dynprune.train.engine import TrainConfig
from dynprune.train.prune import EffpTrainer, prune_checkpoint
from tests.conftest import randomize_bn, tiny_config

IMGSZ = 64


def nano(seed=0):
    torch.manual_seed(seed)
    m = build_detector(config_for("nano"))
    randomize_bn(m, seed)
    return m


@pytest.fixture
def dense_ckpt(tmp_path):
    path = tmp_path / "dense.pt"
    save_atomic(make_checkpoint(nano().eval(), ["ring"], IMGSZ, "dense"), path)
    return str(path)


def _cfg(out, epochs=1):
    return TrainConfig(epochs=epochs, batch=8, imgsz=IMGSZ, lr=1e-3, workers=0, out=str(out), mosaic=0.0)


def test_zeroed_model_equals_its_slim_copy():
    model = build_detector(tiny_config()).eval()
    randomize_bn(model)
    cost = CostModel(model, IMGSZ)
    keep = select_widths(cost, l1_norm(model), 0.5, round_to=1)
    zero_filters(model, hidden_masks(model, keep))
    slim = slim_model(model, keep)
    assert count_flops(slim, IMGSZ) < count_flops(model, IMGSZ)
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        for a, b in zip(model(x), slim(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("target", [0.5, 0.3])
@pytest.mark.parametrize("scope", ["global", "local"])
def test_selection_lands_within_3_percent_of_the_target(target, scope):
    model = nano()
    cost = CostModel(model, 320)
    keep = select_widths(cost, l1_norm(model), target, round_to=8, scope=scope)
    hidden = [[len(a), len(b)] for a, b in keep]
    assert all(w % 8 == 0 for pair in hidden for w in pair)
    frac = cost.widths_flops(hidden) / cost.dense
    assert target * 0.97 <= frac <= target
    assert count_flops(build_detector(config_for("nano", hidden=hidden)), 320) == cost.widths_flops(hidden)


def test_parameter_target_is_met_too():
    model = nano()
    cost = CostModel(model, 320)
    keep = select_widths(cost, l1_norm(model), 0.9, params_target=0.5, round_to=8)
    hidden = [[len(a), len(b)] for a, b in keep]
    assert cost.widths_params(hidden) <= 0.5 * cost.params


def test_regrowing_restores_the_saved_weights(synthetic_yaml, tmp_path):
    spec = load_dataset(synthetic_yaml)
    model = nano().train()
    trainer = EffpTrainer(model, spec, _cfg(tmp_path / "e", epochs=2), flops=0.5, log=lambda *_: None)
    before = [(b.cv1.conv.weight.detach().clone(), b.cv2.conv.weight.detach().clone()) for b in trainer.model.blocks]
    trainer.prune_step(step=trainer.total_iters)  # past the regrow window: every prunable filter zeroed
    zeroed = [[z.clone() for z in pair] for pair in trainer.zeroed]
    assert any(z.any() for pair in zeroed for z in pair)
    for b, (z1, z2) in zip(trainer.model.blocks, zeroed):
        assert torch.all(b.cv1.conv.weight[z1] == 0) and torch.all(b.cv1.bn.weight[z1] == 0)
        assert torch.all(b.cv2.conv.weight[z2] == 0) and torch.all(b.cv2.bn.bias[z2] == 0)
    trainer.prune_step(step=0)  # start of the window: every prunable filter regrown
    for b, (w1, w2), (z1, z2) in zip(trainer.model.blocks, before, zeroed):
        torch.testing.assert_close(b.cv1.conv.weight[z1], w1[z1])
        torch.testing.assert_close(b.cv2.conv.weight[z2], w2[z2])
    assert trainer.regrow_count(0, 100) == 100 and trainer.regrow_count(trainer.total_iters, 100) == 0
    half = trainer.regrow_count(int(0.375 * trainer.total_iters), 100)
    assert 40 <= half <= 60  # falls linearly


def test_the_final_set_is_fine_tuned_not_reselected(synthetic_yaml, tmp_path):
    """Once nothing is left to regrow, later steps only hold the zeroed filters at zero: a
    channel swap at the end of a run left stale BN statistics (demo AP50 0.909 -> 0.481)."""
    spec = load_dataset(synthetic_yaml)
    trainer = EffpTrainer(nano().train(), spec, _cfg(tmp_path / "e", epochs=2), flops=0.5, log=lambda *_: None)
    trainer.after_step(0)
    assert not trainer.final_set  # inside the regrow window
    last = trainer.total_iters - 1
    trainer.prune_step(step=last)
    assert trainer.final_set
    zeroed = [[z.clone() for z in pair] for pair in trainer.zeroed]
    for w in trainer.saved.values():  # saved gammas that a new selection would prefer to the live ones
        w["gamma"].fill_(100.0)
    with torch.no_grad():
        for b in trainer.model.blocks:  # training moved the weights, zeroed filters included
            b.cv1.conv.weight.add_(1.0)
            b.cv2.conv.weight.add_(1.0)
    trainer.after_step(trainer.interval * 2)
    trainer.after_step(last)
    assert all(torch.equal(a, b) for pa, pb in zip(zeroed, trainer.zeroed) for a, b in zip(pa, pb))
    for b, (z1, z2) in zip(trainer.model.blocks, zeroed):
        assert torch.all(b.cv1.conv.weight[z1] == 0) and torch.all(b.cv2.conv.weight[z2] == 0)
    # a resumed run holds the same filters from its first step
    resumed = EffpTrainer(nano().train(), spec, _cfg(tmp_path / "r", epochs=2), flops=0.5, log=lambda *_: None)
    resumed.load_extra(trainer.checkpoint_extra())
    assert resumed.final_set
    resumed.after_step(1)
    for b, (z1, z2) in zip(resumed.model.blocks, zeroed):
        assert torch.all(b.cv1.conv.weight[z1] == 0) and torch.all(b.cv2.bn.weight[z2] == 0)


def test_effp_run_meets_the_flops_target(dense_ckpt, synthetic_yaml, tmp_path):
    spec = load_dataset(synthetic_yaml)
    res = prune_checkpoint(dense_ckpt, spec, _cfg(tmp_path / "effp"), method="effp", flops=0.5,
                           log=lambda *_: None)
    assert 0.5 * 0.97 <= res["flops_fraction"] <= 0.5
    slim, ckpt = model_from_checkpoint(str(tmp_path / "effp" / "best.pt"))  # no pruning code needed
    assert ckpt["kind"] == "pruned" and slim.cfg.hidden == res["hidden"]


@pytest.mark.parametrize("method", ["l1", "slim", "fmcluster"])
def test_each_baseline_reaches_its_target(method, dense_ckpt, synthetic_yaml, tmp_path):
    spec = load_dataset(synthetic_yaml)
    res = prune_checkpoint(dense_ckpt, spec, _cfg(tmp_path / method), method=method, flops=0.5,
                           log=lambda *_: None)
    assert 0.5 * 0.97 <= res["flops_fraction"] <= 0.5, res["flops_fraction"]


def test_cluster_keep_picks_max_vg_per_cluster():
    # Two tight clusters of channels; the max-VG channel of each must survive.
    stats = torch.tensor([[0, 1.0, 0, 0], [0, 1.1, 0, 0], [10, 5.0, 10, 0], [10, 7.0, 10, 0]], dtype=torch.float64)
    assert cluster_keep(stats, 2).tolist() == [1, 3]


def test_pruned_model_exports_to_onnx_and_matches(tmp_path):
    import onnxruntime as ort

    from dynprune.export import export_onnx

    model = nano().eval()
    keep = select_widths(CostModel(model, IMGSZ), bn_gamma(model), 0.5)
    slim = slim_model(model, keep)
    path = export_onnx(slim, str(tmp_path / "slim.onnx"), IMGSZ)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    boxes, scores = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    with torch.no_grad():
        rb, rl = slim(x)
    np.testing.assert_allclose(boxes, rb.numpy(), atol=1e-4)
    np.testing.assert_allclose(scores, rl.sigmoid().numpy(), atol=1e-4)


def _duplicating_model(seed=0):
    """A tiny dense detector in which, in every block, hidden channel 1 of cv1 and of cv2 is an exact
    copy of channel 0 (filter and BatchNorm): removing channel 1 and merging loses nothing."""
    torch.manual_seed(seed)
    model = build_detector(tiny_config()).eval()
    randomize_bn(model, seed)
    with torch.no_grad():
        for b in model.blocks:
            for conv in (b.cv1, b.cv2):
                conv.conv.weight[1] = conv.conv.weight[0]
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(conv.bn, name)[1] = getattr(conv.bn, name)[0]
    return model


def test_merging_an_exactly_duplicated_channel_reproduces_the_unpruned_output():
    from dynprune.pruning.merge import merge_removed

    model = _duplicating_model()
    keep = [(torch.tensor([0] + list(range(2, b.h1))), torch.tensor([0] + list(range(2, b.h2)))) for b in model.blocks]
    merged, (done, removed) = merge_removed(model, keep)
    assert done == removed == 2 * len(model.blocks)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, plain, slim = model(x), slim_model(model, keep)(x), slim_model(merged, keep)(x)
    for a, b in zip(slim, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(plain, ref))  # pruning alone changes it


def test_merging_leaves_unlike_or_sign_flipped_channels_alone():
    from dynprune.pruning.merge import merge_removed

    model = _duplicating_model()
    with torch.no_grad():
        for b in model.blocks:  # channel 1's BN scale of opposite sign: z < 0, no merge
            b.cv1.bn.weight[1] = -b.cv1.bn.weight[0]
    keep = [(torch.tensor([0] + list(range(2, b.h1))), torch.arange(b.h2)) for b in model.blocks]
    _, (done, removed) = merge_removed(model, keep)
    assert (done, removed) == (0, len(model.blocks))
    _, (done, _) = merge_removed(_duplicating_model(), keep, threshold=1.01)  # no cosine reaches it
    assert done == 0


@pytest.mark.parametrize("method", ["effp", "l1", "slim", "fmcluster"])
def test_merge_runs_with_every_method_and_exports_to_onnx(method, dense_ckpt, synthetic_yaml, tmp_path):
    import onnxruntime as ort

    from dynprune.export import export_onnx

    spec = load_dataset(synthetic_yaml)
    res = prune_checkpoint(dense_ckpt, spec, _cfg(tmp_path / method), method=method, flops=0.5, merge=True,
                           log=lambda *_: None)
    assert res["merge"] and 0 <= res["merged_channels"] <= res["removed_channels"]
    if method != "effp":  # (EFFP zeroes most removed channels in training: nothing left to carry)
        assert res["merged_channels"] > 0
    slim, _ = model_from_checkpoint(str(tmp_path / method / "best.pt"))
    path = export_onnx(slim.eval(), str(tmp_path / "m.onnx"), IMGSZ)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    boxes, _ = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(boxes, slim(x)[0].numpy(), atol=1e-4)
