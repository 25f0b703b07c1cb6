"""Progress of long work: a bar on a terminal, log lines with the time left elsewhere.

On a terminal (stderr is a TTY) :class:`Progress` draws a tqdm bar. Elsewhere (a log
file, CI, a notebook, a batch job) a bar would be noise or nothing, so it logs a line at
every tenth of the work (or every item, for few slow items) with the time left, estimated
from the pace so far. Library code only logs; the command-line tool shows the lines.
"""

from __future__ import annotations

import sys
import time

from tqdm.std import tqdm

from .errors import get_logger

log = get_logger(__name__)


def stderr_is_terminal() -> bool:
    return sys.stderr is not None and sys.stderr.isatty()


def duration(seconds: float) -> str:
    """``42 s``, ``3.5 min`` or ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Counts ``total`` units of work named ``desc``.

    ``show``: ``None`` -- a bar on a terminal, log lines elsewhere; ``False`` -- nothing;
    ``"bar"`` -- a bar on a terminal, nothing elsewhere (for work that logs on its own).
    ``every``: the fraction of the work between two log lines (``1 / total`` logs each
    unit).
    """

    def __init__(self, total: int, desc: str, unit: str = "batch", show: bool | str | None = None,
                 initial: int = 0, every: float = 0.1):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = self.start_done = initial
        terminal = stderr_is_terminal()
        self._bar = None
        self._lines = show in (None, True) and not terminal
        if show is not False and terminal:
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False,
                             file=sys.stderr)
        self._step = max(1, round(every * total))
        self._next = initial + self._step
        self._start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        if self._lines and (self.done >= self._next or self.done == self.total):
            self._next = self.done + self._step
            log.info("%s: %s", self.desc, self.status())

    def status(self) -> str:
        """``40% (4/10 images), 12 s left``."""
        elapsed = time.perf_counter() - self._start
        pace = elapsed / max(self.done - self.start_done, 1)
        left = pace * (self.total - self.done)
        share = 100 * self.done / self.total if self.total else 100
        return (f"{share:.0f}% ({self.done}/{self.total} {self.unit}s), "
                f"{duration(elapsed)} so far, about {duration(left)} left")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
