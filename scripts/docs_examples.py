"""Write the example outputs shown in docs/evaluation.md and docs/diagnostics.md.

Runs the commands the docs show, on the run that ``make run`` trains (made reproducible
everywhere with ``--dataset mnist-sample``), and puts what they print -- and how long
they took -- between the docs' ``<!-- example: NAME -->`` markers, so the docs cannot
drift from what the commands print:

    python -m scripts.docs_examples            # about 4 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scripts._docs import machine_description

ROOT = Path(__file__).resolve().parents[1]
RUN = "runs/quickstart"
TRAIN = ["train", "--out", RUN, "--epochs", "10", "--dataset", "mnist-sample", "--force",
         "--quiet"]
EXAMPLES = {
    "evaluate": ("docs/evaluation.md", ["evaluate", RUN, "--iwae-samples", "200", "--quiet"]),
    "diagnose": ("docs/diagnostics.md",
                 ["diagnose", RUN, "--images", "2", "--num-samples", "200", "--warmup", "200",
                  "--iwae-samples", "1000"]),
}


def pyro_vae(args: list[str]) -> tuple[str, str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pyro_vae", *args], cwd=ROOT, text=True,
                          capture_output=True, check=True)
    return done.stdout, done.stderr, time.perf_counter() - start


def splice(doc: Path, name: str, body: str) -> None:
    """Replace what stands between ``<!-- example: name -->`` and ``<!-- /example -->``."""
    text = doc.read_text()
    pattern = re.compile(rf"(<!-- example: {name} -->\n).*?(<!-- /example -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{doc} has no <!-- example: {name} --> marker")
    doc.write_text(pattern.sub(lambda m: m[1] + body.rstrip() + "\n" + m[2], text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    pyro_vae(TRAIN)
    machine = machine_description()
    for name, (doc, args) in EXAMPLES.items():
        stdout, stderr, seconds = pyro_vae(args)
        notes = [line for line in stderr.splitlines() if "expected about" in line]
        shown = "\n".join([*notes, stdout.rstrip()])
        body = (f"`pyro-vae {' '.join(args)}` printed, after `pyro-vae {' '.join(TRAIN)}` "
                f"({seconds:.0f} s on a {machine}):\n\n```\n{shown}\n```")
        splice(ROOT / doc, name, body)
        print(f"{doc}: {name} ({seconds:.0f} s)")
    shutil.copy(ROOT / RUN / "figures" / "diagnostics_pairs.png",
                ROOT / "docs" / "figures" / "diagnostics_pairs.png")


if __name__ == "__main__":
    main()
