"""HTTP preview (bound to 127.0.0.1 by default): ``/`` a live page with the annotated MJPEG
stream and the current FPS, engine and keep ratio; ``/stream.mjpg``; ``/stats`` JSON;
``/metrics`` in Prometheus text format."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>dynprune</title>
<style>body{font-family:sans-serif;background:#111;color:#eee;margin:1em}img{max-width:100%%}
#s{font-size:1.2em;margin:.5em 0}</style></head><body><h2>dynprune serve</h2>
<div id="s">waiting for frames...</div><img src="/stream.mjpg">
<script>async function t(){try{const r=await fetch('/stats');const s=await r.json();
document.getElementById('s').textContent=`${s.fps.toFixed(1)} FPS · engine ${s.engine} · keep `+
(s.keep_ratio===null?'-':s.keep_ratio.toFixed(2))+` · frame ${s.frames}`}catch(e){}}setInterval(t,500)</script>
</body></html>"""


class LiveState:
    """What the serving loop publishes and the HTTP handlers read."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.jpeg: Optional[bytes] = None
        self.seq = 0
        self.stats: Dict[str, Any] = {"fps": 0.0, "engine": None, "keep_ratio": None, "frames": 0}
        self.counters: Dict[str, Any] = {"frames_by_engine": {}, "switches": 0, "reconnects": 0,
                                         "stage_ms": {}}
        self.closed = False

    def publish(self, jpeg: Optional[bytes], stats: Dict[str, Any]) -> None:
        with self.cond:
            if jpeg is not None:
                self.jpeg = jpeg
                self.seq += 1
            self.stats = stats
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def metrics(self) -> str:
        s, c = self.stats, self.counters
        lines = [
            "# HELP dynprune_frames_total Frames processed, by engine.", "# TYPE dynprune_frames_total counter",
        ]
        for eng, n in sorted(c["frames_by_engine"].items()):
            lines.append(f'dynprune_frames_total{{engine="{eng}"}} {n}')
        lines += ["# HELP dynprune_fps Frames per second over the last second.", "# TYPE dynprune_fps gauge",
                  f"dynprune_fps {float(s.get('fps') or 0.0):.4f}",
                  "# HELP dynprune_keep_ratio Mean fraction of hidden channels the gates kept, last frame.",
                  "# TYPE dynprune_keep_ratio gauge",
                  f"dynprune_keep_ratio {float(s['keep_ratio']) if s.get('keep_ratio') is not None else 'NaN'}",
                  "# HELP dynprune_latency_ms Moving-average latency per stage, milliseconds.",
                  "# TYPE dynprune_latency_ms gauge"]
        for (eng, stage), ms in sorted(c["stage_ms"].items()):
            lines.append(f'dynprune_latency_ms{{engine="{eng}",stage="{stage}"}} {ms:.4f}')
        lines += ["# HELP dynprune_engine_switches_total Engine switches made by the policy.",
                  "# TYPE dynprune_engine_switches_total counter", f"dynprune_engine_switches_total {c['switches']}",
                  "# HELP dynprune_source_reconnects_total Times the source was reopened after a loss.",
                  "# TYPE dynprune_source_reconnects_total counter",
                  f"dynprune_source_reconnects_total {c['reconnects']}"]
        return "\n".join(lines) + "\n"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PreviewServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A viewer that closes its tab mid-frame is normal: one debug line, no traceback."""
        import logging
        import sys

        exc = sys.exc_info()[1]
        log = logging.getLogger("dynprune.serve")
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("preview client %s went away: %s", client_address[0], exc)
        else:
            log.warning("preview request from %s failed: %s: %s", client_address[0], type(exc).__name__, exc)


def make_server(state: LiveState, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """Serve the preview on ``host:port`` from a daemon thread; a port in use or an address this
    machine does not have raises ``ValueError`` naming the flag."""
    import socket
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep the terminal for the serving log
            pass

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/":
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/stats":
                self._send(200, json.dumps(state.stats).encode(), "application/json")
            elif path == "/metrics":
                self._send(200, state.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
            elif path == "/stream.mjpg":
                self._stream()
            else:
                self._send(404, b"not found: try /, /stream.mjpg, /stats or /metrics\n", "text/plain")

        def _stream(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            seen = -1
            try:
                while True:
                    with state.cond:
                        state.cond.wait_for(lambda s=seen: state.seq != s or state.closed, timeout=5)
                        if state.closed:
                            return
                        jpeg, seen = state.jpeg, state.seq
                    if jpeg is None:
                        continue
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                     + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
            except (ConnectionError, TimeoutError):  # the viewer closed the page
                return

    try:
        server = PreviewServer((host, port), Handler)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address of this machine ({e.strerror}); use 127.0.0.1, or "
                         "0.0.0.0 for every interface") from e
    except OSError as e:
        import errno

        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--http {port}: the port is in use on {host}; pick another port, or stop the program "
                             "using it") from e
        if e.errno == errno.EACCES:
            raise ValueError(f"--http {port}: not allowed to listen on it (ports below 1024 need root); pick one "
                             "above 1024") from e
        raise ValueError(f"--host {host} --http {port}: cannot listen ({e.strerror}); use an address of this "
                         "machine (127.0.0.1, 0.0.0.0)") from e
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
