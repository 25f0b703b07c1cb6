"""Training speed on a quiet machine and beside a busy core, contender by contender.

A second process that keeps one core busy (a browser, another job, CI) is where users
train. Each contender trains the PyTorch example's network (784-400-20, batch 128) on
the same images in a fresh process -- thread settings must be made before torch starts --
once on a quiet machine and once beside a one-core busy loop (a Python loop in another
process that stops itself), interleaved contender by contender:

- plain PyTorch, eager, with OpenMP's defaults (threads spin while they wait);
- plain PyTorch with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once);
- pyro-vae's Trainer with the fast step, the thread count fixed at torch's default;
- pyro-vae's Trainer with the fast step and its :class:`~pyro_vae.runner.threads.ThreadTuner`
  (what ``pyro-vae train`` runs on the CPU), the step traced, and compiled (what long runs
  choose; compiled in the untimed warm-up epoch);
- NumPyro's examples/vae, the whole epoch in one jitted ``fori_loop`` (where installed);
- ``pyro-vae train`` end to end (its ``images_per_second``, after the first epoch).

Reports milliseconds per step (median over the timed epochs), the ratio loaded / quiet,
and writes the "Training under load (cpu)" section of docs/benchmarks.md.

    python -m scripts.benchmark_load [--images 20000] [--epochs 3] [--data-dir MNIST_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
BATCH = 128

# (name, environment, child kind)
CONTENDERS = [
    ("plain PyTorch, eager (OpenMP defaults)", {}, "plain"),
    ("plain PyTorch, eager, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, "plain"),
    ("pyro-vae Trainer, fast step, threads fixed", {}, "pyro-vae-fixed"),
    ("pyro-vae Trainer, fast step, thread tuner (pyro-vae train)", {}, "pyro-vae"),
    ("pyro-vae Trainer, compiled step, thread tuner (long runs of pyro-vae train)", {},
     "pyro-vae-compiled"),
    ("NumPyro examples/vae: the epoch in one jitted fori_loop", {}, "numpyro"),
    ("pyro-vae train, end to end", {}, "cli"),
]


def hog(seconds: float) -> subprocess.Popen:
    """A busy loop in a second process, on one core, that stops itself."""
    return subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + "
                             f"{seconds}\nwhile time.time() < end: pass"])


def child(kind: str, args) -> dict:
    """Run in a fresh process: ms per step of ``kind``'s epochs (median of the timed)."""
    import torch

    from scripts.benchmark import Contender, load_images, plain, pyro_vae_trainer

    x, _ = load_images(args)
    steps = -(-len(x) // BATCH)
    if kind == "plain":
        contender = plain(x, BATCH, torch.device("cpu"))
    elif kind.startswith("pyro-vae"):
        from pyro_vae.runner.allocator import keep_freed_memory

        keep_freed_memory()  # as `pyro-vae train` sets its process
        contender = pyro_vae_trainer(x, BATCH, torch.device("cpu"),  # compiled in epoch 0
                                     threads=kind != "pyro-vae-fixed",
                                     compile=kind == "pyro-vae-compiled")
    else:
        from scripts import numpyro_vae

        contender = numpyro_vae.contenders(x, BATCH, Contender)[1]
        steps = len(x) // BATCH  # full batches only, as NumPyro's example
    contender.epoch(0)
    seconds = []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        contender.epoch(epoch)
        seconds.append(time.perf_counter() - start)
    return {"ms_per_step": 1e3 * statistics.median(seconds) / steps,
            "threads": torch.get_num_threads()}


def cli_run(args) -> dict:
    folder = args.data_dir or SHARED_MNIST
    data = (["--dataset", "mnist", "--data-dir", str(folder)] if folder.is_dir()
            else ["--dataset", "mnist-sample"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "pyro_vae", "train", *data, "--train-limit",
                        str(args.images), "--epochs", str(args.epochs + 1), "--batch-size",
                        str(BATCH), "--device", "cpu", "--quiet", "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        rates = [json.loads(line)["images_per_second"]
                 for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {"ms_per_step": 1e3 * BATCH / statistics.median(rates), "threads": None}


def measure(kind: str, env: dict, args) -> dict:
    if kind == "cli":
        return cli_run(args)
    command = [sys.executable, "-m", "scripts.benchmark_load", "--child", kind,
               "--images", str(args.images), "--epochs", str(args.epochs)]
    if args.data_dir:
        command += ["--data-dir", str(args.data_dir)]
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--only", nargs="+", metavar="KIND",
                        help="run these kinds only: " + ", ".join(k for _, _, k in CONTENDERS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=Path("docs/results/benchmark_load_cpu.json"))
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    from scripts import numpyro_vae
    from scripts._docs import machine_description, update_section

    rows = []
    for name, env, kind in CONTENDERS:
        if (kind == "numpyro" and not numpyro_vae.available()) or (
                args.only and kind not in args.only):
            continue
        quiet = measure(kind, env, args)
        busy = hog(3600)
        try:
            time.sleep(0.5)
            loaded = measure(kind, env, args)
        finally:
            busy.kill()
            busy.wait()
        rows.append({"name": name, "quiet_ms": quiet["ms_per_step"],
                     "loaded_ms": loaded["ms_per_step"],
                     "ratio": loaded["ms_per_step"] / quiet["ms_per_step"]})
        print(f"{name}: quiet {quiet['ms_per_step']:.2f} ms, beside a busy core "
              f"{loaded['ms_per_step']:.2f} ms ({rows[-1]['ratio']:.2f}x)", file=sys.stderr,
              flush=True)
    result = {"machine": machine_description("cpu"), "images": args.images,
              "epochs": args.epochs, "batch_size": BATCH, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    update_section(args.doc, "Training under load (cpu)", report(args, result))


def report(args, result) -> str:
    plain = next((r["quiet_ms"] for r in result["rows"] if r["name"] == CONTENDERS[0][0]),
                 None)
    lines = [
        f"Command: `python -m scripts.benchmark_load --images {args.images} --epochs "
        f"{args.epochs}`. Machine: {result['machine']}.",
        "",
        f"{args.images:,} images per epoch, 784-400-20 ReLU, batch {BATCH}; each contender in "
        "a fresh process, once quiet and once beside a busy loop that keeps one core busy "
        "(another process), one after the other; median of "
        f"{args.epochs} timed epochs after a warm-up epoch. *loaded / quiet*: how much the "
        "busy core slows it (its fair share on two cores is 2x: half the machine); "
        "*vs plain*: against the plain eager loop on the quiet machine.",
        "",
        "| loop | quiet ms / step | beside a busy core | loaded / quiet | vs plain (quiet) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        versus = f"{r['quiet_ms'] / plain:.2f}" if plain else "--"
        lines.append(f"| {r['name']} | {r['quiet_ms']:.2f} | {r['loaded_ms']:.2f} | "
                     f"{r['ratio']:.2f}x | {versus} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
