import math

import pytest
import torch

from dynprune.compact import CompactDetector
from dynprune.gates import Gate, set_gate_mode
from dynprune.layers import Bottleneck
from dynprune.manidp import (
    SCHEDULES,
    SaliencyStats,
    complexity_weights,
    remain_rate,
    similarity_loss,
    sparsity_loss,
)
from dynprune.model import build_detector
from tests.conftest import gated_model, random_gates, randomize_bn, require_compiled_blocks, tiny_config


def test_open_gates_equal_the_dense_model():
    model, dense = gated_model()
    set_gate_mode(model, "open")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), dense(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pad_to", [1, 3, (4, 8), (8, 1)])
def test_padded_kept_lists_change_nothing(pad_to):
    """Each gate's kept list padded to its own multiple with zero-scaled slots (the compiled CPU
    blocks): the same output and accounting, and the slot counts are padded multiples."""
    from dynprune.kernels.cpu_blocks import CompiledCpuBlock

    require_compiled_blocks()
    model, _ = gated_model(1, seed=4)
    random_gates(model, 4)
    x = torch.rand(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    pad1, pad2 = (pad_to, pad_to) if isinstance(pad_to, int) else pad_to
    with torch.no_grad():
        ref_boxes, ref_logits = model(x)
        ref_kept = [[int((m[0] > 0).sum()) for b in model.blocks for m in b.last["mask"]]]
        compact = CompactDetector(model, backend="cpu")
        for blk in compact.blocks:
            blk.pad_to = (pad1, pad2)
        boxes, logits = compact(x)
    assert all(isinstance(blk, CompiledCpuBlock) for blk in compact.blocks)
    torch.testing.assert_close(boxes, ref_boxes, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert compact.kept_counts().flatten(1).tolist() == ref_kept
    slots = [blk.kernel.counts[2:].tolist() for blk in compact.blocks]
    assert all(s1 % pad1 == 0 and s2 % pad2 == 0 for s1, s2 in slots)
    if max(pad1, pad2) > 1:  # some list was padded
        assert any(s1 > k1 or s2 > k2 for (s1, s2), (k1, k2) in zip(slots, compact.kept_counts()[0].tolist()))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_batch_images_keep_different_channel_sets(backend):
    model, _ = gated_model()
    set_gate_mode(model, "threshold")
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    for gate in gates:  # input-sensitive gates
        gate.fc1.weight.data.normal_(0, 3.0)
        gate.fc2.weight.data.normal_(0, 3.0)
    x = torch.rand(3, 3, 64, 64) * torch.tensor([0.2, 1.0, 3.0]).view(3, 1, 1, 1)
    with torch.no_grad():
        model(x)
        for blk in model.blocks:  # a threshold between the images' saliencies: they must disagree
            for gate, s in zip((blk.gate1, blk.gate2), blk.last["saliency"]):
                gate.threshold.fill_(float(s.min() + s.median()) / 2)
        model(x)
        sets = [torch.cat([(m[i] > 0) for b in model.blocks for m in b.last["mask"]]) for i in range(3)]
        if backend == "cpu":
            require_compiled_blocks()
        compact = CompactDetector(model, backend=backend)
        out = compact(x)
        kept = compact.kept_counts()
        single = [compact(x[i : i + 1]) for i in range(3)]
    assert not (torch.equal(sets[0], sets[1]) and torch.equal(sets[1], sets[2]))
    for i in range(3):
        torch.testing.assert_close(out[0][i], single[i][0][0], atol=1e-4, rtol=1e-4)  # box pixels
        assert torch.equal(kept[i].sum(), torch.tensor(int(sets[i].sum())))


@pytest.mark.parametrize("profile", [False, True])
def test_compiled_block_reads_each_frames_weights_when_counts_repeat(profile):
    """Frames one at a time: the kept-count arrays are made once per set of kept counts and
    reused, and the gathered weights are reused only when a frame keeps the last frame's channels,
    so frames that keep as many channels as an earlier one, but other channels, must still compute
    with their own gathered weights."""
    from dynprune.kernels.cpu_blocks import CompiledCpuBlock

    require_compiled_blocks()
    torch.manual_seed(0)
    block = Bottleneck(16, 16, 16).eval()
    randomize_bn(block, 0)
    block.add_gates(group=8)  # two groups a gate: few distinct counts, many distinct kept sets
    set_gate_mode(block, "threshold")
    for gate in (block.gate1, block.gate2):
        gate.fc1.weight.data.normal_(0, 3.0)
        gate.fc2.weight.data.normal_(0, 3.0)
        gate.threshold.fill_(1.0)
    compact = CompiledCpuBlock(block)
    compact.profile = profile
    sets_by_counts, reused, last_set, x_last = {}, [], None, None
    with torch.no_grad():
        for i in range(40):
            x = (torch.randn(1, 16, 6, 6) * 2).contiguous(memory_format=torch.channels_last)
            if i % 5 == 4:  # mostly the same frame again, with other saliencies: the same kept lists
                x = x_last * 1.05
            ref = block(x)
            out = compact(x)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            masks = [m[0] > 0 for m in block.last["mask"]]
            counts = [int(m.sum()) for m in masks]
            assert compact.last_kept.tolist() == [counts]
            kept_set = tuple(torch.cat(masks).tolist())
            sets_by_counts.setdefault(tuple(counts), set()).add(kept_set)
            if sum(counts) and min(counts):  # (a gate that keeps nothing takes no gather)
                reused.append((bool(compact.kernel.reused[0]), kept_set == last_set))
            last_set, x_last = kept_set, x
    assert len(compact._counts) == len(sets_by_counts) < 40  # reused
    assert any(len(sets) > 1 for sets in sets_by_counts.values())  # with other channels kept
    assert (compact.gate_ms > 0) == profile
    # the gathered weights were reused, and only when a frame kept the last frame's channels
    assert any(r for r, _ in reused) and not all(r for r, _ in reused)
    assert all(r <= same for r, same in reused)


def test_compiled_block_alternating_single_frames_and_batches():
    """A batch runs the same compiled call per image, rewriting the last gather: single frames
    after it must gather again, not reuse a gather made for another image."""
    from dynprune.kernels.cpu_blocks import CompiledCpuBlock

    require_compiled_blocks()
    torch.manual_seed(1)
    block = Bottleneck(16, 24, 24).eval()
    randomize_bn(block, 1)
    block.add_gates(group=8)
    set_gate_mode(block, "threshold")
    for gate in (block.gate1, block.gate2):  # saliencies near 2: a gather scaled twice shows in the output
        gate.fc1.weight.data.normal_(0, 2.0)
        gate.fc2.bias.data.fill_(2.0)
        gate.threshold.fill_(1.5)
    compact = CompiledCpuBlock(block)
    frames = [torch.randn(1, 16, 6, 6) * s for s in (0.5, 2.0)]
    with torch.no_grad():
        refs = [block(f) for f in frames]
        for batch in (False, False, True, False, True, False):
            if batch:
                out = compact(torch.cat([frames[1], frames[0]]))
                torch.testing.assert_close(out, torch.cat([refs[1], refs[0]]), atol=1e-4, rtol=1e-4)
            else:
                x = frames[0].contiguous(memory_format=torch.channels_last)
                torch.testing.assert_close(compact(x), refs[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_reference_block_really_skips_work(memory_format):
    """Counting multiply-adds proves the reference backend skips what its gates drop: past a gate
    that keeps nothing no 3x3 runs (a dense one would add 2 x 64 x 9 x 32 x 32)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dynprune.kernels.reference import ReferenceBlock

    block = Bottleneck(16, 32, 32).eval()
    block.add_gates()
    set_gate_mode(block, "threshold")
    x = torch.rand(1, 16, 8, 8).contiguous(memory_format=memory_format)
    with FlopCounterMode(display=False) as fc:
        pooled = x.mean((2, 3))
        block.gate1(pooled), block.gate2(pooled)
    gate_flops = fc.get_total_flops()
    block.gate1.threshold.fill_(1e9)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        ReferenceBlock(block)(x)
    # no 1x1 in, no 3x3 (its bias is the map): at most the output 1x1 over gate 2's channels
    assert fc.get_total_flops() <= gate_flops + 2 * 64 * 32 * 16
    block.gate1.threshold.fill_(0.0)
    block.gate2.threshold.fill_(1e9)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        ReferenceBlock(block)(x)
    assert gate_flops < fc.get_total_flops() <= gate_flops + 2 * 64 * 16 * 32  # cv1 only


def test_compiled_blocks_follow_the_input_size():
    """Frames of different sizes through one network (a stream that changes resolution): the
    compiled blocks' scratch grows for a larger input and is reused for a smaller one; the dense
    blocks measure their two forms per size."""
    from dynprune.compact import DenseInference
    from dynprune.fusion import FoldedBottleneck

    require_compiled_blocks()
    model, dense_model = gated_model(8, seed=2)
    random_gates(model, 2, empty_every=5)
    compact, dense = CompactDetector(model), DenseInference(dense_model)
    with torch.no_grad():
        for size in (64, 96, 32, 96, 64, 128):
            x = torch.rand(1, 3, size, size).contiguous(memory_format=torch.channels_last)
            for got, ref in zip(compact(x), model(x)):
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
            for got, ref in zip(dense(x), dense_model(x)):
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert all(blk._counts for blk in compact.blocks)
    folded = [m for m in dense.modules() if isinstance(m, FoldedBottleneck)]
    assert all(len(m._forms.trials) == 4 for m in folded)  # four input sizes each


def test_compiled_block_really_skips_work():
    """The compiled block's products count the multiply-adds they run (whole vectors): the compact
    widths' work, not the dense block's, and none past a gate that keeps nothing."""
    from dynprune.kernels.cpu_blocks import CompiledCpuBlock

    require_compiled_blocks()
    torch.manual_seed(0)
    c, hidden, h, w = 16, 64, 8, 10
    block = Bottleneck(c, hidden, hidden).eval()
    randomize_bn(block, 0)
    block.add_gates(group=8)
    set_gate_mode(block, "threshold")
    for gate in (block.gate1, block.gate2):
        gate.fc2.weight.data.normal_(0, 1.0)
        gate.fc2.bias.data.uniform_(0.0, 1.0)
        gate.threshold.fill_(0.8)
    x = torch.rand(1, c, h, w).contiguous(memory_format=torch.channels_last)

    def run():
        compact = CompiledCpuBlock(block)
        with torch.no_grad():
            out, ref = compact(x), block(x)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert compact._counts  # the single-image call ran
        return compact.kernel, [int(v) for v in compact.kernel.counts]

    native, (kept1, kept2, slots1, slots2) = run()
    assert 0 < kept1 < hidden and 0 < kept2 < hidden
    vl = native.vector_floats
    up = lambda n: -(-n // vl) * vl  # noqa: E731
    compact_macs = h * w * (c * up(slots1) + 9 * slots1 * up(slots2) + slots2 * up(c))
    assert int(native.macs[0]) == compact_macs
    assert compact_macs < 0.8 * h * w * (c * hidden + 9 * hidden * hidden + hidden * c)
    block.gate1.threshold.fill_(1e9)  # gate 1 keeps nothing: one constant row through cv3
    native, (kept1, kept2, _, slots2) = run()
    assert kept1 == 0 and kept2 > 0 and int(native.macs[0]) == slots2 * c
    block.gate2.threshold.fill_(1e9)  # nothing reaches cv3: shortcut plus bias
    native, (_, kept2, _, _) = run()
    assert kept2 == 0 and int(native.macs[0]) == 0


def test_complexity_weights_by_hand():
    loss = torch.tensor([0.1, 0.5, 1.0, 2.0])
    c = 1.0
    w = complexity_weights(loss, c, beta=2.0)
    torch.testing.assert_close(w, torch.tensor([0.81, 0.25, 0.0, 0.0]))
    torch.testing.assert_close(complexity_weights(loss, c, beta=1.0), torch.tensor([0.9, 0.5, 0.0, 0.0]))


def test_sparsity_loss_by_hand():
    s1 = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # per-image channel means 2, 2
    s2 = torch.tensor([[0.0, 0.0, 3.0], [3.0, 3.0, 3.0]])  # means 1, 3
    w = torch.tensor([0.5, 1.0])
    expected = (0.5 * 2 + 1.0 * 2) / 2 + (0.5 * 1 + 1.0 * 3) / 2
    assert float(sparsity_loss([s1, s2], w)) == pytest.approx(expected)


def test_similarity_loss_by_hand():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # orthogonal: cos-sim = identity
    sal = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # identical: cos-sim = all ones
    # diff = [[0, -1], [-1, 0]] -> squared Frobenius 2, over B^2 = 4
    assert float(similarity_loss(feats, sal)) == pytest.approx(0.5)
    assert float(similarity_loss(feats, feats.clone())) == pytest.approx(0.0, abs=1e-7)


def test_gradients_reach_the_gates():
    model, _ = gated_model()
    model.train()
    set_gate_mode(model, "threshold")
    boxes, logits = model(torch.rand(2, 3, 64, 64))
    from dynprune.manidp import collect

    sal, feats = collect(model.blocks)
    loss = logits.sum() + boxes.mean() + sum(similarity_loss(f, s) for s, f in zip(sal, feats))
    loss.backward()
    gates = [g for b in model.blocks for g in (b.gate1, b.gate2)]
    for g in gates:
        assert g.fc2.bias.grad is not None and g.fc2.bias.grad.abs().sum() > 0
        assert g.fc2.weight.grad.abs().sum() > 0
    # fc1 learns through a ReLU: a gate whose hidden units are all inactive on this batch gets
    # no gradient there, as in ManiDP; nearly every gate must get one.
    live = sum(bool(g.fc1.weight.grad.abs().sum() > 0) for g in gates)
    assert live >= 0.75 * len(gates)


@pytest.mark.parametrize("schedule", ["settle", "paper"])
def test_stepwise_remain_schedule_reaches_the_target_at_its_reach(synthetic_yaml, tmp_path, schedule):
    from dynprune.data import load_dataset
    from dynprune.train.engine import TrainConfig
    from dynprune.train.gate import GateTrainer

    model, _ = gated_model()
    cfg = TrainConfig(epochs=4, batch=8, imgsz=64, workers=0, out=str(tmp_path))
    t = GateTrainer(model.train(), load_dataset(synthetic_yaml), cfg, keep=0.3, threshold_every=5,
                    schedule=schedule, log=lambda *_: None)
    rates = [t.remain_at(s) for s in range(t.total_iters)]
    assert rates[0] < 1.0 and all(a >= b - 1e-12 for a, b in zip(rates, rates[1:]))
    reach = math.ceil(SCHEDULES[schedule] * t.total_iters) - 1
    assert rates[reach] == pytest.approx(0.3) and rates[reach - 1] > 0.3 and rates[-1] == pytest.approx(0.3)
    # best.pt may come from the first epoch whose last step is at the target, not only later ones
    ends = [(e + 1) * t.iters_per_epoch - 1 for e in range(cfg.epochs)]
    first_at_target = next(e for e, end in enumerate(ends) if rates[end] == pytest.approx(0.3))
    assert t.min_best_epoch == first_at_target
    if schedule == "settle":
        assert first_at_target < cfg.epochs - 1


def test_remain_rate_schedule():
    assert remain_rate(-1, 10, 0.5) == pytest.approx(1.0)
    assert remain_rate(9, 10, 0.5) == pytest.approx(0.5)
    rates = [remain_rate(e, 10, 0.5) for e in range(10)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    settle = [remain_rate(e, 20, 0.5, reach=0.65) for e in range(20)]
    assert settle[11] > 0.5 and all(r == pytest.approx(0.5) for r in settle[12:])
    assert all(a >= b - 1e-12 for a, b in zip(settle, settle[1:]))


@pytest.mark.parametrize("schedule, first", [("settle", 12), ("paper", 19)])
def test_per_epoch_schedule_settles_before_the_end_and_best_pt_waits_for_it(synthetic_yaml, tmp_path, schedule,
                                                                            first):
    """With 20 epochs the settle schedule runs epochs 12-19 at the target thresholds (best.pt is
    chosen among them); the official schedule only the last."""
    from dynprune.data import load_dataset
    from dynprune.train.engine import TrainConfig
    from dynprune.train.gate import GateTrainer

    model, _ = gated_model()
    cfg = TrainConfig(epochs=20, batch=8, imgsz=64, workers=0, out=str(tmp_path))
    t = GateTrainer(model.train(), load_dataset(synthetic_yaml), cfg, keep=0.4, schedule=schedule,
                    log=lambda *_: None)
    remains = [t._epoch_remain(e) for e in range(1, 20)]
    assert t.min_best_epoch == first
    assert all(r == 0.4 for r in remains[first - 1:]) and all(r > 0.4 for r in remains[:first - 1])


def test_gate_warns_when_accuracy_falls_far_below_dense():
    from dynprune.train.gate import accuracy_shortfall

    note = accuracy_shortfall({"ap50": 0.40}, {"ap50": 0.60}, keep=0.5, epochs=20)
    assert "AP50 0.400 is 20.0 points below the dense model's 0.600" in note
    assert "--epochs 40" in note and "higher --keep (0.7)" in note
    assert "--gate fbs" in note and note.index("--distill 1.0") < note.index("--epochs 40")
    assert "--distill" not in accuracy_shortfall({"ap50": 0.40}, {"ap50": 0.60}, keep=0.5, epochs=20, distill=1.0)
    assert accuracy_shortfall({"ap50": 0.57}, {"ap50": 0.60}, keep=0.5, epochs=20) is None
    assert accuracy_shortfall({}, {"ap50": 0.60}, keep=0.5, epochs=20) is None


@pytest.mark.parametrize("remain", [0.25, 0.5, 0.75])
def test_thresholds_keep_the_intended_fraction_on_the_training_set(remain):
    model, _ = gated_model()
    set_gate_mode(model, "threshold")
    for gate in (m for m in model.modules() if isinstance(m, Gate)):
        gate.fc2.weight.data.normal_(0, 0.5)
    images = torch.rand(16, 3, 64, 64)
    stats = SaliencyStats(model.blocks)
    with torch.no_grad():
        for chunk in images.split(4):
            model(chunk)
            stats.update(model.blocks)
        stats.apply_thresholds(remain)
        model(images)
    for gate, total in zip(stats.gates, stats.sums):
        mean = (total / stats.count).float()
        kept_channels = int((mean >= gate.threshold).sum())
        assert kept_channels == math.ceil(remain * gate.groups)
    # And on the images themselves, the mean per-image kept fraction lands near the target.
    fractions = []
    for blk in model.blocks:
        for m in blk.last["mask"]:
            fractions.append(float((m > 0).float().mean()))
    assert abs(sum(fractions) / len(fractions) - remain) < 0.15


@pytest.mark.parametrize("remain", [0.25, 0.5, 0.75])
def test_frame_thresholds_keep_the_fraction_of_each_frames_channels(remain):
    """keep_on="frames": each layer keeps ``remain`` of the (frame, channel) saliencies it was
    set on, so the mean per-frame keep is the target (ManiDP's mean rule keeps fewer)."""
    model, _ = gated_model()
    set_gate_mode(model, "threshold")
    for gate in (m for m in model.modules() if isinstance(m, Gate)):
        gate.fc1.weight.data.normal_(0, 1.0)
        gate.fc2.weight.data.normal_(0, 0.5)
        gate.fc2.bias.data.uniform_(0.5, 1.5)  # no ties between channels (ties are kept together)
    images = torch.rand(16, 3, 64, 64) * torch.linspace(0.2, 1.0, 16).view(16, 1, 1, 1)
    stats = SaliencyStats(model.blocks, keep_on="frames")
    with torch.no_grad():
        for chunk in images.split(4):
            model(chunk)
            stats.update(model.blocks)
        stats.apply_thresholds(remain)
    for gate, values in zip(stats.gates, stats.values):
        pool = torch.cat(values)
        kept = float(((pool >= gate.threshold) & (pool > 0)).float().mean())
        positive = float((pool > 0).float().mean())
        assert kept == pytest.approx(min(remain, positive), abs=1.0 / pool.numel() + 1e-6)
    with pytest.raises(ValueError, match="keep_on"):
        SaliencyStats(model.blocks, keep_on="median")


@pytest.mark.parametrize("threshold_every", [0, 2])
def test_gate_training_saves_the_model_it_validated(synthetic_yaml, tmp_path, threshold_every):
    """best.pt is validated with its gates thresholded (not open), at the target keep ratio,
    and re-validating the saved file reproduces the recorded AP exactly."""
    from dynprune.checkpoint import make_checkpoint, model_from_checkpoint, save_atomic
    from dynprune.data import load_dataset
    from dynprune.train.engine import TrainConfig
    from dynprune.train.gate import train_gates
    from dynprune.validate import run_validation

    spec = load_dataset(synthetic_yaml)
    dense = build_detector(tiny_config()).eval()
    randomize_bn(dense)
    save_atomic(make_checkpoint(dense, spec.names, 64, "dense"), tmp_path / "dense.pt")
    # On the CPU, as the re-validation below: on a GPU its floats differ in the last bits.
    cfg = TrainConfig(epochs=3, batch=8, imgsz=64, lr=1e-3, workers=0, out=str(tmp_path / "gate"), mosaic=0.0,
                      device="cpu")
    res = train_gates(str(tmp_path / "dense.pt"), spec, cfg, keep=0.5, log=lambda *_: None,
                      threshold_every=threshold_every)
    last = res["history"][-1]
    assert last["flops_mean"] < 0.95  # the validated network really was gated
    model, ckpt = model_from_checkpoint(str(tmp_path / "gate" / "best.pt"))
    if threshold_every == 0:
        assert ckpt["epoch"] in (1, 2)  # only epochs at the target thresholds may be best (settle: 1 and 2)
    again = run_validation(model, spec.val, spec.names, 64)
    assert again["ap50_95"] == pytest.approx(ckpt["metrics"]["ap50_95"], abs=1e-9)
    assert again["flops_mean"] == pytest.approx(ckpt["metrics"]["flops_mean"], abs=1e-9)


@pytest.mark.parametrize("channels_last", [True, False])
def test_triton_block_pool_is_the_global_average(channels_last):
    """The GPU engine's pool (a matrix-vector product on NHWC memory) is the plain mean."""
    from dynprune.kernels.triton_block import TritonBlock

    x = torch.randn(3, 16, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(TritonBlock.pool(x), x.mean((2, 3)))
    torch.testing.assert_close(TritonBlock.pool(x[:1]), x[:1].mean((2, 3)))  # cached row, new batch


def test_gate_bias_starts_ordered_by_importance_and_finite_for_a_single_group():
    """init_from_importance: saliency ~1, ordered by importance; a layer as wide as its group (one
    group, whose std() is NaN) starts at exactly 1 instead of NaN (it made group-8 training of an
    8-channel layer diverge at once)."""
    from dynprune.gates import Gate, init_from_importance

    importance = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4])
    gate = Gate(16, 8, group=1)
    init_from_importance(gate, importance)
    bias = gate.fc2.bias.detach()
    assert torch.equal(bias.argsort(), importance.argsort()) and abs(float(bias.mean()) - 1.0) < 1e-6
    for group in (8, 16):  # 8 channels: a single group
        gate = Gate(16, 8, group=group)
        init_from_importance(gate, importance)
        assert torch.equal(gate.fc2.bias.detach(), torch.ones(1))


def test_keep_shortfall_names_the_cause():
    from dynprune.train.gate import keep_shortfall

    result = {"last": {"keep_mean": 0.20}}
    assert keep_shortfall({"last": {"keep_mean": 0.45}}, 0.5) is None  # within the margin
    assert keep_shortfall({"last": {}}, 0.5) is None  # no gated validation ran
    assert "--keep 0.8" in keep_shortfall(result, 0.5, method="fbs")
    assert "--sparsity" in keep_shortfall(result, 0.5, complexity=False)
    assert "--keep-on frames" in keep_shortfall(result, 0.5, keep_on="mean")
    note = keep_shortfall(result, 0.5, keep_on="frames")
    assert note.startswith("the gates keep 0.20") and "calibrate --keep 0.5" in note


def test_distillation_trains_the_gated_model_toward_a_frozen_dense_teacher(synthetic_yaml, tmp_path):
    """--distill: a training step computes a finite block-output loss against the dense teacher on
    the same images, its gradient reaches the student, the teacher never changes, and the gate
    record says it was used (so --resume takes it)."""
    import copy

    from dynprune.checkpoint import load_checkpoint
    from dynprune.data import load_dataset
    from dynprune.train.engine import TrainConfig
    from dynprune.train.gate import GateTrainer

    model, dense = gated_model()
    teacher_before = copy.deepcopy(dense.state_dict())
    cfg = TrainConfig(epochs=2, batch=8, imgsz=64, workers=0, out=str(tmp_path))
    t = GateTrainer(model.train(), load_dataset(synthetic_yaml), cfg, keep=0.5, distill=1.0, teacher=dense,
                    log=lambda *_: None)
    x = torch.rand(4, 3, 64, 64)
    t.model.train()
    boxes, logits = t.model(x)
    loss = t.distill_loss()
    assert torch.isfinite(loss) and float(loss.detach()) > 0 and len(t._teacher_out) == len(t.model.blocks)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.model.parameters())
    t.model.zero_grad()
    t.fit()
    for k, v in t.teacher.state_dict().items():
        torch.testing.assert_close(v.cpu(), teacher_before[k])
    assert load_checkpoint(tmp_path / "last.pt")["gate"]["distill"] == 1.0
    with pytest.raises(ValueError, match="teacher"):
        GateTrainer(gated_model()[0], load_dataset(synthetic_yaml), cfg, distill=1.0)
