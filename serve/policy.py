"""The fallback policy (``--engine auto``): route frames to the fastest engine that holds the
accuracy bar, keep measuring, and switch with hysteresis when the balance changes.

* Start: every engine runs the first ``warmup`` frames; its median latency seeds a moving
  average.
* Eligible engines: AP50-95 (from the bundle) within ``ap_margin`` of the best engine's.
* Steady state: the active engine's latency is tracked by an exponential moving average; every
  ``probe_every`` frames each other eligible engine runs one frame (its result is used too, so
  nothing is wasted) to refresh its average. A switch needs the other engine to be faster by
  ``hysteresis`` (10%), so noise does not flip engines back and forth.
* Optional per-frame routing (``route_by_keep``): while a gated engine (dynamic or hybrid) is
  active, a frame goes to the static engine when the keep ratio its gates chose for the previous
  frame (video frames change slowly) is above that engine's measured break-even keep ratio.
Every switch is logged with the numbers behind it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

log = logging.getLogger("dynprune.serve")


@dataclass
class EngineStats:
    ema_ms: Optional[float] = None
    samples: List[float] = field(default_factory=list)
    frames: int = 0
    keep: List[Tuple[float, float]] = field(default_factory=list)  # (keep ratio, ms), gated engines only

    def add(self, ms: float, alpha: float) -> None:
        self.frames += 1
        self.samples.append(ms)
        self.ema_ms = ms if self.ema_ms is None else (1 - alpha) * self.ema_ms + alpha * ms


def eligible_engines(engines: List[str], ap: Dict[str, float], ap_margin: float = 0.02) -> Tuple[List[str], List[str]]:
    """``(eligible, dropped)``: the engines whose AP50-95 is within ``ap_margin`` of the best one's
    (or unknown), in ``engines``' order, and the rest, sorted. Only eligible engines serve frames."""
    best_ap = max((ap.get(e, 0.0) for e in engines), default=0.0)
    eligible = [e for e in engines if ap.get(e) is None or ap.get(e, 0.0) >= best_ap - ap_margin]
    return eligible, sorted(set(engines) - set(eligible))


class FallbackPolicy:
    def __init__(self, engines: List[str], ap: Dict[str, float], ap_margin: float = 0.02, warmup: int = 5,
                 probe_every: int = 100, hysteresis: float = 0.10, alpha: float = 0.1,
                 route_by_keep: bool = False) -> None:
        if not engines:
            raise ValueError("the policy needs at least one engine")
        self.eligible, dropped = eligible_engines(engines, ap, ap_margin)
        best_ap = max((ap.get(e, 0.0) for e in engines), default=0.0)
        if dropped:  # an engine the bundle ships will never serve a frame: say so without -v
            log.warning("engines %s not used: AP50-95 %s, more than %.3f below the best engine's %.4f",
                        ", ".join(dropped), ", ".join(f"{ap[e]:.4f}" for e in dropped), ap_margin, best_ap)
        self.dropped = dropped
        self.engines, self.ap = engines, ap
        self.warmup, self.probe_every, self.hysteresis, self.alpha = warmup, probe_every, hysteresis, alpha
        self.route_by_keep = route_by_keep
        self.stats = {e: EngineStats() for e in engines}
        self.active: Optional[str] = None
        self.frame = 0
        self.switches: List[Dict] = []
        self.last_keep: Dict[str, float] = {}  # per gated engine, its previous frame's keep ratio

    def choose(self) -> str:
        """The engine for the next frame."""
        i = self.frame
        if i < self.warmup * len(self.eligible):
            return self.eligible[i % len(self.eligible)]  # interleaved warm-up: same conditions for all
        if self.active is None:
            self._settle("warm-up finished")
        others = [e for e in self.eligible if e != self.active]
        if others and self.probe_every and i % self.probe_every == 0:
            return others[(i // self.probe_every) % len(others)]
        last = self.last_keep.get(self.active)
        if self.route_by_keep and last is not None and "static" in self.eligible:
            be = self.break_even(self.active)
            if be is not None and last > be:
                return "static"
        return self.active

    def record(self, engine: str, ms: float, keep_ratio: Optional[float] = None) -> None:
        st = self.stats[engine]
        if st.frames < self.warmup:  # warm-up frames: use the median, robust to first-call costs
            st.frames += 1
            st.samples.append(ms)
            st.ema_ms = float(np.median(st.samples))
        else:
            st.add(ms, self.alpha)
        if keep_ratio is not None:
            st.keep.append((keep_ratio, ms))
            self.last_keep[engine] = keep_ratio
        self.frame += 1
        if self.active is not None and engine != self.active:
            self._maybe_switch(engine)

    def _settle(self, why: str) -> None:
        timed = {e: self.stats[e].ema_ms for e in self.eligible if self.stats[e].ema_ms is not None}
        best = min(timed, key=timed.get)
        self._switch_to(best, f"{why}: " + ", ".join(f"{e} {ms:.1f} ms" for e, ms in sorted(timed.items())))

    def _maybe_switch(self, candidate: str) -> None:
        a, c = self.stats[self.active].ema_ms, self.stats[candidate].ema_ms
        if a is not None and c is not None and c < a * (1 - self.hysteresis):
            self._switch_to(candidate, f"{candidate} {c:.1f} ms < {self.active} {a:.1f} ms "
                                       f"by more than {self.hysteresis:.0%}")

    def _switch_to(self, engine: str, why: str) -> None:
        if engine == self.active:
            return
        event = {"frame": self.frame, "from": self.active, "to": engine, "why": why,
                 "latency_ms": {e: s.ema_ms for e, s in self.stats.items()}}
        self.switches.append(event)
        log.warning("engine %s -> %s at frame %d: %s", self.active, engine, self.frame, why)
        self.active = engine

    def break_even(self, engine: str = "dynamic") -> Optional[float]:
        """Keep ratio at which the gated ``engine`` is as slow as the static one (linear fit), if measured."""
        dyn, stat = self.stats.get(engine), self.stats.get("static")
        if dyn is None or stat is None or stat.ema_ms is None or len(dyn.keep) < 10:
            return None
        k, ms = np.array(dyn.keep).T
        if np.ptp(k) < 1e-3:
            return None
        slope, intercept = np.polyfit(k, ms, 1)
        if slope <= 0:
            return None
        return float((stat.ema_ms - intercept) / slope)
