"""Deployment as docs/jetson.md describes it: the systemd unit (checked by systemd itself where it is
installed), its command line and every dynprune command of the guide against the real CLI, the
JetPack table against what `dynprune doctor` names, and serve stopping cleanly on SIGTERM."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynprune.cli import build_parser
from dynprune.doctor import jetpack_for

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "serve" / "dynprune-serve.service"
GUIDE = ROOT / "docs" / "jetson.md"


def unit_entries(text: str) -> dict:
    """``{(section, key): [values]}`` of a unit file (keys may repeat, as Environment= does)."""
    entries: dict = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, value = line.split("=", 1)
        entries.setdefault((section, key), []).append(value)
    return entries


def test_the_unit_runs_serve_unprivileged_restarts_on_failure_and_logs_to_the_journal():
    e = unit_entries(UNIT.read_text())
    assert e[("Service", "User")] == ["dynprune"] and "video" in e[("Service", "SupplementaryGroups")][0].split()
    assert e[("Service", "Restart")] == ["on-failure"]
    assert e[("Service", "StandardOutput")] == e[("Service", "StandardError")] == ["journal"]
    assert e[("Install", "WantedBy")] == ["multi-user.target"]
    assert "DYNPRUNE_CACHE_DIR=/var/cache/dynprune" in e[("Service", "Environment")]
    command = shlex.split(e[("Service", "ExecStart")][0])
    assert Path(command[0]).name == "dynprune"
    args = build_parser().parse_args(command[1:])  # a flag this dynprune does not have fails here
    assert args.command == "serve" and args.bundle.startswith("/var/lib/dynprune")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_accepts_the_unit(tmp_path):
    """``systemd-analyze verify`` on the unit, its ExecStart pointed at this checkout's dynprune (the
    unit's own path exists only on a board set up as its header says). verify prints what it
    ignores without failing, so any output is a failure too."""
    dynprune = shutil.which("dynprune") or str(Path(sys.executable).with_name("dynprune"))
    if not Path(dynprune).exists():
        pytest.skip("the dynprune command is not installed in this environment")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/dynprune/.venv/bin/dynprune", dynprune))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_systemd_refuses_a_broken_unit(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "restart specifier" in done.stderr  # (what the test above would catch)


def guide_commands() -> list:
    """Every ``dynprune ...`` line of the guide's code blocks, comments cut."""
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("dynprune ")]


def test_every_dynprune_command_of_the_guide_is_one_this_cli_takes():
    commands = guide_commands()
    assert len(commands) >= 4
    for line in commands:
        args = build_parser().parse_args(shlex.split(line)[1:])
        assert args.command in line


def test_the_guides_jetpack_table_agrees_with_doctor():
    rows = [r for r in GUIDE.read_text().splitlines() if re.match(r"\| \d\.\d", r)]
    assert len(rows) == 5
    for row in rows:
        jetpack, l4t = (c.strip() for c in row.strip("|").split("|")[:2])
        for release in re.findall(r"R([\d.]+)", l4t):  # one release, or both ends of a range
            named = jetpack_for(release if release.count(".") == 2 else release + ".0")
            assert named.startswith(jetpack.replace(".x", "")[:3]), (row, named)


def test_serve_stops_cleanly_on_sigterm(bundle, video, tmp_path):
    """What systemctl stop sends: serve finishes its outputs and exits 0."""
    out = tmp_path / "detections.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "dynprune", "serve", bundle, "--source", video, "--loop",
                             "--json", str(out), "--engine", "dense"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 5):
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = out.read_text().splitlines()
    assert len(lines) >= 5 and all(json.loads(line) for line in lines)  # every line whole
