"""SIGINT (Ctrl-C) and SIGTERM become a flag that training checks between two steps."""

from __future__ import annotations

import contextlib
import signal
import threading

from ..errors import get_logger

log = get_logger(__name__)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps (a second one aborts)."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:  # abort; a third signal must not break the unwinding
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("stopping after this step (press Ctrl-C again to abort at once)")

    @contextlib.contextmanager
    def installed(self):
        """Install the handlers (main thread only; elsewhere a no-op) and restore them."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
