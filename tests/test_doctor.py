"""``dynprune doctor``: each probe with what it looks for faked present and absent, a Jetson faked
from its files, a bundle's engines, and the real report of this machine."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from dynprune import doctor
from dynprune.cli import main
from dynprune.doctor import Machine

ORIN = {"index": 0, "name": "Orin", "capability": "8.7", "sm_count": 16, "integrated": True, "memory_gib": 61.4}
ORT = SimpleNamespace(__version__="1.20.1", get_available_providers=lambda: ["CUDAExecutionProvider",
                                                                             "CPUExecutionProvider"])


def opencv(gstreamer: bool):
    info = f"  Video I/O:\n    GStreamer:                   {'YES (1.20.3)' if gstreamer else 'NO'}\n"
    return SimpleNamespace(__version__="4.8.0", getBuildInformation=lambda: info)


class FakeMachine(Machine):
    """A machine made of dictionaries: modules by name, command outputs by command line (the first
    word is then on the PATH), files by path, GPUs, the dynamic backend's choice, the compiled build."""

    def __init__(self, modules=None, commands=None, files=None, gpus=(), backend=None, compiled=None):
        self.modules, self.commands, self.files = modules or {}, commands or {}, files or {}
        self._gpus = list(gpus)
        self.backend = backend or {"backend": "cpu", "reason": "compiled CPU blocks (faked)"}
        self.compiled = compiled

    def module(self, name):
        return self.modules.get(name)

    def which(self, command):
        return f"/usr/bin/{command}" if any(c.split()[0] == command for c in self.commands) else None

    def run(self, command, timeout=10.0):
        return self.commands.get(" ".join(command))

    def read(self, path):
        return self.files.get(path)

    def glob(self, pattern):
        paths = {str(p) for f in self.files for p in [Path(f), *Path(f).parents]}
        depth = pattern.count("/")
        return sorted(p for p in paths if p.count("/") == depth and fnmatch.fnmatch(p, pattern))

    def gpus(self):
        return self._gpus

    def dynamic_backend(self, device, blocks=None):
        return dict(self.backend)

    def compiled_blocks(self):
        return self.compiled

    def kernel_tiles(self, device):
        return "default tiles (none tuned for Orin | 8.7 | triton 3.1.0 | 8 SMs: dynprune tune)"


def by_name(sections):
    return {s["name"]: s for s in sections}


def test_a_bare_machine_says_what_is_missing():
    s = by_name(doctor.report(machine=FakeMachine()))
    assert s["PyTorch"]["ok"] is False and "not importable" in s["PyTorch"]["summary"]
    assert s["GPU"]["gpus"] == [] and "every engine runs on the CPU" in s["GPU"]["summary"]
    assert s["Triton"]["version"] is None and "Triton not installed" in s["Triton"]["summary"]
    assert s["TensorRT"]["usable"] is False and "ONNX Runtime" in s["TensorRT"]["summary"]
    assert s["ONNX Runtime"]["ok"] is False and "pip install onnxruntime" in s["ONNX Runtime"]["summary"]
    assert s["OpenCV"]["ok"] is False and "cannot read cameras" in s["OpenCV"]["summary"]
    assert s["Cameras"]["v4l2"] == []
    assert s["C compiler"]["ok"] is False and "reference backend" in s["C compiler"]["summary"]
    assert s["Jetson"]["jetson"] is False
    text = doctor.format_report(list(s.values()))
    assert text.count("\n") == len(s) - 1 and "-- PyTorch" in text


def test_a_gpu_machine_with_everything():
    import torch

    m = FakeMachine(
        modules={"torch": torch, "triton": SimpleNamespace(__version__="3.1.0"),
                 "tensorrt": SimpleNamespace(__version__="10.3.0"), "onnxruntime": ORT, "cv2": opencv(True)},
        commands={"gst-inspect-1.0 nvarguscamerasrc": "Factory Details: ...", "cc --version": "cc (GCC) 11.4.0\n"},
        files={"/dev/video0": "", "/sys/class/video4linux/video0/name": "USB Camera\n",
               "/proc/cpuinfo": "processor : 0\nFeatures : fp asimd evtstrm aes asimdhp asimddp\n"},
        gpus=[ORIN], backend={"backend": "triton", "reason": "Triton kernels on Orin"},
        compiled={"vector_floats": 4, "for_this_cpu": True, "openmp": True})
    s = by_name(doctor.report(machine=m))
    assert "Orin, compute capability 8.7, 16 SMs, integrated" in s["GPU"]["summary"]
    assert s["Triton"]["ok"] is True and s["Triton"]["backend"] == "triton" and s["Triton"]["version"] == "3.1.0"
    assert "kernel tiles: default tiles" in s["Triton"]["summary"] and "dynprune tune" in s["Triton"]["summary"]
    assert s["TensorRT"]["usable"] is True and "10.3.0" in s["TensorRT"]["summary"]
    assert s["ONNX Runtime"]["providers"][0] == "CUDAExecutionProvider"
    assert s["OpenCV"]["gstreamer"] is True and "csi:// can open" in s["OpenCV"]["summary"]
    assert s["Cameras"]["v4l2"] == [{"device": "/dev/video0", "name": "USB Camera"}]
    assert s["C compiler"]["cpu_features"] == ["asimd", "asimdhp", "asimddp"]
    assert "4-float vectors, built for this CPU, on PyTorch's OpenMP threads" in s["C compiler"]["summary"]


def test_a_gpu_where_triton_fails_and_an_opencv_without_gstreamer():
    m = FakeMachine(modules={"triton": SimpleNamespace(__version__="3.1.0"), "cv2": opencv(False)}, gpus=[ORIN],
                    backend={"backend": "cpu", "reason": "compiled CPU blocks (not Triton: the Triton trial failed)"})
    s = by_name(doctor.report(machine=m))
    assert s["Triton"]["ok"] is False and "the Triton trial failed" in s["Triton"]["summary"]
    assert s["TensorRT"]["ok"] is False  # a GPU without TensorRT: the static engine loses its fast path
    assert s["OpenCV"]["gstreamer"] is False and "csi:// cannot open" in s["OpenCV"]["summary"]
    with_gst = FakeMachine(modules={"cv2": opencv(True)})
    assert "nvarguscamerasrc" in by_name(doctor.report(machine=with_gst))["OpenCV"]["summary"]


def test_a_compiler_whose_build_fails_is_reported():
    s = by_name(doctor.report(machine=FakeMachine(commands={"cc --version": "cc 12\n"})))
    assert s["C compiler"]["ok"] is False and "do not build" in s["C compiler"]["summary"]


def jetson_files(locked: bool):
    files = {"/etc/nv_tegra_release": "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, "
                                      "EABI: aarch64, DATE: Fri Sep 13 04:36:44 UTC 2024\n",
             "/proc/device-tree/model": "NVIDIA Jetson Orin Nano Developer Kit\x00"}
    gpu = "/sys/devices/platform/bus@0/17000000.gpu/devfreq/17000000.gpu"
    for cpu in range(2):
        base = f"/sys/devices/system/cpu/cpu{cpu}/cpufreq"
        files[f"{base}/scaling_min_freq"] = "1510400\n" if locked else "115200\n"
        files[f"{base}/scaling_max_freq"] = "1510400\n"
    files[f"{gpu}/min_freq"], files[f"{gpu}/max_freq"] = ("1020000000\n" if locked else "306000000\n"), "1020000000\n"
    return files


@pytest.mark.parametrize("locked", [True, False])
def test_a_jetson_is_named_with_its_release_power_mode_and_clocks(locked):
    m = FakeMachine(files=jetson_files(locked), commands={"nvpmodel -q": "NV Power Mode: MAXN_SUPER\n2\n"})
    s = by_name(doctor.report(machine=m))["Jetson"]
    assert (s["l4t"], s["jetpack"], s["power_mode"]) == ("36.4.0", "6.1", "MAXN_SUPER")
    assert s["model"] == "NVIDIA Jetson Orin Nano Developer Kit"
    assert s["clocks_locked"] is locked and s["ok"] is locked
    assert ("NOT locked" in s["summary"]) is not locked and ("jetson_clocks" in s["summary"]) is not locked


def test_a_jetson_whose_clocks_cannot_be_read():
    files = {"/etc/nv_tegra_release": "# R35 (release), REVISION: 4.1, GCID: 33958178\n"}
    s = by_name(doctor.report(machine=FakeMachine(files=files)))["Jetson"]
    assert (s["l4t"], s["jetpack"], s["power_mode"], s["clocks_locked"]) == ("35.4.1", "5.1.2", None, None)
    assert "clocks unknown" in s["summary"]


def test_a_bundle_names_what_serve_can_run_and_what_auto_considers(bundle, tmp_path):
    plain = FakeMachine(modules={"onnxruntime": ORT})
    s = by_name(doctor.report(bundle, machine=plain))["Bundle"]
    engines = s["engines"]
    assert all(e["runs"] for e in engines.values())
    assert "ONNX Runtime 1.20.1" in engines["static"]["reason"]
    assert "cpu backend" in engines["dynamic"]["reason"]
    assert s["auto"] == ["dynamic", "static", "dense"]  # AP50-95 0.50, 0.495 and 0.50: all within 0.02

    # TensorRT on a GPU: a plan cached for this TensorRT and GPU, and without one
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    trt = FakeMachine(modules={"tensorrt": SimpleNamespace(__version__="10.3.0")}, gpus=[ORIN])
    static = by_name(doctor.report(str(copy), machine=trt))["Bundle"]["engines"]["static"]
    assert "the first serve builds one" in static["reason"]
    (copy / "static-trt10.3.0-fp16-orin.plan").write_bytes(b"plan")
    (copy / "static-trt8.5.2-fp16-orin.plan").write_bytes(b"old plan")
    static = by_name(doctor.report(str(copy), machine=trt))["Bundle"]["engines"]["static"]
    assert "cached plan static-trt10.3.0-fp16-orin.plan" in static["reason"]

    # a GPU without TensorRT: the pruned checkpoint on the GPU, not ONNX Runtime on the CPU
    gpu = FakeMachine(modules={"onnxruntime": ORT}, gpus=[ORIN], backend={"backend": "triton", "reason": "Orin"})
    static = by_name(doctor.report(str(copy), machine=gpu))["Bundle"]["engines"]["static"]
    assert static["runs"] and "PyTorch on the GPU" in static["reason"]

    # a static engine that cannot run (no ONNX Runtime, no TensorRT) and a missing dynamic file
    (copy / json.loads((copy / "metadata.json").read_text())["engines"]["dynamic"]["file"]).unlink()
    s = by_name(doctor.report(str(copy), machine=FakeMachine()))["Bundle"]
    assert s["engines"]["static"]["runs"] is False and "neither TensorRT nor ONNX Runtime" in \
        s["engines"]["static"]["reason"]
    assert s["engines"]["dynamic"]["runs"] is False and "missing from the bundle" in s["engines"]["dynamic"]["reason"]
    assert s["auto"] == ["dense"]


def test_doctor_on_this_machine_prints_a_true_report(capsys, bundle):
    import platform

    import torch

    assert main(["doctor", "--json", bundle]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["Python"]["version"] == platform.python_version()
    assert report["PyTorch"]["version"] == torch.__version__
    assert bool(report["GPU"]["gpus"]) == torch.cuda.is_available()
    assert report["Bundle"]["auto"]
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("ok Python") and "Jetson" in text


def test_doctor_with_a_folder_that_is_no_bundle_is_a_usage_error(tmp_path, capsys):
    assert main(["doctor", str(tmp_path)]) == 2
    assert "not a dynprune bundle" in capsys.readouterr().err
