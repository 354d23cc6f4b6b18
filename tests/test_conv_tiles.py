"""Tiles of the Triton gather convolution: both loop forms and every candidate tile against the
reference (TRITON_INTERPRET=1 on the CPU), the tuned table per GPU and SM count, recording a real
engine's convolutions and keeping the fastest correct tile. Timing itself needs a GPU: here the
timer is a stand-in."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dynprune.kernels import conv_tiles
from dynprune.kernels.conv_tiles import LayerKey, candidate_tiles, default_tile
from dynprune.kernels.reference import build_keep_index, gather_conv2d_padded

triton = pytest.importorskip("triton", reason="Triton is not installed")
ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from triton.runtime.errors import OutOfResources  # noqa: E402

from dynprune.kernels.gather_conv import gather_conv2d_triton, with_layout  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test reads and writes its own cache folder; no table read before leaks into it."""
    monkeypatch.setenv("DYNPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    conv_tiles.forget_tables()
    yield
    conv_tiles.forget_tables()


def run_masks(b, c, run, counts, gen):
    m = torch.zeros(b, c // run, dtype=torch.bool)
    for i, n in enumerate(counts):
        m[i, torch.randperm(c // run, generator=gen)[:n]] = True
    return m.repeat_interleave(run, 1)


def layer(c_in, c_out, k, h, w, run, in_counts, out_counts, seed=0, stride=1):
    """One layer's inputs with kept lists of whole runs, and the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    b = len(in_counts)
    x = torch.randn(b, c_in, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5
    bias = torch.randn(c_out, generator=g)
    scale = torch.rand(b, c_out, generator=g)
    ii, ic = build_keep_index(run_masks(b, c_in, run, in_counts, g).float())
    oi, oc = build_keep_index(run_masks(b, c_out, run, out_counts, g).float())
    ref = gather_conv2d_padded(x.double(), weight.double(), bias.double(), ii, ic, oi, oc, stride, k // 2, "silu",
                               scale.double())
    args = [t.to(DEVICE) for t in (x, with_layout(weight, "ohwi"), bias, ii, ic, oi, oc)]
    return args, scale.to(DEVICE), ref, oc.tolist()


def check(out, ref, counts):
    for i, n in enumerate(counts):
        torch.testing.assert_close(out[i, :n].double().cpu(), ref[i, :n], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("run,stride,in_counts,out_counts", [(1, 1, [0, 5, 17, 32], [32, 9, 1, 0]),
                                                             (1, 2, [32, 1, 0, 20], [3, 32, 0, 31]),
                                                             (8, 1, [0, 1, 2, 4], [4, 2, 1, 0])])
def test_the_flat_loop_matches_the_reference(run, stride, in_counts, out_counts):
    """The flat loop (taps and input steps in one loop) computes the same convolution: several
    input steps, counts of nothing, some and all (``run`` 8: counts in groups), stride 2."""
    args, scale, ref, counts = layer(32, 32, 3, 7, 6, run, in_counts, out_counts, seed=run + stride, stride=stride)
    for flat in (0, 1):
        out = torch.zeros_like(ref, dtype=torch.float32, device=DEVICE).contiguous(memory_format=torch.channels_last)
        gather_conv2d_triton(*args, stride=stride, padding=1, act="silu", scale=scale, out=out, block_k=16,
                             block_n=16, in_run=run, out_run=run, flat=flat)
        check(out, ref, counts)


@pytest.mark.parametrize("k,run", [(3, 8), (1, 8), (3, 1)])
def test_every_candidate_tile_computes_the_same_convolution(k, run):
    """Tuning may pick any candidate: each one, on a layer large enough to admit all of them."""
    c_in, c_out, h, w = 64, 128, 12, 12
    args, scale, ref, counts = layer(c_in, c_out, k, h, w, run, [c_in // run // 2], [c_out // run - 1], seed=k)
    key = LayerKey(c_out, c_in, k, 1, h, w, 1, "float32", True, True, run, run, False)
    tiles = candidate_tiles(key)
    assert tiles[0] == default_tile(c_out, c_in, k, h * w, run)
    assert len({json.dumps(t, sort_keys=True) for t in tiles}) == len(tiles)
    assert any(t["flat"] for t in tiles) == (k > 1)
    for tile in tiles:
        assert tile["block_k"] % run == 0 and tile["block_n"] % run == 0
        out = torch.zeros_like(ref, dtype=torch.float32, device=DEVICE).contiguous(memory_format=torch.channels_last)
        try:
            gather_conv2d_triton(*args, padding=k // 2, act="silu", scale=scale, out=out, in_run=run, out_run=run,
                                 tile=tile)
        except OutOfResources:  # a GPU's shared memory or registers (fp32 here): tuning refuses such a tile
            assert ON_GPU
            continue
        check(out, ref, counts)


def test_candidates_fit_the_layer_and_keep_the_run_promises():
    small = LayerKey(24, 16, 3, 1, 5, 5, 1, "float16", True, True, 8, 8, False)
    default, *others = candidate_tiles(small)
    assert default["block_k"] == 64  # the shape's default is tried whatever its size
    for tile in others:
        assert tile["block_k"] % 8 == 0 and tile["block_n"] % 8 == 0
        assert tile["block_m"] <= 32 and tile["block_n"] <= 32 and tile["block_k"] <= 16


def fake_gpu(monkeypatch, sms):
    """Table keys of a stand-in GPU whose SMs in use are ``sms[0]``."""
    monkeypatch.setattr(conv_tiles, "gpu_table_key", lambda device, n: f"Stand-in GPU | {n} SMs")
    monkeypatch.setattr(conv_tiles, "sms_in_use", lambda device: sms[0])


def test_an_ungated_layer_runs_on_cudnn_unless_a_fused_tile_is_tuned(monkeypatch):
    """TritonConv: the stem-like 3x3/2 with SiLU and a prediction 1x1 without, in both forms,
    equal to the layer it replaces; its default is cuDNN, a tuned Triton tile takes over."""
    from dynprune.fusion import FoldedConv, PointwiseConv
    from dynprune.kernels.triton_layers import TritonConv
    from dynprune.layers import ConvBNAct

    torch.manual_seed(0)
    conv = ConvBNAct(16, 24, 3, 2).eval()
    conv.bn.running_mean.uniform_(-1, 1)
    conv.bn.running_var.uniform_(0.5, 2)
    layers = [FoldedConv(conv), PointwiseConv(torch.nn.Conv2d(24, 5, 1))]
    x = torch.randn(2, 16, 14, 12).contiguous(memory_format=torch.channels_last)
    sms = [8]
    fake_gpu(monkeypatch, sms)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 on a GPU: compared at 1e-4
    with torch.no_grad():
        for layer, inp in ((layers[0], x), (layers[1], layers[0](x))):
            ref = layer(inp)
            triton_conv = TritonConv(layer).to(DEVICE, memory_format=torch.channels_last)
            with conv_tiles.record_calls() as calls:
                out = triton_conv(inp.to(DEVICE))
            [call] = calls
            assert not call.key.in_listed and not call.key.out_listed
            assert conv_tiles.candidate_tiles(call.key)[0] == conv_tiles.CUDNN
            assert conv_tiles.tile_for(call.key, torch.device("cuda")) == conv_tiles.CUDNN
            torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
            for tile in conv_tiles.candidate_tiles(call.key)[1:4]:
                torch.testing.assert_close(call.run(tile, torch.zeros_like(call.out_like)).cpu(), ref, atol=1e-4,
                                           rtol=1e-4)
            fused = {**conv_tiles.candidate_tiles(call.key)[1], "flat": 1}
            conv_tiles.write_table("Stand-in GPU | 8 SMs", {call.key.text(): {"tile": fused}}, {"sms": 8})
            assert conv_tiles.tile_for(call.key, torch.device("cuda")) == fused
    assert set(conv_tiles.read_tables()["Stand-in GPU | 8 SMs"]["layers"]) == {
        c.text() for c in (conv_tiles.LayerKey(24, 16, 3, 2, 7, 6, 2, "float32", False, False, 1, 1, False),
                           conv_tiles.LayerKey(5, 24, 1, 1, 7, 6, 2, "float32", False, False, 1, 1, False))}
    with pytest.raises(ValueError, match="un-gated layers only"):
        gather_conv2d_triton(x.to(DEVICE), layers[0].weight, None, None, None, None, None, 2, 1,
                             scale=torch.ones(2, 24, device=DEVICE))


def test_a_tuned_tile_is_used_on_its_gpu_at_its_sm_count_only(monkeypatch):
    sms = [8]
    fake_gpu(monkeypatch, sms)
    cuda = torch.device("cuda")
    key = LayerKey(64, 64, 3, 1, 80, 80, 1, "float16", True, True, 8, 8, False)
    default = default_tile(64, 64, 3, 6400, 8)
    tuned = {**default, "block_m": 128, "block_n": 64, "flat": 1}
    assert conv_tiles.tile_for(key, cuda) == default
    assert "default tiles" in conv_tiles.tuning_state(cuda) and "dynprune tune" in conv_tiles.tuning_state(cuda)
    path = conv_tiles.write_table("Stand-in GPU | 8 SMs", {key.text(): {"tile": tuned, "ms": 0.01}}, {"sms": 8})
    assert conv_tiles.tile_for(key, cuda) == tuned  # writing forgets what was read before
    with conv_tiles.default_tiles_only():
        assert conv_tiles.tile_for(key, cuda) == default
    assert conv_tiles.tile_for(key, cuda) == tuned
    assert conv_tiles.tile_for(key._replace(batch=4), cuda) == default  # another batch: not tuned
    assert conv_tiles.tile_for(key, torch.device("cpu")) == default  # the interpreter: defaults
    assert conv_tiles.tuning_state(cuda).startswith("1 layer shapes tuned for Stand-in GPU")
    sms[0] = 132
    conv_tiles.forget_tables()
    assert conv_tiles.tile_for(key, cuda) == default  # the whole GPU is another table
    # A second table keeps the first; a damaged entry or file falls back to the defaults.
    conv_tiles.write_table("Stand-in GPU | 132 SMs", {key.text(): {"tile": {"block_m": "big"}}}, {"sms": 132})
    assert set(json.loads(path.read_text())) == {"Stand-in GPU | 8 SMs", "Stand-in GPU | 132 SMs"}
    assert conv_tiles.tile_for(key, cuda) == default
    path.write_text("{not json")
    sms[0] = 8
    conv_tiles.forget_tables()
    assert conv_tiles.tile_for(key, cuda) == default


def test_an_sm_limit_says_what_it_grants_while_active():
    from dynprune.sm_limit import SMLimit, active_sms

    class Stack:
        @staticmethod
        def create(sms, device):
            return SimpleNamespace(set_context=lambda: None, pop_context=lambda: None)

    limit = SMLimit(12, cuda_available=True, green=SimpleNamespace(GreenContext=Stack))
    assert active_sms() is None
    with limit:
        assert active_sms() == 16  # Hopper grants multiples of 8
    assert active_sms() is None


def gated_engine(bundle):
    from dynprune.serve.bundle import load_bundle
    from dynprune.serve.engines import DynamicEngine

    b = load_bundle(bundle)
    return DynamicEngine(os.path.join(b["root"], b["engines"]["dynamic"]["file"]), torch.device(DEVICE),
                         backend="triton", cuda_graph=False, device_frames=False)


def test_tuning_records_an_engines_convolutions_and_keeps_the_fastest_correct_tile(bundle):
    from dynprune.serve.tune import median_frame

    engine = gated_engine(bundle)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    x = median_frame(engine, images)
    with torch.inference_mode(), conv_tiles.record_calls() as calls:
        engine.net(x)
    from dynprune.kernels.triton_layers import TritonConv

    gated = [c for c in calls if c.key.in_listed or c.key.out_listed]
    assert len(gated) == 3 * len(engine.net.blocks)  # three gather convolutions a block
    ungated = sum(isinstance(m, TritonConv) for m in engine.net.modules())
    assert ungated >= 8 and len(calls) == len(gated) + ungated  # and every un-gated layer
    assert conv_tiles.recorder() is None  # recording ends with the block
    first = calls[0]

    def candidates(key):
        shape = default_tile(key.c_out, key.c_in, key.k, key.ho * key.wo, key.in_run)
        tiles = [conv_tiles.default_for(key)]  # cuDNN for an un-gated layer
        tiles.append({**shape, "block_m": 16, "block_n": 16, "block_k": 16})  # the fastest, if correct
        tiles.append({**shape, "block_m": 32, "block_n": 16, "block_k": 16})
        tiles.append({**shape, "block_n": 12})  # not a power of two: fails to compile
        return tiles

    last = {}

    def watched(call):
        def run(tile, out):
            last["tile"] = tile
            result = call.run(tile, out)
            if call is first and (tile.get("block_m"), tile.get("block_k")) == (16, 16):
                result.add_(1.0)  # a tile that computes the wrong thing must never be kept
            return result
        return conv_tiles.RecordedCall(call.key, run, call.out_like)

    def timer(fn):
        """A stand-in for the GPU's clock: 16x16x16 tiles are the fastest, then 32x16x16, then the rest."""
        fn()
        tile = last["tile"]
        return {(16, 16, 16): 0.001, (32, 16, 16): 0.002}.get((tile.get("block_m"), tile.get("block_n"),
                                                                tile.get("block_k")), 0.003)

    # the gated convolutions and the first un-gated layer (the stem): the interpreter is slow
    chosen = [c for c in calls if c is first or c.key.in_listed or c.key.out_listed]
    tuned = conv_tiles.tune_calls([watched(c) for c in chosen], timer=timer, candidates=candidates)
    assert [t.key for t in tuned] == list(dict.fromkeys(c.key for c in chosen))  # one per distinct layer
    for t in tuned:
        if t.key == first.key:
            assert (t.tile["block_m"], t.tile["block_k"]) == (32, 16) and t.refused >= 1  # the wrong tile refused
        else:
            assert (t.tile["block_m"], t.tile["block_k"]) == (16, 16)
        assert t.ms <= t.default_ms and t.tried == 4
        assert t.refused == 1 + (t.key == first.key)
        assert t.launches == sum(c.key == t.key for c in chosen)


def test_tuning_a_network_keeps_its_tiles_for_the_gpu(bundle, monkeypatch):
    """tune_network: record a forward, tune, and write the table the runtime reads on that GPU."""
    sms = [8]
    fake_gpu(monkeypatch, sms)
    engine = gated_engine(bundle)
    x = torch.rand(1, 3, 64, 64, device=DEVICE, dtype=engine.dtype)
    candidates = conv_tiles.candidate_tiles
    monkeypatch.setattr(conv_tiles, "candidate_tiles", lambda key: candidates(key)[:2])
    with torch.inference_mode():
        tuned = conv_tiles.tune_network(lambda: engine.net(x), engine.device, timer=lambda fn: (fn(), 0.001)[1])
    table = conv_tiles.read_tables()["Stand-in GPU | 8 SMs"]
    assert {t.key.text() for t in tuned} == set(table["layers"]) and table["sms"] == 8
    assert all(entry["tile"] == candidates(LayerKey(**entry["key"]))[0] for entry in table["layers"].values())


def test_tune_refuses_a_cpu_and_a_bundle_without_gates(bundle, tmp_path, capsys):
    from dynprune.cli import main

    frames = tmp_path / "frames"
    frames.mkdir()
    assert main(["tune", bundle, "--source", str(frames), "--device", "cpu"]) == 2
    assert "on a CUDA GPU, and the device is cpu" in capsys.readouterr().err
    assert main(["tune", bundle, "--device", "cpu"]) == 2
    assert "give --source" in capsys.readouterr().err


def test_an_ungated_bottleneck_keeps_its_layers_on_the_triton_backend(monkeypatch):
    """TritonConv takes the stem, stride-2 convolutions, laterals and predictions, not the layers
    of a bottleneck left un-gated (its FoldedBottleneck reads their weights itself); the network
    still equals the masked dense model."""
    from dynprune.compact import CompactDetector
    from dynprune.fusion import FoldedBottleneck, FoldedConv
    from dynprune.gates import set_gate_mode
    from dynprune.kernels.triton_layers import TritonConv
    from dynprune.model import build_detector
    from tests.conftest import tiny_config

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 compared at 1e-3 on a GPU
    torch.manual_seed(0)
    model = build_detector(tiny_config()).eval()
    model.add_gates()
    set_gate_mode(model, "threshold")
    model.blocks[0].gate1 = model.blocks[0].gate2 = None
    net = CompactDetector(model, backend="triton", device=DEVICE)
    [folded] = [m for m in net.modules() if isinstance(m, FoldedBottleneck)]
    assert all(isinstance(c, FoldedConv) for c in (folded.cv1, folded.cv2, folded.cv3))
    assert sum(isinstance(m, TritonConv) for m in net.modules()) >= 8
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        boxes, logits = net(x.to(DEVICE))
        ref_boxes, ref_logits = model(x)
    torch.testing.assert_close(logits.float().cpu(), ref_logits, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(boxes.float().cpu(), ref_boxes, atol=1e-2, rtol=1e-3)
