"""How a serving process shares the CPU: its thread count, chosen by trial while it serves.

PyTorch's intra-op pool and the compiled CPU blocks (``kernels/cpu_blocks.c``) share one OpenMP
runtime, whose idle threads spin before they sleep. Alone on the machine that is what makes the
many short parallel regions of a frame fast (sleeping at once, ``OMP_WAIT_POLICY=PASSIVE``,
costs the dynamic engine about a quarter of its solo FPS on 2 cores). Beside another busy
process it is ruinous: a thread that waits at a barrier for a sibling the kernel has preempted
burns the core the sibling needs, and every barrier of a frame then costs a scheduler time
slice (5x slower frames on 2 cores with one busy process beside them). On a Jetson the camera
pipeline, the HTTP server and the OS always share the cores.

So the wait policy stays libgomp's, and :class:`ThreadGovernor` chooses the thread count the way
``cudnn.benchmark`` chooses algorithms: by timing. At the start, and at once when frames suddenly
slow down, a few frames run with another thread count; the faster count wins (by a margin).
Alone, the governor keeps all cores after one trial; shared, it drops to the count that leaves
room and tries every few seconds to come back. docs/DESIGN.md, "Sharing the CPU", gives the measurements.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Tuple

log = logging.getLogger("dynprune.serve")


def configure_threads(threads: Optional[int]) -> int:
    """Use ``threads`` CPU threads for PyTorch and the compiled runtime (both follow
    ``torch.get_num_threads()``); ``None`` keeps PyTorch's default count, one per core this process
    may run on. Returns the count in force."""
    import torch

    # Set even when it is the default count: bench processes that never called it ran every engine
    # 12-15% slower (ONNX Runtime's included), and the same count set explicitly closed the gap
    # (BENCHMARKS.md, "Sharing the CPU").
    torch.set_num_threads(int(threads) if threads else torch.get_num_threads())
    return torch.get_num_threads()


def _median(values) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


class ThreadGovernor:
    """Picks the CPU thread count of a frame loop by trial.

    Call :meth:`before_frame` before each frame (it sets the count the frame runs with) and
    :meth:`after_frame` with the frame's milliseconds. Frames are compared per engine (engines
    differ in cost); a trial runs ``trial_frames`` frames of one engine at another count and
    switches when their median beats the current count's recent median by ``margin``. Trials
    run once at the start, whenever frames suddenly slow down (``slowdown`` x their recent
    median), and every ``every_s`` seconds while fewer than all threads are in use (to come back
    when the cores free up): with every thread and steady frames there are none.

    ``set_threads`` and ``clock`` are injectable for tests; by default they are
    ``torch.set_num_threads`` and ``time.perf_counter``.
    """

    def __init__(self, max_threads: int, every_s: float = 3.0, trial_frames: int = 4, margin: float = 0.1,
                 slowdown: float = 1.8, history: int = 8, set_threads: Optional[Callable[[int], None]] = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if set_threads is None:
            import torch

            set_threads = torch.set_num_threads
        self.options: List[int] = sorted({max(1, max_threads), max(1, max_threads // 2), 1}, reverse=True)
        self.current = self.options[0]
        self.every_s, self.trial_frames, self.margin, self.slowdown = every_s, trial_frames, margin, slowdown
        self.history = history
        self._set, self._clock = set_threads, clock
        self._applied: Optional[int] = self.current  # the caller's count is in force: set nothing until it changes
        self._recent: Dict[Tuple[str, int], Deque[float]] = {}
        self._trial: Optional[Dict] = None  # {"engine", "threads", "times"}
        self._next_trial = clock()  # the first trial as soon as there is a baseline
        self._next_option = 0
        self.switches: List[Tuple[int, int, str]] = []  # (from, to, why)
        self.trials = 0  # trials started (each costs up to trial_frames frames at another count)
        self._slowed = False  # frames at the current count suddenly slowed down since the last trial

    @property
    def enabled(self) -> bool:
        return len(self.options) > 1

    def _apply(self, threads: int) -> None:
        if threads != self._applied:
            self._set(threads)
            self._applied = threads

    def _alternative(self) -> int:
        others = [t for t in self.options if t != self.current]
        t = others[self._next_option % len(others)]
        self._next_option += 1
        return t

    def before_frame(self, engine: str) -> int:
        """The thread count for the next frame of ``engine`` (already set)."""
        if not self.enabled:
            self._apply(self.current)
            return self.current
        baseline = self._recent.get((engine, self.current), ())
        if self._trial is None and len(baseline) >= self.trial_frames and self._clock() >= self._next_trial \
                and (self.trials == 0 or self.current != self.options[0] or self._slowed):
            self._trial = {"engine": engine, "threads": self._alternative(), "times": []}
            self.trials += 1
            self._slowed = False
        threads = self._trial["threads"] if self._trial and self._trial["engine"] == engine else self.current
        self._apply(threads)
        return threads

    def after_frame(self, engine: str, threads: int, ms: float) -> None:
        """Record a frame of ``engine`` that ran ``ms`` milliseconds with ``threads`` threads."""
        if not self.enabled:
            return
        trial = self._trial
        if trial is not None and trial["engine"] == engine and trial["threads"] == threads:
            trial["times"].append(ms)
            if len(trial["times"]) >= self.trial_frames:
                self._decide(engine, trial)
            return
        key = (engine, threads)
        recent = self._recent.setdefault(key, deque(maxlen=self.history))
        if threads == self.current and len(recent) >= self.trial_frames and trial is None \
                and ms > self.slowdown * _median(recent):
            self._slowed = True  # frames suddenly slower: something else wants the cores
            self._next_trial = self._clock()
        recent.append(ms)

    def _decide(self, engine: str, trial: Dict) -> None:
        now_ms = _median(self._recent[(engine, self.current)])
        tried_ms = _median(trial["times"])
        if tried_ms < (1 - self.margin) * now_ms:
            why = (f"{engine} frames {now_ms:.1f} ms with {self.current} threads, "
                   f"{tried_ms:.1f} ms with {trial['threads']}")
            log.warning("CPU threads %d -> %d: %s", self.current, trial["threads"], why)
            self.switches.append((self.current, trial["threads"], why))
            self.current = trial["threads"]
            self._recent[(engine, self.current)] = deque(trial["times"], maxlen=self.history)
        else:
            # the trial's frames also say how the other count does now: keep them for its next turn
            self._recent[(engine, trial["threads"])] = deque(trial["times"], maxlen=self.history)
        self._trial = None
        self._next_trial = self._clock() + self.every_s
