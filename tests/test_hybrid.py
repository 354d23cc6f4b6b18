"""The hybrid engine: gates trained into a statically pruned detector, whose hidden widths differ
from block to block (and, with ``--round-to 1``, are no multiple of the gate group)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dynprune.cli import main
from dynprune.compact import CompactDetector
from dynprune.flops import CostModel
from dynprune.gates import set_gate_mode
from dynprune.model import build_detector
from dynprune.pruning.importance import l1_norm
from dynprune.pruning.select import select_widths
from dynprune.pruning.surgery import slim_model
from dynprune.serve.policy import FallbackPolicy
from tests.conftest import random_gates, randomize_bn, require_compiled_blocks, tiny_config
from tests.test_backends import BACKENDS

IMGSZ = 64


def pruned_model(round_to: int, seed: int = 0):
    """A tiny detector (BN randomized, wider than the CI model so that pruning leaves odd widths)
    slimmed by L1 to half its FLOPs."""
    torch.manual_seed(seed)
    dense = build_detector(tiny_config(widths=(8, 16, 24, 16), expansion=1.5)).eval()
    randomize_bn(dense, seed)
    keep = select_widths(CostModel(dense, IMGSZ), l1_norm(dense), 0.5, round_to=round_to)
    return slim_model(dense, keep).eval(), dense


def masked_pruned_output(pruned, gated, x):
    """The pruned model (no gates) with each block's hidden activations multiplied by the masks the
    gated twin chose for ``x``: the definition of gates on a pruned model."""
    with torch.no_grad():
        gated(x)
    masks = [b.last["mask"] for b in gated.blocks]
    hooks = []
    for b, (m1, m2) in zip(pruned.blocks, masks):
        hooks.append(b.cv1.register_forward_hook(lambda mod, i, out, m=m1: out * m[:, :, None, None]))
        hooks.append(b.cv2.register_forward_hook(lambda mod, i, out, m=m2: out * m[:, :, None, None]))
    try:
        with torch.no_grad():
            return pruned(x)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("round_to", [1, 8])
def test_open_gates_on_a_pruned_model_are_the_pruned_model(round_to):
    pruned, dense = pruned_model(round_to)
    widths = [(b.h1, b.h2) for b in pruned.blocks]
    assert widths != [(b.h1, b.h2) for b in dense.blocks] and len(set(widths)) > 1  # widths differ per block
    if round_to == 1:
        assert any(w % 8 for pair in widths for w in pair)  # partial last groups
    gated = copy.deepcopy(pruned)
    gated.add_gates(group=8)
    set_gate_mode(gated, "open")
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        for got, want in zip(gated(x), pruned(x)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_hybrid_compact_execution_equals_the_masked_pruned_model(backend, round_to, seed):
    if backend == "cpu":
        require_compiled_blocks()
    pruned, _ = pruned_model(round_to, seed)
    gated = copy.deepcopy(pruned)
    gated.add_gates(group=8)
    random_gates(gated, seed)
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    want_boxes, want_logits = masked_pruned_output(pruned, gated, x)
    with torch.no_grad():
        torch.testing.assert_close(gated(x)[1], want_logits, atol=1e-5, rtol=1e-5)
        compact = CompactDetector(gated, backend=backend)
        boxes, logits = compact(x)
    assert compact.backend == backend
    torch.testing.assert_close(boxes, want_boxes, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    kept = compact.kept_counts()
    ref = [[int((m[i] > 0).sum()) for b in gated.blocks for m in b.last["mask"]] for i in range(2)]
    assert kept.flatten(1).tolist() == ref
    assert (kept == 0).any() and (kept > 0).any()


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    """dense -> ``dynprune prune --method l1 --round-to 1`` -> ``dynprune gate`` on the pruned checkpoint, distilled
    from the dense model; and gates on the dense model."""
    from dynprune.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("hybrid")
    data = write_synthetic(str(root / "syn"), n_train=16, n_val=4, seed=5, size=64)
    common = ["--data", data, "--epochs", "1", "--imgsz", "64", "--batch", "8", "--workers", "0"]
    assert main(["train", *common, "--out", str(root / "dense")]) == 0
    assert main(["prune", "--weights", str(root / "dense" / "best.pt"), *common, "--method", "l1", "--flops", "0.6",
                 "--round-to", "1", "--out", str(root / "prune")]) == 0
    assert main(["gate", "--weights", str(root / "prune" / "best.pt"), *common, "--out", str(root / "hybrid"),
                 "--teacher", str(root / "dense" / "best.pt")]) == 0
    assert main(["gate", "--weights", str(root / "dense" / "best.pt"), *common, "--out", str(root / "gate")]) == 0
    return {"root": root, "data": data}


def test_dynprune_gate_trains_gates_into_a_pruned_checkpoint(hybrid_run, capsys):
    from dynprune.checkpoint import load_checkpoint, model_from_checkpoint

    root = hybrid_run["root"]
    pruned = load_checkpoint(str(root / "prune" / "best.pt"))
    hybrid, ckpt = model_from_checkpoint(str(root / "hybrid" / "best.pt"))
    assert ckpt["gated"] and ckpt["config"]["hidden"] == pruned["config"]["hidden"]
    assert [[b.h1, b.h2] for b in hybrid.blocks] == [list(w) for w in pruned["config"]["hidden"]]
    assert all(b.gated and b.gate1.group == 8 for b in hybrid.blocks)
    extra = ckpt["train_config"]["extra"]
    assert extra["dense"] == str(root / "prune" / "best.pt") and extra["teacher"] == str(root / "dense" / "best.pt")


def test_a_teacher_must_match_the_blocks(hybrid_run, tmp_path, capsys):
    root, data = hybrid_run["root"], hybrid_run["data"]
    args = ["gate", "--weights", str(root / "prune" / "best.pt"), "--data", data, "--epochs", "1", "--imgsz", "64",
            "--workers", "0", "--out", str(tmp_path / "g")]
    assert main([*args, "--teacher", str(root / "gate" / "best.pt")]) == 2
    assert "not a gated one" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    from dynprune.checkpoint import make_checkpoint, save_atomic

    save_atomic(make_checkpoint(build_detector(tiny_config(widths=(8, 16, 16, 32))), ["ring"], 64, "dense"), str(other))
    assert main([*args, "--teacher", str(other)]) == 2
    assert "blocks' widths differ" in capsys.readouterr().err
    assert not (tmp_path / "g" / "best.pt").exists()


def test_export_hybrid_bench_and_serve(hybrid_run, tmp_path, capsys):
    root, data = hybrid_run["root"], hybrid_run["data"]
    out = tmp_path / "bundle"
    assert main(["export", "--dynamic", str(root / "gate" / "best.pt"), "--hybrid", str(root / "hybrid" / "best.pt"),
                 "-o", str(out)]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    # static from the pruned model the hybrid gates were trained into, dense from the dynamic gates' record
    assert set(meta["engines"]) == {"dense", "static", "dynamic", "hybrid"}
    # all channels kept, the hybrid engine costs the pruned model and its gates
    static_gflops = meta["engines"]["static"]["gflops"]
    assert static_gflops < meta["engines"]["hybrid"]["gflops"] < 1.05 * static_gflops
    assert main(["bench", str(out), "--data", data, "--frames", "4", "--out", str(tmp_path / "bench")]) == 0
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    rows = {r["engine"]: r for r in bench["rows"]}
    assert set(rows) == {"dense", "static", "dynamic", "hybrid"}
    assert 0 <= rows["hybrid"]["keep_mean"] <= 1 and rows["hybrid"]["gflops"] <= rows["static"]["gflops"] + 1e-9
    assert set(bench["break_even"]) == {"dynamic", "hybrid"}
    assert "hybrid" in capsys.readouterr().out
    assert main(["serve", str(out), "--source", str(hybrid_run["root"] / "syn" / "images" / "val"),
                 "--engine", "hybrid", "--frames", "3"]) == 0
    capsys.readouterr()
    assert main(["doctor", str(out), "--json"]) == 0
    engines = json.loads(capsys.readouterr().out)["Bundle"]["engines"]
    assert engines["hybrid"]["runs"] and engines["hybrid"]["reason"].startswith("cpu backend")


def test_each_gated_checkpoint_goes_to_its_own_flag(hybrid_run, tmp_path, capsys):
    root = hybrid_run["root"]
    assert main(["export", "--dynamic", str(root / "hybrid" / "best.pt"), "-o", str(tmp_path / "a")]) == 2
    assert "export it with --hybrid" in capsys.readouterr().err
    assert main(["export", "--hybrid", str(root / "gate" / "best.pt"), "-o", str(tmp_path / "b")]) == 2
    assert "export it with --dynamic" in capsys.readouterr().err


@pytest.mark.parametrize("gated", ["dynamic", "hybrid"])
def test_route_by_keep_sends_dense_frames_of_a_gated_engine_to_static(gated):
    """Frames that keep more than the gated engine's break-even run on static; sparser ones stay."""
    pol = FallbackPolicy([gated, "static"], {}, warmup=1, probe_every=0, route_by_keep=True)
    pol.record(pol.choose(), 5.0, keep_ratio=0.5)
    pol.record(pol.choose(), 6.0)
    for i in range(20):  # latency = 10 * keep: static's 6 ms at keep 0.6
        keep = 0.1 + 0.02 * i
        assert pol.choose() == gated
        pol.record(gated, 10 * keep, keep_ratio=keep)
    assert pol.active == gated and pol.break_even(gated) == pytest.approx(0.6, abs=0.05)
    pol.record(gated, 8.0, keep_ratio=0.8)  # the last frame kept 0.8, above break-even
    assert pol.choose() == "static"
    pol.record(gated, 2.0, keep_ratio=0.2)
    assert pol.choose() == gated
