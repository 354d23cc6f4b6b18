"""Every mistake a user can make at the command line ends in one line that names the file, flag or
value and what to do, with exit status 2 and no traceback. The cases are a table: each row builds
its inputs, runs ``dynprune`` in this process and checks the message."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dynprune.cli import main


def run_cli(argv, capsys):
    """(exit status, stderr) of ``dynprune ARGV``, whether it returned or exited (argparse)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished one-epoch dense run and a one-epoch gate run on a tiny synthetic set (64 px)."""
    from dynprune.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("runs")
    data = write_synthetic(str(root / "syn"), n_train=16, n_val=4, seed=5, size=64)
    common = ["--data", data, "--epochs", "1", "--imgsz", "64", "--batch", "8", "--workers", "0"]
    assert main(["train", *common, "--out", str(root / "dense")]) == 0
    assert main(["gate", "--weights", str(root / "dense" / "best.pt"), *common, "--out", str(root / "gate")]) == 0
    return {"root": root, "data": data, "dense": root / "dense", "gate": root / "gate"}


def _copy_bundle(bundle, tmp_path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    return out


def _edit_metadata(bundle, tmp_path, change) -> Path:
    b = _copy_bundle(bundle, tmp_path)
    meta = json.loads((b / "metadata.json").read_text())
    change(meta)
    (b / "metadata.json").write_text(json.dumps(meta))
    return b


def _truncated(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def _two_class_yaml(data: str, tmp_path) -> str:
    cfg = yaml.safe_load(Path(data).read_text())
    cfg["names"] = ["ring", "other"]
    cfg["path"] = str(Path(data).parent)
    out = tmp_path / "two.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return str(out)


def _names_as_string(data: str, tmp_path) -> str:
    cfg = yaml.safe_load(Path(data).read_text())
    cfg["names"] = "ring"
    cfg["path"] = str(Path(data).parent)
    out = tmp_path / "str.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return str(out)


def _labels_malformed(data: str, tmp_path) -> str:
    src = Path(data).parent
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    for label in (dst / "labels").rglob("*.txt"):
        label.write_text("ring 0.5 0.5 0.2\n")  # a name instead of an id, four fields
    return str(dst / "data.yaml")


# (id, build(ctx) -> argv, expected fragment of the one-line message)
CASES = [
    ("http-port-out-of-range", lambda c: ["serve", c.bundle, "--source", c.video, "--http", "99999"],
     "argument --http: 99999 is out of range"),
    ("http-port-in-use", lambda c: ["serve", c.bundle, "--source", c.video, "--http", c.busy_port],
     "the port is in use"),
    ("bad-host", lambda c: ["serve", c.bundle, "--source", c.video, "--http", "0", "--host", "256.0.0.1"],
     "--host 256.0.0.1: not an address of this machine"),
    ("truncated-static-onnx", lambda c: ["serve", c.damaged("static.onnx"), "--source", c.video, "--engine", "static"],
     "static.onnx: not a loadable ONNX model"),
    ("metadata-cut-off", lambda c: ["serve", c.damaged("metadata.json"), "--source", c.video],
     "metadata.json: not valid JSON"),
    ("metadata-without-engines", lambda c: ["serve", c.metadata(lambda m: m.pop("engines")), "--source", c.video],
     "metadata.json: 'engines' is None"),
    ("metadata-imgsz-string", lambda c: ["serve", c.metadata(lambda m: m.update(imgsz="64")), "--source", c.video],
     "metadata.json: 'imgsz' is '64', expected a positive multiple of 32"),
    ("damaged-engine-checkpoint", lambda c: ["serve", c.damaged("dense.pt"), "--source", c.video, "--engine", "dense"],
     "dense.pt: not a readable checkpoint"),
    ("save-unknown-extension", lambda c: ["serve", c.bundle, "--source", c.video, "--save", c.tmp / "out.xyz"],
     "out.xyz: unknown video type; end the name in one of"),
    ("json-into-missing-folder", lambda c: ["serve", c.bundle, "--source", c.video, "--json", c.tmp / "no" / "x.jsonl"],
     "does not exist; create it first"),
    ("bench-out-is-a-file", lambda c: ["bench", c.bundle, "--source", c.video, "--out", c.file],
     "is a file, not a folder"),
    ("train-out-is-a-file", lambda c: ["train", "--data", c.data, "--out", c.file], "is a file, not a folder"),
    ("train-batch-0", lambda c: ["train", "--data", c.data, "--batch", "0"], "argument --batch: 0 is out of range"),
    ("train-epochs-0", lambda c: ["train", "--data", c.data, "--epochs", "0"], "argument --epochs: 0 is out of range"),
    ("gate-keep-above-1", lambda c: ["gate", "--weights", "w.pt", "--data", c.data, "--keep", "1.5"],
     "argument --keep: 1.5 is out of range"),
    ("pretrained-random-bytes", lambda c: ["train", "--data", c.data, "--pretrained", c.random_bytes],
     "random.bin: not a readable checkpoint"),
    ("gate-checkpoint-to-train-resume", lambda c: ["train", "--resume", c.runs["gate"] / "last.pt"],
     "a gated run's checkpoint; resume it with dynprune gate --resume"),
    ("resume-finished-run", lambda c: ["train", "--resume", c.runs["dense"] / "last.pt"],
     "the run has finished 1 of 1 epochs; give --epochs N"),
    ("resume-other-imgsz", lambda c: ["train", "--resume", c.runs["dense"] / "last.pt", "--imgsz", "96"],
     "--imgsz 96: the run being resumed has --imgsz 64"),
    ("resume-other-out", lambda c: ["train", "--resume", c.runs["dense"] / "last.pt", "--out", c.tmp / "x",
                                    "--epochs", "2"], "the resumed run's folder is"),
    ("resume-class-mismatch", lambda c: ["train", "--resume", c.runs["dense"] / "last.pt", "--epochs", "2",
                                         "--data", c.two_class], "the run being resumed trained on"),
    ("gate-resume-other-keep", lambda c: ["gate", "--resume", c.runs["gate"] / "last.pt", "--epochs", "2",
                                          "--keep", "0.3"], "--keep 0.3: the gate run being resumed has --keep 0.5"),
    ("resume-best-pt", lambda c: ["train", "--resume", c.runs["dense"] / "best.pt"],
     "has no training state (a best.pt?)"),
    ("yolo-names-string", lambda c: ["train", "--data", c.names_string], "'names' is 'ring'; it must be a list"),
    ("no-valid-label", lambda c: ["train", "--data", c.malformed, "--epochs", "1"],
     "none of the 16 training images has a usable label"),
    ("val-class-mismatch", lambda c: ["val", "--weights", c.runs["dense"] / "best.pt", "--data", c.two_class],
     "trained on classes ['ring'], the dataset"),
    ("gate-class-mismatch", lambda c: ["gate", "--weights", c.runs["dense"] / "best.pt", "--data", c.two_class,
                                       "--out", c.tmp / "g"], "trained on classes ['ring'], the dataset"),
    ("imgsz-not-multiple-of-32", lambda c: ["train", "--data", c.data, "--imgsz", "100"],
     "--imgsz 100: must be a positive multiple of 32"),
    ("calibrate-dense-checkpoint", lambda c: ["calibrate", "--weights", c.runs["dense"] / "best.pt", "--keep", "0.5"],
     "a dense or statically pruned checkpoint"),
    ("export-nothing", lambda c: ["export", "-o", c.tmp / "e"], "nothing to export"),
    ("bench-without-frames", lambda c: ["bench", c.bundle], "give --source"),
    ("missing-bundle", lambda c: ["serve", c.tmp / "nowhere", "--source", c.video], "no such bundle folder"),
]


class Context:
    def __init__(self, tmp_path, bundle, video, runs, data):
        self.tmp, self._bundle, self.video, self.runs, self.data = tmp_path, bundle, video, runs, data
        self.bundle = bundle
        self._sock = None

    @property
    def busy_port(self) -> int:
        self._sock = _busy_port()
        return self._sock.getsockname()[1]

    def damaged(self, name: str) -> Path:
        b = _copy_bundle(self._bundle, self.tmp)
        _truncated(b / name)
        return b

    def metadata(self, change) -> Path:
        return _edit_metadata(self._bundle, self.tmp, change)

    @property
    def file(self) -> Path:
        p = self.tmp / "a-file"
        p.write_text("x")
        return p

    @property
    def random_bytes(self) -> Path:
        p = self.tmp / "random.bin"
        p.write_bytes(os.urandom(4096))
        return p

    @property
    def two_class(self) -> str:
        return _two_class_yaml(self.data, self.tmp)

    @property
    def names_string(self) -> str:
        return _names_as_string(self.data, self.tmp)

    @property
    def malformed(self) -> str:
        return _labels_malformed(self.data, self.tmp)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_gets_one_line_and_status_2(case, tmp_path, bundle, video, runs, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a case writes by default lands in the repository
    monkeypatch.delenv("DYNPRUNE_DEBUG", raising=False)
    _, build, expected = case
    ctx = Context(tmp_path, bundle, video, runs, runs["data"])
    try:
        code, err = run_cli(build(ctx), capsys)
    finally:
        ctx.close()
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert expected in lines[0], err


def test_debug_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt"):
        main(["--debug", "val", "--weights", str(tmp_path / "junk.pt")])


def test_an_unexpected_failure_is_one_line_with_status_1(monkeypatch, capsys):
    """A fault of dynprune itself (not of the input) says so in one line, status 1, and points to --debug."""
    import dynprune.cli as cli

    def broken(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "build_parser", _parser_with(cli, "val", broken))
    code, err = run_cli(["val", "--weights", "x.pt"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "unexpected KeyError" in err and "--debug" in err


def _parser_with(cli, command, func):
    build = cli.build_parser

    def patched():
        parser = build()
        for action in parser._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict) and command in action.choices:
                action.choices[command].set_defaults(func=func)
        return parser

    return patched


def test_resume_continues_in_the_runs_folder_with_its_settings(runs, tmp_path, capsys, monkeypatch):
    """Without --out, a resumed run writes into the folder of its last.pt (not runs/dense), with the
    image size it started with, and extends to a larger --epochs with a note."""
    import torch

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(runs["dense"], run)
    code = main(["train", "--resume", str(run / "last.pt"), "--epochs", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "instead of the run's 1" in out
    assert not (tmp_path / "runs").exists()
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["imgsz"] == 64 and ckpt["train_config"]["epochs"] == 2


def test_json_to_a_closed_pipe_stops_quietly(bundle, video):
    """``dynprune serve ... --json - | head -2``: serving stops when the reader goes, no traceback."""
    cmd = [sys.executable, "-m", "dynprune", "serve", bundle, "--source", video, "--json", "-", "--engine", "dense",
           "--loop", "--frames", "500"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = [proc.stdout.readline() for _ in range(2)]
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert all(json.loads(line)["engine"] == "dense" for line in first)
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert "the reader went away" in err


def test_auto_serves_the_engines_it_has(bundle, video, tmp_path, caplog):
    """A bundle copied without dynamic.pt: --engine auto serves dense and static and says why."""
    from dynprune.serve.app import ServeOptions, serve

    b = _copy_bundle(bundle, tmp_path)
    (b / "dynamic.pt").unlink()
    with caplog.at_level("WARNING", logger="dynprune.serve"):
        res = serve(str(b), video, ServeOptions(max_frames=4))
    assert res["frames"] == 4 and set(res["engines"]) == {"dense", "static"}
    assert any("engine dynamic left out" in r.getMessage() and "dynamic.pt: missing" in r.getMessage()
               for r in caplog.records)


def test_preview_on_all_interfaces_warns(bundle, video, caplog):
    from dynprune.serve.app import ServeOptions, serve

    with caplog.at_level("WARNING", logger="dynprune.serve"):
        serve(bundle, video, ServeOptions(engine="dense", max_frames=2, http=0, host="0.0.0.0"))
    assert any("no authentication" in r.getMessage() for r in caplog.records)


def test_preview_clients_that_vanish_leave_no_traceback(bundle, video, capfd):
    """Clients that reset the connection mid-request (a closed browser tab) are logged at debug
    level, not printed as tracebacks."""
    import struct
    import threading
    import time

    from dynprune.serve.app import ServeOptions, serve

    port = _busy_port()
    free = port.getsockname()[1]
    port.close()
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(bundle, video, ServeOptions(engine="dense", loop=True, http=free)),
                         kwargs={"stop": stop})
    t.start()
    try:
        deadline = time.time() + 30
        for _ in range(5):
            while True:
                try:
                    s = socket.create_connection(("127.0.0.1", free), timeout=2)
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.1)
            s.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHo")  # the request cut short, then a reset
            time.sleep(0.05)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not close
            s.close()
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(timeout=30)
    assert "Traceback" not in capfd.readouterr().err


def test_gate_distils_by_default_and_a_run_from_before_distillation_resumes_without(runs, tmp_path, capsys):
    """The default gate run trains with the dense teacher (--distill 1.0); a checkpoint whose gate
    record has no "distill" was trained before it existed, and resumes without a teacher."""
    import torch

    from dynprune.checkpoint import save_atomic

    assert torch.load(runs["gate"] / "last.pt", weights_only=True)["gate"]["distill"] == 1.0
    run = tmp_path / "old"
    shutil.copytree(runs["gate"], run)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["gate"]["distill"]
    save_atomic(ckpt, run / "last.pt")
    assert main(["gate", "--resume", str(run / "last.pt"), "--epochs", str(ckpt["epoch"] + 2)]) == 0
    assert torch.load(run / "last.pt", weights_only=True)["gate"]["distill"] == 0.0
