import json

import pytest

from dynprune.checkpoint import make_checkpoint, save_atomic
from dynprune.cli import build_parser, main
from dynprune.model import build_detector
from tests.conftest import tiny_config


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "train", "gate", "calibrate", "prune", "export", "bench", "serve", "val"):
        assert cmd in out


def test_val_json_on_a_checkpoint(synthetic_yaml, tmp_path, capsys):
    path = tmp_path / "m.pt"
    save_atomic(make_checkpoint(build_detector(tiny_config()).eval(), ["ring"], 64, "dense", data=synthetic_yaml), path)
    assert main(["val", "--weights", str(path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("ap50", "ap50_95", "precision", "recall", "params_m", "gflops", "latency_ms_b1"):
        assert key in res
    assert res["imgsz"] == 64 and res["images"] == 8


def test_bad_inputs_give_a_clear_error_and_exit_code_2(tmp_path, capsys):
    assert main(["val", "--weights", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["val", "--weights", str(tmp_path / "junk.pt")]) == 2
    assert "junk.pt" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--epochs", "1"]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err


def test_serve_and_bench_flags_parse():
    args = build_parser().parse_args(["serve", "bundle/", "--source", "csi://0", "--http", "8080", "--json", "-"])
    assert args.source == "csi://0" and args.http == 8080 and args.host == "127.0.0.1"
    args = build_parser().parse_args(["bench", "bundle/", "--source", "v.mp4", "--frames", "50"])
    assert args.frames == 50


def test_calibrate_measures_the_new_thresholds_metrics(synthetic_yaml, tmp_path, capsys):
    """A calibrated checkpoint carries AP and keep measured at its own thresholds, not the
    trained ones it was made from (export, bench and serve's policy read them)."""
    from dynprune.checkpoint import model_from_checkpoint
    from dynprune.data import load_dataset
    from dynprune.validate import run_validation
    from tests.conftest import random_gates, randomize_bn

    model = build_detector(tiny_config())
    randomize_bn(model)
    model.add_gates()
    random_gates(model, 0, empty_every=100)
    stale = {"epoch": 3, "ap50": 0.99, "ap50_95": 0.77, "keep_mean": 0.11}
    path = tmp_path / "gate.pt"
    save_atomic(make_checkpoint(model.eval(), ["ring"], 64, "gated", gate={"method": "manidp", "mode": "threshold"},
                                data=synthetic_yaml, metrics=stale), path)
    out = tmp_path / "cal.pt"
    assert main(["calibrate", "--weights", str(path), "--keep", "0.4", "--images", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "AP50 0.9900 ->" in printed and "warning: AP50 fell" in printed  # the planted AP is far above
    calibrated, ckpt = model_from_checkpoint(str(out))
    spec = load_dataset(synthetic_yaml)
    again = run_validation(calibrated, spec.val, spec.names, 64)
    assert ckpt["metrics"]["epoch"] == 3
    for key in ("ap50", "ap50_95", "keep_mean", "flops_mean"):
        assert ckpt["metrics"][key] == pytest.approx(again[key], abs=1e-9)
    assert ckpt["metrics"]["keep_mean"] != stale["keep_mean"]
