"""Throughput of data-parallel training: torchrun with 1 and with 2 processes, same data.

Trains the default network (784-400-20) on mnist-sample tiled to --images images with
the same global batch size (per-rank batch = global / ranks), Gloo on the CPU or NCCL on
CUDA, and reports images per second of the last epochs. Writes the "Measured scaling"
section of docs/distributed.md.

    python -m scripts.distributed_scaling [--device cpu] [--epochs 3] [--global-batch 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts._docs import machine_description, update_section


def run(nproc, args, out, threads):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "-m", "pyro_vae", "train", "--dataset", "mnist-sample",
           "--epochs", str(args.epochs), "--batch-size", str(args.global_batch // nproc),
           "--device", args.device, "--quiet", "--out", str(out)]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rate = [r["images_per_second"] for r in records[1:]]  # the first epoch warms up
    return sum(rate) / len(rate), records[-1]["test_elbo"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--doc", type=Path, default=Path("docs/distributed.md"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, 2):
            threads = max(1, cores // nproc) if args.device == "cpu" else 1
            rate, elbo = run(nproc, args, Path(tmp) / f"r{nproc}", threads)
            rows.append({"ranks": nproc, "threads_per_rank": threads, "images_per_second": rate,
                         "test_elbo": elbo})
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"Command: `python -m scripts.distributed_scaling --device {args.device} "
             f"--epochs {args.epochs} --global-batch {args.global_batch}`. Machine: "
             f"{machine_description(args.device)}. mnist-sample (4,500 images), 784-400-20, "
             f"global batch {args.global_batch}; images per second averaged over epochs 2 to "
             f"{args.epochs}.", "",
             "| ranks | threads per rank | images / s | speed-up | test ELBO after "
             f"{args.epochs} epochs |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['threads_per_rank']} | {r['images_per_second']:,.0f} | "
                     f"{r['images_per_second'] / rows[0]['images_per_second']:.2f}x | "
                     f"{r['test_elbo']:.2f} |")
    update_section(args.doc, f"Measured scaling ({args.device})", "\n".join(lines))


if __name__ == "__main__":
    main()
