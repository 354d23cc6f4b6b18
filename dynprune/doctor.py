"""``dynprune doctor``: what this machine has for dynprune, and with a bundle, which engines serve
can run here and why.

Every probe asks the machine through :class:`Machine` (imports, commands on the PATH, files,
PyTorch's view of the GPU), so that the tests can fake each one present and absent. A probe never
raises: what it cannot find is a finding. The report is a list of sections, each a dict with a
``summary`` line and its facts; ``--json`` prints the same dicts.
"""

from __future__ import annotations

import glob
import importlib
import os
import platform
import re
import shutil
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional

#: JetPack releases by L4T release (NVIDIA's JetPack archive), the longest matching prefix wins
JETPACK_BY_L4T = {
    "32.7": "4.6.x", "35.1": "5.0.2", "35.2": "5.1", "35.3": "5.1.1", "35.4": "5.1.2", "35.5": "5.1.3",
    "35.6": "5.1.4", "36.2": "6.0 DP", "36.3": "6.0", "36.4": "6.1 or later", "36.4.0": "6.1", "36.4.3": "6.2",
    "36.4.4": "6.2.1",
}


def jetpack_for(l4t: str) -> str:
    """The JetPack release of an L4T release such as ``36.4.3``, or ``unknown``."""
    parts = l4t.split(".")
    for n in range(len(parts), 1, -1):
        found = JETPACK_BY_L4T.get(".".join(parts[:n]))
        if found:
            return found
    return "unknown"


#: where a Jetson's GPU clock controls live (Orin on JetPack 6, Orin on JetPack 5, Xavier, Nano/TX2)
GPU_DEVFREQ = ("/sys/devices/platform/bus@0/*.gpu/devfreq/*", "/sys/devices/platform/*.ga10b/devfreq/*",
               "/sys/devices/*.gv11b/devfreq/*", "/sys/devices/gpu.0/devfreq/*")


class Machine:
    """What the probes may ask of the machine; tests replace its methods."""

    def module(self, name: str):
        """The imported module, or ``None`` where it does not import."""
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - ImportError, or a module that fails while importing
            return None

    def which(self, command: str) -> Optional[str]:
        return shutil.which(command)

    def run(self, command: List[str], timeout: float = 10.0) -> Optional[str]:
        """A command's standard output, or ``None`` where it is missing or fails."""
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    def read(self, path: str) -> Optional[str]:
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except OSError:
            return None

    def glob(self, pattern: str) -> List[str]:
        return sorted(glob.glob(pattern))

    def gpus(self) -> List[Dict[str, Any]]:
        """PyTorch's CUDA devices: name, capability, SM count, integrated, memory."""
        import torch

        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                        "sm_count": p.multi_processor_count, "integrated": bool(getattr(p, "is_integrated", False)),
                        "memory_gib": round(p.total_memory / 2**30, 1)})
        return out

    def dynamic_backend(self, device: str, blocks: Optional[list] = None) -> Dict[str, str]:
        """The dynamic engine's backend on ``device`` (kernels/dispatch.py's choice and reason),
        for ``blocks`` or, without a model, for a ManiDP-gated block."""
        import torch

        from dynprune.kernels.dispatch import select_backend

        if blocks is None:
            from dynprune.kernels.triton_trial import tiny_gated_block

            blocks = [tiny_gated_block()]
        backend, reason = select_backend(torch.device(device), "auto", blocks)
        return {"backend": backend, "reason": reason}

    def kernel_tiles(self, device: str) -> str:
        """Whether the gather convolutions' tiles were tuned on this GPU (kernels/conv_tiles.py)."""
        import torch

        from dynprune.kernels.conv_tiles import tuning_state

        return tuning_state(torch.device(device))

    def compiled_blocks(self) -> Optional[Dict[str, Any]]:
        """The compiled CPU blocks' build, or ``None`` where they cannot be built."""
        from dynprune.kernels.cpu_blocks import compiled_library

        lib = compiled_library()
        if lib is None:
            return None
        return {"vector_floats": int(lib.dp_vector_floats()), "for_this_cpu": bool(lib.for_this_cpu),
                "openmp": bool(lib.openmp)}


def _section(name: str, summary: str, ok: Optional[bool] = True, **facts: Any) -> Dict[str, Any]:
    """``ok``: True (fine), False (something dynprune would use is missing or wrong), None (informational)."""
    return {"name": name, "ok": ok, "summary": summary, **facts}


def probe_python(m: Machine) -> Dict[str, Any]:
    return _section("Python", f"{platform.python_version()} ({sys.executable}), {platform.system()} "
                    f"{platform.machine()}", version=platform.python_version(), executable=sys.executable,
                    machine=platform.machine())


def probe_torch(m: Machine) -> Dict[str, Any]:
    torch = m.module("torch")
    if torch is None:
        return _section("PyTorch", "not importable: install it (README, 'On a Jetson' for NVIDIA's wheels)", False)
    cuda = getattr(torch.version, "cuda", None)
    cudnn = torch.backends.cudnn.version() if cuda else None
    return _section("PyTorch", f"{torch.__version__}, CUDA build {cuda or 'none (CPU wheels)'}, cuDNN "
                    f"{cudnn or 'none'}, {torch.get_num_threads()} CPU threads", version=torch.__version__,
                    cuda=cuda, cudnn=cudnn, threads=torch.get_num_threads())


def probe_gpu(m: Machine) -> Dict[str, Any]:
    gpus = m.gpus()
    if not gpus:
        return _section("GPU", "none visible to PyTorch: every engine runs on the CPU", None, gpus=[])
    g = gpus[0]
    kind = "integrated (shares the CPU's memory)" if g["integrated"] else "discrete"
    more = f" (+{len(gpus) - 1} more; serve uses the first)" if len(gpus) > 1 else ""
    return _section("GPU", f"{g['name']}, compute capability {g['capability']}, {g['sm_count']} SMs, {kind}, "
                    f"{g['memory_gib']} GiB{more}", gpus=gpus)


def probe_triton(m: Machine, device: str, blocks: Optional[list] = None) -> Dict[str, Any]:
    triton = m.module("triton")
    version = getattr(triton, "__version__", None) if triton is not None else None
    choice = m.dynamic_backend(device, blocks)
    where = f"Triton {version}" if version else "Triton not installed"
    ok = choice["backend"] == "triton" if device.startswith("cuda") else None
    tiles = ""
    if ok:
        tiles = f"; kernel tiles: {m.kernel_tiles(device)}"
    return _section("Triton", f"{where}; dynamic engine on {device}: {choice['backend']} backend, "
                    f"{choice['reason']}{tiles}", ok, version=version, **choice)


def probe_tensorrt(m: Machine, has_gpu: bool) -> Dict[str, Any]:
    trt = m.module("tensorrt")
    if trt is None:
        return _section("TensorRT", "not installed (it ships with JetPack on a Jetson): the static engine runs on "
                        "ONNX Runtime", None if not has_gpu else False, version=None, usable=False)
    if not has_gpu:
        return _section("TensorRT", f"{trt.__version__}, but no CUDA GPU is visible: the static engine runs on "
                        "ONNX Runtime", False, version=trt.__version__, usable=False)
    return _section("TensorRT", f"{trt.__version__}: the static engine runs as a TensorRT plan",
                    version=trt.__version__, usable=True)


def probe_onnxruntime(m: Machine) -> Dict[str, Any]:
    ort = m.module("onnxruntime")
    if ort is None:
        return _section("ONNX Runtime", "not installed: without TensorRT the static engine cannot run "
                        "(pip install onnxruntime)", False, version=None, providers=[])
    providers = list(ort.get_available_providers())
    return _section("ONNX Runtime", f"{ort.__version__}, providers {', '.join(providers)}",
                    version=ort.__version__, providers=providers)


def probe_opencv(m: Machine) -> Dict[str, Any]:
    cv2 = m.module("cv2")
    if cv2 is None:
        return _section("OpenCV", "not importable: serve cannot read cameras or videos (pip install "
                        "opencv-python-headless, or JetPack's python3-opencv on a Jetson)", False, version=None,
                        gstreamer=False)
    line = next((ln for ln in cv2.getBuildInformation().splitlines() if "GStreamer" in ln), "")
    gstreamer = "YES" in line
    argus = m.which("gst-inspect-1.0") is not None and m.run(["gst-inspect-1.0", "nvarguscamerasrc"]) is not None
    if not gstreamer:
        csi = "csi:// cannot open: this OpenCV has no GStreamer (on a Jetson use JetPack's python3-opencv)"
    elif not argus:
        csi = "csi:// needs GStreamer's nvarguscamerasrc, which is not here (a Jetson with JetPack has it)"
    else:
        csi = "csi:// can open (GStreamer with nvarguscamerasrc)"
    return _section("OpenCV", f"{cv2.__version__}, GStreamer {'yes' if gstreamer else 'no'}: {csi}", None,
                    version=cv2.__version__, gstreamer=gstreamer, nvarguscamerasrc=argus)


def probe_cameras(m: Machine) -> Dict[str, Any]:
    devices = m.glob("/dev/video*")
    if not devices:
        return _section("Cameras", "no V4L2 device (/dev/video*): serve reads files, URLs or csi://", None,
                        v4l2=[])
    named = []
    for dev in devices:
        name = (m.read(f"/sys/class/video4linux/{os.path.basename(dev)}/name") or "").strip()
        named.append({"device": dev, "name": name})
    listing = ", ".join(f"{d['device']} ({d['name']})" if d["name"] else d["device"] for d in named)
    return _section("Cameras", f"V4L2: {listing} (serve --source /dev/videoN or its number)", None, v4l2=named)


def _cpu_features(m: Machine) -> List[str]:
    info = m.read("/proc/cpuinfo") or ""
    flags = set()
    for line in info.splitlines():
        key = line.split(":")[0].strip().lower()
        if key in ("flags", "features"):
            flags.update(line.split(":", 1)[1].split())
    wanted = ("avx512f", "avx2", "fma", "avx", "sse4_2", "asimd", "asimdhp", "asimddp", "sve")
    return [f for f in wanted if f in flags]


def probe_compiler(m: Machine) -> Dict[str, Any]:
    compiler = os.environ.get("CC") or "cc"
    path = m.which(compiler)
    features = _cpu_features(m)
    if path is None:
        return _section("C compiler", f"{compiler} not found: gated blocks run on the reference backend, far "
                        "slower (apt install gcc)", False, compiler=None, cpu_features=features)
    version = ((m.run([compiler, "--version"]) or "").splitlines() or ["unknown version"])[0]
    build = m.compiled_blocks()
    if build is None:
        return _section("C compiler", f"{path} ({version}), but the compiled CPU blocks do not build (the log says "
                        "why; DYNPRUNE_CACHE_DIR must be writable)", False, compiler=path, version=version,
                        cpu_features=features)
    target = "built for this CPU" if build["for_this_cpu"] else "built for the architecture's baseline"
    threads = "on PyTorch's OpenMP threads" if build["openmp"] else "serial"
    return _section("C compiler", f"{path} ({version}); compiled CPU blocks: {build['vector_floats']}-float vectors, "
                    f"{target}, {threads}; CPU features {' '.join(features) or 'unknown'}", compiler=path,
                    version=version, cpu_features=features, **build)


def _clocks_locked(m: Machine) -> Optional[bool]:
    """Whether jetson_clocks has pinned the CPU and GPU clocks (minimum = maximum), or ``None``
    where the controls cannot be read."""
    pinned = []
    for cpu in m.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq"):
        lo, hi = m.read(f"{cpu}/scaling_min_freq"), m.read(f"{cpu}/scaling_max_freq")
        if lo is not None and hi is not None:
            pinned.append(lo.strip() == hi.strip())
    for pattern in GPU_DEVFREQ:
        for gpu in m.glob(pattern):
            lo, hi = m.read(f"{gpu}/min_freq"), m.read(f"{gpu}/max_freq")
            if lo is not None and hi is not None:
                pinned.append(lo.strip() == hi.strip())
    return all(pinned) if pinned else None


def probe_jetson(m: Machine) -> Dict[str, Any]:
    release = m.read("/etc/nv_tegra_release")
    if release is None:
        return _section("Jetson", "not a Jetson (no /etc/nv_tegra_release)", None, jetson=False)
    found = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
    l4t = f"{found.group(1)}.{found.group(2)}" if found else "unknown"
    jetpack = jetpack_for(l4t)
    model = (m.read("/proc/device-tree/model") or "Jetson").strip("\x00 \n")
    mode_out = m.run(["nvpmodel", "-q"]) if m.which("nvpmodel") else None
    mode = next((ln.split(":", 1)[1].strip() for ln in (mode_out or "").splitlines() if "Power Mode" in ln), None)
    locked = _clocks_locked(m)
    if locked is None:
        clocks = "clocks unknown (the frequency controls cannot be read)"
    elif locked:
        clocks = "clocks locked"
    else:
        clocks = "clocks NOT locked: FPS measured now mean little (sudo jetson_clocks, then bench)"
    return _section("Jetson", f"{model}, L4T R{l4t} (JetPack {jetpack}), power mode {mode or 'unknown'}, {clocks}",
                    locked, jetson=True, model=model, l4t=l4t, jetpack=jetpack, power_mode=mode,
                    clocks_locked=locked)


def probe_bundle(m: Machine, path: str, device: str, tensorrt: Dict[str, Any], onnxruntime: Dict[str, Any],
                 ap_margin: float = 0.02) -> Dict[str, Any]:
    """Each engine of the bundle at ``path``: whether serve can run it here, on what, and which of
    them ``--engine auto`` would consider (those that run, within ``ap_margin`` AP50-95 of the best)."""
    from pathlib import Path

    from dynprune.serve.bundle import load_bundle
    from dynprune.serve.policy import eligible_engines

    bundle = load_bundle(path)  # a BundleError names the file and field: the CLI turns it into a usage error
    root = Path(bundle["root"])
    engines: Dict[str, Dict[str, Any]] = {}
    for name, entry in bundle["engines"].items():
        file = root / (entry.get("onnx") if name == "static" else entry["file"])
        ap = entry.get("ap50_95")
        if not file.is_file():
            engines[name] = {"runs": False, "reason": f"{file} is missing from the bundle", "ap50_95": ap}
            continue
        if name == "dense":
            on = "PyTorch on the GPU" if device.startswith("cuda") else "PyTorch on the CPU (compiled blocks)"
            engines[name] = {"runs": True, "reason": on, "ap50_95": ap}
        elif name in ("dynamic", "hybrid"):
            from dynprune.checkpoint import model_from_checkpoint

            try:
                model, _ = model_from_checkpoint(str(file))
            except ValueError as err:
                engines[name] = {"runs": False, "reason": str(err).splitlines()[0], "ap50_95": ap}
                continue
            choice = m.dynamic_backend(device, list(model.blocks))
            engines[name] = {"runs": True, "reason": f"{choice['backend']} backend: {choice['reason']}",
                             "ap50_95": ap}
        else:
            checkpoint = (root / entry.get("file", "static.pt")).is_file()
            engines[name] = {"ap50_95": ap, **_static_engine(m, root, tensorrt, onnxruntime, device, checkpoint)}
    running = [n for n, e in engines.items() if e["runs"]]
    ap = {n: engines[n]["ap50_95"] for n in running if engines[n]["ap50_95"] is not None}
    eligible, dropped = eligible_engines(running, ap, ap_margin)
    lines = []
    for name, e in engines.items():
        role = ("auto considers it" if name in eligible else f"auto leaves it out (AP50-95 more than {ap_margin} "
                "below the best)" if name in dropped else "cannot run here")
        e["auto"] = name in eligible
        apt = f"AP50-95 {e['ap50_95']:.3f}; " if e["ap50_95"] is not None else ""
        lines.append(f"{name}: {apt}{e['reason']}; {role}")
    summary = f"{root}: serve --engine auto would consider {', '.join(eligible) or 'no engine'}"
    return _section("Bundle", summary, bool(eligible), path=str(root), engines=engines, auto=eligible,
                    details=lines)


def _static_engine(m: Machine, root, tensorrt: Dict[str, Any], onnxruntime: Dict[str, Any], device: str = "cpu",
                   checkpoint: bool = False) -> Dict[str, Any]:
    if tensorrt.get("usable"):
        version = str(tensorrt["version"])
        plans = [p.name for p in sorted(root.glob("static-trt*.plan"))]
        fits = [p for p in plans if p.startswith(f"static-trt{version}-")]
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", (m.gpus() or [{"name": ""}])[0]["name"]).strip("-").lower()
        fits = [p for p in fits if p.endswith(f"-{gpu}.plan")]
        if fits:
            return {"runs": True, "reason": f"TensorRT {version}, cached plan {', '.join(fits)}", "plans": plans}
        stale = f" ({', '.join(plans)} are for another TensorRT or GPU)" if plans else ""
        return {"runs": True, "reason": f"TensorRT {version}, no plan for it and this GPU yet: the first serve "
                f"builds one (minutes on a Jetson){stale}", "plans": plans}
    import torch

    from dynprune.serve.engines import static_runtime

    if static_runtime(torch.device(device), False, checkpoint) == "pytorch":
        return {"runs": True, "reason": "PyTorch on the GPU (static.pt, BatchNorm folded, CUDA graph): no TensorRT",
                "plans": []}
    if onnxruntime.get("version"):
        return {"runs": True, "reason": f"ONNX Runtime {onnxruntime['version']} "
                f"({', '.join(onnxruntime['providers'])})", "plans": []}
    return {"runs": False, "reason": "neither TensorRT nor ONNX Runtime is installed", "plans": []}


def report(bundle: Optional[str] = None, machine: Optional[Machine] = None,
           log: Callable[[str], None] = lambda _: None) -> List[Dict[str, Any]]:
    """Every section of the report, in order; the bundle's last where one is given."""
    m = machine or Machine()
    gpu = probe_gpu(m)
    device = "cuda" if gpu["gpus"] else "cpu"
    sections = [probe_python(m), probe_torch(m), gpu]
    if device == "cuda":
        log("probing Triton (the first time on a GPU, a trial of its kernels: seconds)")
    sections.append(probe_triton(m, device))
    trt, ort = probe_tensorrt(m, bool(gpu["gpus"])), probe_onnxruntime(m)
    sections += [trt, ort, probe_opencv(m), probe_cameras(m), probe_compiler(m), probe_jetson(m)]
    if bundle:
        sections.append(probe_bundle(m, bundle, device, trt, ort))
    return sections


def format_report(sections: List[Dict[str, Any]]) -> str:
    """The report as text: one line a section, marked ok, -- (missing or wrong) or a blank (information)."""
    width = max(len(s["name"]) for s in sections)
    mark = {True: "ok", False: "--", None: "  "}
    lines = []
    for s in sections:
        lines.append(f"{mark[s['ok']]} {s['name']:<{width}}  {s['summary']}")
        lines += [f"{'':{width + 5}}{detail}" for detail in s.get("details", [])]
    return "\n".join(lines)
