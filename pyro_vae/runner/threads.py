"""How many CPU threads a training step uses, chosen from the step times themselves.

torch parallelizes each operator over its intra-op threads (OpenMP), and every parallel
region ends at a barrier that waits for the slowest thread. On a machine where another
process keeps a core busy (a browser, a second job, CI), the thread that shares that core
stalls each barrier until the scheduler gives it the core back: on a 2-core machine a
step with 2 threads took 3-4x its quiet time beside a one-core busy loop, while 1 thread
took about 2x -- its share. No fixed setting is right for both: OpenMP's passive wait
policy avoids the stall but made the quiet step about 1.5x slower on the same machine
(docs/benchmarks.md, "A busy machine").

:class:`ThreadTuner` therefore measures. Training on the CPU runs synchronously, so the
clock between two steps is the step's cost (nothing is read from a device). The tuner
times windows of steps at the current thread count; at the start, every ``interval``
steps, and whenever a window is ``slack`` times slower than the count's reference, it
times one window at each other candidate count and keeps the fastest. The count did not
change the results where measured: training at 1 and at 2 threads gives bit-identical
weights (tests/test_threads.py; a plain 784-400-20 torch step too, checked by hand), so a tuned run
repeats and resumes exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..errors import get_logger

log = get_logger(__name__)


class ThreadTuner:
    """Keeps torch's intra-op thread count at the fastest of a few candidates.

    ``step_done()`` after every step; ``resume()`` before a run of steps that follows other
    work (the time in between is not a step's); ``close()`` restores the count it found.
    ``clock`` and ``set_threads`` are replaceable for tests.
    """

    def __init__(self, window: int = 16, interval: int = 1024, slack: float = 1.5,
                 clock: Callable[[], float] = time.perf_counter,
                 set_threads: Callable[[int], None] = torch.set_num_threads,
                 most: int | None = None):
        self.most = most if most is not None else torch.get_num_threads()
        self.candidates = sorted({self.most, max(1, self.most // 2), 1}, reverse=True)
        self.window, self.interval, self.slack = window, interval, slack
        self._clock, self._set = clock, set_threads
        self.current = self.most
        self.seconds: dict[int, float] = {}  # per step, the last window at each count
        self._to_try: list[int] = []
        self._exploring = False
        self._steps, self._since = 0, 0
        self._warm = False  # the first window holds tracing and validation: not timed
        self._mark = clock()

    @property
    def active(self) -> bool:
        return len(self.candidates) > 1

    def resume(self) -> None:
        self._steps, self._mark = 0, self._clock()

    def step_done(self) -> None:
        if not self.active:
            return
        self._steps += 1
        if self._steps < self.window:
            return
        now = self._clock()
        per_step = (now - self._mark) / self._steps
        self._steps, self._mark = 0, now
        if not self._warm:
            self._warm = True
            self._explore()
            return
        reference = self.seconds.get(self.current)
        self.seconds[self.current] = per_step
        if self._to_try:
            self._use(self._to_try.pop(0))
        elif self._exploring:
            self._exploring = False
            best = min(self.candidates, key=lambda c: self.seconds.get(c, float("inf")))
            if best != self.current:
                log.debug("intra-op threads: %d (%.2f ms per step) instead of %d (%.2f ms)",
                          best, 1e3 * self.seconds[best], self.current,
                          1e3 * self.seconds[self.current])
            self._use(best)
            self._since = 0
        else:
            self._since += self.window
            if self._since >= self.interval or (reference is not None
                                                and per_step > self.slack * reference):
                self._explore()

    def _explore(self) -> None:
        """Time one window at every candidate, the current one last."""
        self._exploring = True
        self._to_try = [c for c in self.candidates if c != self.current] + [self.current]
        self._use(self._to_try.pop(0))

    def _use(self, count: int) -> None:
        if count != self.current:
            self._set(count)
            self.current = count

    def close(self) -> None:
        self._use(self.most)
