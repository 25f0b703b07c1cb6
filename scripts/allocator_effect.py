"""What glibc's malloc settings do to the training step (pyro_vae/runner/allocator.py).

Runs pyro-vae's Trainer (traced step, 784-400-20, dynamic binarization, the benchmark's
data) in fresh processes, with glibc's defaults and with :func:`keep_freed_memory`,
alternating, and reports seconds per epoch (median of the timed epochs after a warm-up
epoch) and the page faults per step. The setting acts on the whole process, once, so it
cannot be compared inside one process as the benchmark's contenders are. Writes the
section "Allocator (cpu)" of docs/benchmarks.md:

    python -m scripts.allocator_effect [--batch-sizes 128 1024] [--rounds 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from scripts._docs import machine_description, update_section

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> None:
    from pyro_vae.runner.allocator import keep_freed_memory
    from scripts.benchmark import load_images, pyro_vae_trainer

    kept = keep_freed_memory() if args.keep else False
    torch.manual_seed(0)
    x, source = load_images(argparse.Namespace(data_dir=args.data_dir, images=args.images))
    contender = pyro_vae_trainer(x, args.batch_size, torch.device("cpu"))
    contender.epoch(0)
    seconds, faults = [], []
    for epoch in range(1, args.epochs + 1):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        contender.epoch(epoch)
        seconds.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    steps = -(-len(x) // args.batch_size)
    print(json.dumps({"kept": kept, "seconds": seconds, "source": source,
                      "faults_per_step": statistics.median(faults) / steps}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    runs: dict[tuple[int, bool], list[dict]] = {}
    for _ in range(args.rounds):
        for b in args.batch_sizes:
            for keep in (False, True):
                command = [sys.executable, "-m", "scripts.allocator_effect", "--child",
                           "--batch-size", str(b), "--epochs", str(args.epochs),
                           "--images", str(args.images), *(["--keep"] if keep else []),
                           *(["--data-dir", str(args.data_dir)] if args.data_dir else [])]
                out = subprocess.run(command, check=True, capture_output=True, text=True,
                                     cwd=ROOT).stdout.strip().splitlines()[-1]
                runs.setdefault((b, keep), []).append(json.loads(out))
                print(f"batch {b}, kept {keep}: {runs[(b, keep)][-1]['seconds']}",
                      file=sys.stderr)
    source = next(iter(runs.values()))[0]["source"]
    lines = [f"`python -m scripts.allocator_effect --batch-sizes "
             f"{' '.join(map(str, args.batch_sizes))} --rounds {args.rounds} --epochs "
             f"{args.epochs}"
             + (f" --images {args.images}" if args.images != 60000 else "")
             + f"` on a {machine_description()}, quiet; {args.images:,} images "
             f"({source}). pyro-vae's Trainer (traced step) in fresh processes, alternating: "
             "glibc's malloc as it starts, and with `keep_freed_memory()` (what `pyro-vae "
             "train` sets on the CPU). Seconds per epoch: median over rounds of each "
             "process's median epoch; page faults per step counted by `getrusage`.",
             "", "| batch | glibc default: s / epoch | kept: s / epoch | speed-up | "
             "page faults per step, default / kept |", "|---:|---:|---:|---:|---:|"]
    for b in args.batch_sizes:
        default, kept = (statistics.median(statistics.median(r["seconds"])
                                           for r in runs[(b, k)]) for k in (False, True))
        faults = [statistics.median(r["faults_per_step"] for r in runs[(b, k)])
                  for k in (False, True)]
        lines.append(f"| {b} | {default:.3f} | {kept:.3f} | {default / kept:.2f}x | "
                     f"{faults[0]:,.0f} / {faults[1]:,.0f} |")
    body = "\n".join(lines)
    print(body)
    update_section(args.doc, "Allocator (cpu)", body)


if __name__ == "__main__":
    main()
