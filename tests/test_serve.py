import json
import re
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

from dynprune.checkpoint import make_checkpoint, save_atomic
from dynprune.gates import set_gate_mode
from dynprune.model import build_detector
from dynprune.serve.app import ServeOptions, serve
from dynprune.serve.engines import DynamicEngine
from dynprune.serve.policy import FallbackPolicy
from dynprune.serve.sources import CaptureSource, SourceError, open_source
from tests.conftest import BUNDLE_IMGSZ, tiny_config

IMGSZ = BUNDLE_IMGSZ


def test_bundle_has_every_engine_and_metadata(bundle):
    meta = json.loads(open(f"{bundle}/metadata.json").read())
    assert set(meta["engines"]) == {"dense", "static", "dynamic"}
    assert meta["names"] == ["ring"] and meta["imgsz"] == IMGSZ and meta["engines"]["static"]["onnx"] == "static.onnx"
    assert meta["engines"]["static"]["gflops"] < meta["engines"]["dense"]["gflops"]


@pytest.mark.parametrize("engine", ["dense", "static", "dynamic"])
def test_serve_video_json_frame_by_frame(bundle, video, tmp_path, engine):
    out = tmp_path / "det.jsonl"
    res = serve(bundle, video, ServeOptions(engine=engine, json=str(out), device="cpu"))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert res["frames"] == 24 and len(lines) == 24
    assert [r["frame"] for r in lines] == list(range(24))
    # Frame by frame, the JSON holds exactly what the engine returns for that frame.
    import cv2

    from dynprune.serve.bundle import load_bundle
    from dynprune.serve.engines import load_engines

    eng = load_engines(load_bundle(bundle), [engine], torch.device("cpu"))[engine]
    cap = cv2.VideoCapture(video)
    for rec in lines:
        ok, img = cap.read()
        assert ok
        direct = eng(img)
        assert rec["engine"] == engine and len(rec["detections"]) == len(direct.boxes)
        for d, box, score in zip(rec["detections"], direct.boxes, direct.scores):
            np.testing.assert_allclose(d["box"], box, atol=0.02)
            assert abs(d["score"] - score) < 1e-3 and d["class"] == "ring"
            assert 0 <= d["box"][0] <= d["box"][2] <= img.shape[1]
        if engine == "dynamic":
            assert 0 <= rec["keep_ratio"] <= 1
        assert set(rec["timings_ms"]) == {"preprocess_ms", "gates_ms", "network_ms", "postprocess_ms"}


def test_folder_of_images_source(bundle, tmp_path):
    import cv2

    for i in range(5):
        cv2.imwrite(str(tmp_path / f"{i:02d}.jpg"), np.full((50, 70, 3), i * 40, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    out = tmp_path / "d.jsonl"
    res = serve(bundle, str(tmp_path), ServeOptions(engine="dense", json=str(out), device="cpu"))
    names = [json.loads(x)["name"] for x in out.read_text().splitlines()]
    assert res["frames"] == 5 and names == [f"{i:02d}.jpg" for i in range(5)]
    assert open_source(str(tmp_path / "*.jpg")).read().name == "00.jpg"


class FlakyCapture:
    """A camera that delivers some frames, then dies; the next open works again."""

    def __init__(self, frames: int) -> None:
        self.left = frames

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return True

    def read(self):
        if self.left <= 0:
            return False, None
        self.left -= 1
        time.sleep(0.002)
        return True, np.full((48, 64, 3), 100, np.uint8)

    def release(self) -> None:
        pass


def test_source_that_fails_mid_stream_recovers_and_serving_goes_on(bundle):
    opens = []

    def opener():
        opens.append(1)
        return FlakyCapture(5)

    src = CaptureSource("fake://camera", opener, live=True, backoff=0.01)
    res = serve(bundle, "fake://camera", ServeOptions(engine="dense", max_frames=12, device="cpu"), source=src)
    assert res["frames"] == 12
    assert res["reconnects"] >= 2 and len(opens) >= 3


def test_bad_uri_fails_fast_and_names_it():
    t = time.time()
    with pytest.raises(SourceError, match="no/such/video.mp4"):
        open_source("no/such/video.mp4")
    with pytest.raises(SourceError, match="csi://0.*GStreamer"):
        from dynprune.serve.sources import gstreamer_available

        if gstreamer_available():
            pytest.skip("this OpenCV has GStreamer")
        open_source("csi://0")
    assert time.time() - t < 5


def test_http_endpoints_answer_a_real_client(bundle, video):
    stop = threading.Event()
    port = _free_port()
    result = {}
    th = threading.Thread(target=lambda: result.update(serve(
        bundle, video, ServeOptions(engine="dynamic", http=port, loop=True, device="cpu"), stop=stop)))
    th.start()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        stats = None
        while time.time() < deadline:
            try:
                stats = json.loads(urllib.request.urlopen(base + "/stats", timeout=2).read())
                if stats["frames"] > 2:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert stats and stats["engine"] == "dynamic" and stats["fps"] > 0
        page = urllib.request.urlopen(base + "/", timeout=5).read().decode()
        assert "/stream.mjpg" in page
        metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert_prometheus_text(metrics)
        assert 'dynprune_frames_total{engine="dynamic"}' in metrics
        with urllib.request.urlopen(base + "/stream.mjpg", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("multipart/x-mixed-replace")
            chunk = r.read(2048)
            assert b"--frame" in chunk and b"\xff\xd8" in chunk  # a JPEG starts
    finally:
        stop.set()
        th.join(timeout=30)
    assert result["frames"] > 2


def assert_prometheus_text(text: str) -> None:
    """Exposition format 0.0.4: HELP/TYPE comments, then `name{labels} value` samples."""
    label = r'[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
    sample = re.compile(rf"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{{{label}(,{label})*\}})? (NaN|[+-]?Inf|[+-]?[0-9.eE+-]+)$")
    typed = set()
    for line in text.strip().splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            typed.add(name)
        elif line.startswith("# HELP "):
            continue
        else:
            assert sample.match(line), line
            assert line.split("{")[0].split(" ")[0] in typed


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_policy_picks_the_faster_engine_and_switches_with_hysteresis():
    pol = FallbackPolicy(["dense", "static", "dynamic"], {"dense": 0.5, "static": 0.495, "dynamic": 0.49},
                         warmup=3, probe_every=10)
    speed = {"dense": 30.0, "static": 20.0, "dynamic": 12.0}
    for _ in range(40):
        e = pol.choose()
        pol.record(e, speed[e], 0.5 if e == "dynamic" else None)
    assert pol.active == "dynamic"
    speed["dynamic"] = 60.0  # the dynamic engine becomes artificially slow
    for _ in range(200):
        e = pol.choose()
        pol.record(e, speed[e], 0.5 if e == "dynamic" else None)
    assert pol.active == "static"
    assert pol.switches[-1]["to"] == "static" and "static" in pol.switches[-1]["why"]


def test_policy_respects_the_accuracy_bar(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="dynprune.serve"):
        pol = FallbackPolicy(["dense", "static"], {"dense": 0.50, "static": 0.40}, ap_margin=0.02, warmup=2)
    assert pol.eligible == ["dense"] and pol.dropped == ["static"]
    # said without -v: the user shipped that engine and it will never serve a frame
    assert any("static not used: AP50-95 0.4000" in r.message for r in caplog.records)


def test_serve_auto_policy_with_an_artificially_slow_engine(bundle, video, monkeypatch):
    orig = DynamicEngine.network

    def slow(self, x):
        time.sleep(0.05)
        return orig(self, x)

    monkeypatch.setattr(DynamicEngine, "network", slow)
    res = serve(bundle, video, ServeOptions(engine="auto", device="cpu", loop=True, max_frames=40, probe_every=10))
    assert res["active"] != "dynamic"
    assert res["frames_by_engine"].get("dynamic", 0) < 15


def test_bench_files_agree_with_the_table(bundle, video, tmp_path):
    import csv

    from dynprune.serve.bench import run_bench

    lines = []
    res = run_bench(bundle, source=video, frames=12, out=str(tmp_path), device="cpu", warmup=1, log=lines.append)
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert [r["engine"] for r in rows] == [r["engine"] for r in data["rows"]] == ["dynamic", "static", "dense"]
    table = lines[-1]
    for r_csv, r_json in zip(rows, data["rows"]):
        assert abs(float(r_csv["fps"]) - r_json["fps"]) < 1e-6
        assert f"{r_json['p50_ms']:.2f}" in table
    assert (tmp_path / "latency_vs_keep.png").stat().st_size > 1000
    assert res["frames"] == 12 and data["rows"][0]["keep_mean"] is not None


def test_bench_of_every_frame_says_what_it_does_while_it_runs(bundle, video, tmp_path):
    """``--frames 0`` (every frame of the source) prints what it reads and how far the measuring is,
    so a long video never looks like a hang."""
    from dynprune.serve.bench import measure_in_turns, run_bench

    lines = []
    res = run_bench(bundle, source=video, frames=0, out=str(tmp_path), device="cpu", warmup=1, log=lines.append,
                    engines=["dense"])
    assert res["frames"] == 24  # the whole video
    assert lines[0].startswith(f"reading every frame of {video}")
    assert lines[1].startswith("measuring 24 frames on dense")
    reports = []
    measure_in_turns({"a": lambda img: _FakeResult()}, [None] * 5, warmup=0, every_s=0.0,
                     progress=lambda done, total: reports.append((done, total)))
    assert reports == [(i, 5) for i in range(5)]


class _FakeResult:
    total_ms, timings, keep_ratio, gflops = 1.0, {}, None, None


def test_bench_engines_take_turns_after_all_are_warm():
    """No engine is measured while another is still warming up, and none always goes first."""
    from dynprune.serve.bench import measure_in_turns
    from dynprune.serve.engines import Result

    calls = []

    def engine(name, keep=None):
        def run(img):
            calls.append((name, int(img[0, 0, 0])))
            return Result(np.zeros((0, 4)), np.zeros(0), np.zeros(0), {"network_ms": 1.0}, keep_ratio=keep)
        return run

    images = [np.full((4, 4, 3), i, dtype=np.uint8) for i in range(6)]
    measured = measure_in_turns({"dense": engine("dense"), "dynamic": engine("dynamic", 0.5),
                                 "static": engine("static")}, images, warmup=2)
    warm, timed = calls[:6], calls[6:]
    assert [n for n, _ in warm] == ["dense"] * 2 + ["dynamic"] * 2 + ["static"] * 2
    assert len(timed) == 18
    for i in range(6):  # frame i: every engine once, the first one rotating
        turn = timed[3 * i : 3 * i + 3]
        assert {f for _, f in turn} == {i} and sorted(n for n, _ in turn) == ["dense", "dynamic", "static"]
    assert [timed[3 * i][0] for i in range(3)] == ["dense", "dynamic", "static"]
    assert measured["dynamic"]["keep"] == [0.5] * 6 and measured["dense"]["keep"] == []
    assert measured["static"]["lat"] == [1.0] * 6 and measured["static"]["wall"] > 0


def test_dynamic_engine_without_triton_kernels_on_a_gpu_runs_on_the_cpu(bundle, caplog):
    """The compiled CPU blocks on a GPU machine (backend cpu, or a compute capability below
    Triton's) must not crash the engine, and the log says where it went."""
    from pathlib import Path

    from dynprune.serve.bundle import load_bundle

    b = load_bundle(bundle)
    checkpoint = str(Path(b["root"]) / b["engines"]["dynamic"]["file"])
    eng = DynamicEngine(checkpoint, torch.device("cuda"), backend="cpu")  # selection needs no GPU
    assert eng.device.type == "cpu" and "runs on the CPU" in caplog.text
    res = eng(np.zeros((48, 64, 3), dtype=np.uint8))
    assert 0.0 <= res.keep_ratio <= 1.0


@pytest.mark.parametrize("group", [1, 8])
def test_dynamic_engine_says_when_gpu_kernels_cannot_read_whole_groups(group, tmp_path, caplog):
    """On the Triton path (the interpreter here), gates of single channels get a hint to retrain
    with groups of 8; group-8 gates get none."""
    model = build_detector(tiny_config()).eval()
    model.add_gates(group=group)
    set_gate_mode(model, "threshold")
    path = tmp_path / "gated.pt"
    save_atomic(make_checkpoint(model, ["ring"], IMGSZ, "gated", gate={"mode": "threshold"}), path)
    eng = DynamicEngine(str(path), torch.device("cuda" if torch.cuda.is_available() else "cpu"), backend="triton")
    assert eng.net.backend == "triton"
    assert ("--group 8" in eng.description) == (group == 1) == ("--group 8" in caplog.text)



def test_the_static_engine_runs_where_it_is_fair():
    """TensorRT where a plan is there; on a CUDA GPU without one the pruned checkpoint in PyTorch (the
    dense engine's way), not ONNX Runtime on the CPU; ONNX Runtime on a machine without a GPU."""
    from dynprune.serve.engines import static_runtime

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert static_runtime(cuda, True, True) == "tensorrt"
    assert static_runtime(cuda, False, True) == "pytorch"
    assert static_runtime(cuda, False, False) == "onnxruntime"  # a bundle from before static.pt was kept
    assert static_runtime(cpu, False, True) == "onnxruntime"
