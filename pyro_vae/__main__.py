"""``python -m pyro_vae`` and the ``pyro-vae`` command: :func:`run` starts the tool.

A Ctrl-C (or SIGTERM) ends the command with status 130 and one line at every moment:

- while torch and pyro are imported, the handler itself writes the line and leaves
  (``os._exit``): nothing has been written yet, and a ``KeyboardInterrupt`` raised inside
  the import machinery is not safe to unwind (it can land in one of importlib's weakref
  callbacks, where Python prints "Exception ignored ... Traceback" and carries on, or leave
  a half-imported numpy whose teardown fails);
- while a command runs, the first signal raises ``KeyboardInterrupt`` (training installs its
  own handlers: stop after this step) and every later one is ignored, so a second Ctrl-C
  cannot interrupt the unwinding of the first;
- after the command has decided its status, signals are ignored, so a late Ctrl-C cannot
  kill the process by the signal and lose that status.
"""

import os
import signal
import sys

EXIT_INTERRUPTED = 130
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _leave_now(signum, frame):
    for s in _SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    os.write(2, b"pyro-vae: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def _interrupt_once(signum, frame):
    for s in _SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt


def run() -> int:
    for s in _SIGNALS:
        signal.signal(s, _leave_now)
    from .cli import main  # torch and pyro: seconds

    for s in _SIGNALS:  # SIGTERM as Ctrl-C, until training installs its own
        signal.signal(s, _interrupt_once)
    try:
        code = main()
    except KeyboardInterrupt:  # arrived after main had caught what it catches
        print("pyro-vae: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    finally:  # the moment main is left the status is decided: no signal may change it
        for s in _SIGNALS:
            signal.signal(s, signal.SIG_IGN)
    if code == EXIT_INTERRUPTED:
        # leave now, without the interpreter's teardown (torch's threads, a second signal);
        # what training had to keep is saved before main returns
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(run())
