"""The thread governor: keeps all cores alone, drops to fewer when they are shared, and comes back."""

from dynprune.runtime import ThreadGovernor


class FakeMachine:
    """Frames whose time depends on the thread count and on whether the cores are shared."""

    def __init__(self) -> None:
        self.now = 0.0
        self.shared = False
        self.threads_set = []

    def clock(self) -> float:
        return self.now

    def set_threads(self, n: int) -> None:
        self.threads_set.append(n)

    def frame_ms(self, threads: int) -> float:
        if self.shared:
            return {2: 40.0, 1: 12.0}[threads]  # spinning siblings preempted at every barrier
        return {2: 6.0, 1: 10.0}[threads]


def _serve(gov: ThreadGovernor, machine: FakeMachine, frames: int, engine: str = "dynamic"):
    used = []
    for _ in range(frames):
        t = gov.before_frame(engine)
        ms = machine.frame_ms(t)
        machine.now += ms / 1e3
        gov.after_frame(engine, t, ms)
        used.append(t)
    return used


def test_alone_it_keeps_every_core_after_one_short_trial():
    m = FakeMachine()
    gov = ThreadGovernor(2, every_s=3.0, trial_frames=4, set_threads=m.set_threads, clock=m.clock)
    used = _serve(gov, m, 2000)  # 12 s of steady 6 ms frames
    assert gov.current == 2 and not gov.switches and gov.trials == 1
    assert used[:4] == [2, 2, 2, 2] and used[4:8] == [1, 1, 1, 1] and used.count(1) == 4


def test_shared_cores_drop_to_one_thread_and_it_comes_back_when_they_free_up():
    m = FakeMachine()
    gov = ThreadGovernor(2, every_s=3.0, trial_frames=4, set_threads=m.set_threads, clock=m.clock)
    _serve(gov, m, 100)
    assert gov.current == 2
    m.shared = True
    used = _serve(gov, m, 20)
    assert gov.current == 1, "a sudden slowdown starts a trial at once, without waiting for the period"
    assert used.count(2) <= 4 + 4 + 1
    assert gov.switches[-1][:2] == (2, 1) and "12.0 ms with 1" in gov.switches[-1][2]
    m.shared = False
    _serve(gov, m, 1000)  # 10 s: trials every 3 s find 2 threads faster again
    assert gov.current == 2 and len(gov.switches) == 2


def test_engines_are_compared_with_themselves():
    """A cheap engine's frames never make an expensive one's look slow (the policy mixes them)."""
    m = FakeMachine()
    gov = ThreadGovernor(2, every_s=1e9, trial_frames=4, set_threads=m.set_threads, clock=m.clock)
    for i in range(200):
        engine, scale = ("dense", 3.0) if i % 2 else ("dynamic", 1.0)
        t = gov.before_frame(engine)
        gov.after_frame(engine, t, scale * m.frame_ms(t))
    assert gov.current == 2 and not gov.switches


def test_one_core_means_nothing_to_choose():
    m = FakeMachine()
    gov = ThreadGovernor(1, set_threads=m.set_threads, clock=m.clock)
    assert not gov.enabled
    assert set(_serve(gov, m, 50)) == {1}
    assert m.threads_set == []  # the count in force is never set again
