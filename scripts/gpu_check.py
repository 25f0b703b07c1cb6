"""Everything a GPU has to show, in one command: run it first whenever a GPU is lent.

    python -m scripts.gpu_check [--data-dir MNIST_DIR] [--epochs 2]

1. the CUDA tests: an epoch with no host sync (``torch.cuda.set_sync_debug_mode``), the
   CUDA-graph step against the eager one and its exact resume, the enumerated M2 step
   captured in a graph, the binarized test set equal on CPU and CUDA, the VampPrior and IAF
   steps as CUDA graphs against eager (and their exact resume);
2. ``scripts.benchmark --device cuda`` at batch 128 and 1024 (the plain loop, a plain
   whole-step CUDA graph, Pyro's loops, pyro-vae's Trainer, NumPyro's loops where
   installed), which writes the "Training speed (cuda)" section of docs/benchmarks.md;
3. ``pyro-vae train --device cuda`` for 3 epochs end to end, timed.

Writes the "GPU check" section of docs/benchmarks.md with what each part found (and
``docs/results/gpu_check.json``). Sized to finish in under 8 minutes on one GPU; each
part has its own time limit and a part that fails or runs out of time is recorded as such
while the others still run. Without a CUDA device it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
CUDA_TESTS = [
    "tests/test_trainer.py::test_an_epoch_on_cuda_makes_no_host_sync",
    "tests/test_trainer.py::test_cuda_graph_training_matches_eager_training_and_resumes_exactly",
    "tests/test_semisupervised.py::"
    "test_the_enumerated_m2_step_is_captured_in_a_cuda_graph_with_no_host_sync",
    "tests/test_data.py::test_the_binarized_test_set_is_the_same_on_cpu_and_cuda",
    "tests/test_priors_flows.py::"
    "test_cuda_graph_training_of_vamp_and_iaf_matches_eager_and_resumes_exactly",
]


def parts(args) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of each part, in order."""
    data = args.data_dir or (SHARED_MNIST if SHARED_MNIST.is_dir() else None)
    data_flags = ["--dataset", "mnist", "--data-dir", str(data)] if data else \
        ["--dataset", "mnist-sample"]
    bench = [sys.executable, "-m", "scripts.benchmark", "--device", "cuda", "--epochs",
             str(args.epochs), "--batch-sizes", "128", "1024"]
    if data:
        bench += ["--data-dir", str(data)]
    return [
        ("CUDA tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-rs",
                        *CUDA_TESTS], 180),
        ("benchmark (cuda)", bench, 300),
        ("pyro-vae train --device cuda, 3 epochs", [
            sys.executable, "-m", "pyro_vae", "train", *data_flags, "--epochs", "3",
            "--device", "cuda", "--quiet", "--out", str(Path(args.scratch) / "run")], 120),
    ]


def run_part(name: str, command: list[str], limit: int) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        status, tail = done.returncode, (done.stdout + done.stderr).strip().splitlines()[-6:]
        outcome = "passed" if status == 0 else f"failed (exit {status})"
    except subprocess.TimeoutExpired:
        outcome, tail = f"ran out of its {limit} s", []
    seconds = time.perf_counter() - start
    print(f"{name}: {outcome} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return {"name": name, "outcome": outcome, "seconds": seconds, "last_lines": tail}


def report(results: list[dict], machine: str) -> str:
    lines = [f"Command: `python -m scripts.gpu_check`. Machine: {machine}.", "",
             "| part | outcome | seconds |", "|---|---|---:|"]
    lines += [f"| {r['name']} | {r['outcome']} | {r['seconds']:.0f} |" for r in results]
    lines += ["", "The last lines each part printed:", ""]
    for r in results:
        lines += [f"- **{r['name']}**: " + (" / ".join(f"`{x.strip()}`" for x in r["last_lines"]
                                                       if x.strip()) or "(nothing)")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--epochs", type=int, default=2, help="timed benchmark epochs")
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--json", type=Path, default=Path("docs/results/gpu_check.json"))
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with a GPU", file=sys.stderr)
        return 2
    from scripts._docs import machine_description, update_section

    with tempfile.TemporaryDirectory() as scratch:
        args.scratch = scratch
        results = [run_part(*part) for part in parts(args)]
    machine = machine_description("cuda")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "parts": results}, indent=2) + "\n")
    update_section(args.doc, "GPU check", report(results, machine))
    return 0 if all(r["outcome"] == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
