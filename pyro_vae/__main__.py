"""``python -m pyro_vae`` and the ``pyro-vae`` command: :func:`run` starts the tool.

A Ctrl-C (or SIGTERM) ends the command with status 130 and one line at every moment:
while torch is still being imported (before :func:`pyro_vae.cli.main` can catch it), and
after the command has decided its status, when a late second Ctrl-C would otherwise kill
the process by the signal and lose that status. An interrupted command leaves at once
(``os._exit``), without the interpreter's teardown of what it was importing.
"""

import os
import signal
import sys

EXIT_INTERRUPTED = 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C, until training installs its own
    code = EXIT_INTERRUPTED
    try:
        try:
            from .cli import main  # torch and pyro: seconds

            code = main()
        finally:  # the moment main is left the status is decided: no signal may change it
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except KeyboardInterrupt:  # while importing, or a second Ctrl-C while main reported one
        print("pyro-vae: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:
        # leave now: the interpreter's teardown of a half-imported numpy or torch can fail
        # (numpy: "cannot load module more than once per process", exit 1) or die of the
        # second Ctrl-C; what training had to keep is saved before main returns
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(run())
