"""Two Ctrl-Cs at random moments: does ``pyro-vae train`` always exit 130 without a traceback?

Starts a small training run many times and sends SIGINT twice, at a random moment after
the start (while torch is imported, while the data loads, while training) and a random
gap apart (often 0: the second signal arrives while the first is being handled). Counts
the runs that ended otherwise: another status, a death by the signal, or "Traceback" /
"KeyboardInterrupt" on stderr. Writes the section "Two Ctrl-Cs at random moments" of
docs/reliability.md:

    python -m scripts.interrupt_sweep [--runs 120] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts._docs import machine_description, update_section

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--dataset", "mnist-sample", "--train-limit", "256", "--test-limit", "100",
         "--hidden-dims", "32", "--z-dim", "2", "--epochs", "400", "--quiet"]
GAPS = (0.0, 0.0, 0.001, 0.01, 0.05, 0.3, 1.0)  # seconds between the two signals


def _default_sigint() -> None:  # a sweep started in the background inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_twice(after: float, gap: float) -> tuple[int, str]:
    """Start training, send SIGINT ``after`` seconds later and again ``gap`` later."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, "-m", "pyro_vae", *TRAIN, "--out",
                                 f"{tmp}/run"], preexec_fn=_default_sigint, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(after)
        proc.send_signal(signal.SIGINT)
        time.sleep(gap)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=120)
    parser.add_argument("--latest", type=float, default=4.0,
                        help="the first signal comes 0.05 to this many seconds after the start")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "reliability.md")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    failures = []
    for i in range(args.runs):
        after, gap = rng.uniform(0.05, args.latest), rng.choice(GAPS)
        code, err = interrupt_twice(after, gap)
        if code != 130 or "Traceback" in err or "KeyboardInterrupt" in err:
            failures.append((after, gap, code, err.strip().splitlines()[:1]))
        print(f"\r{i + 1}/{args.runs} runs, {len(failures)} wrong", end="", file=sys.stderr)
    print(file=sys.stderr)
    body = (f"`python -m scripts.interrupt_sweep --runs {args.runs} --latest {args.latest:g} "
            f"--seed {args.seed}` on a {machine_description()}: two SIGINTs, the first "
            f"0.05-{args.latest:g} s after the start, the second 0-1 s later "
            f"(gaps {', '.join(f'{g:g}' for g in sorted(set(GAPS)))} s): "
            f"**{args.runs - len(failures)} of {args.runs} runs exited 130 with one line**.")
    if failures:
        body += "\n\nThe others (first signal, gap, status, first line of stderr):\n\n" + "\n".join(
            f"- {a:.2f} s, {g:g} s: {c}, {line}" for a, g, c, line in failures)
    print(body)
    update_section(args.doc, "Two Ctrl-Cs at random moments", body)


if __name__ == "__main__":
    main()
