"""Training speed of pyro-vae's own training loop against its anchors, side by side.

Every contender trains the PyTorch example's network (784-400-20, ReLU) on the same
60,000 MNIST images (``--data-dir`` with the four IDX files, else mnist-sample tiled), one
epoch at a time in turn (interleaved), so load on the machine affects all alike:

- plain PyTorch, eager (the PyTorch example's loss and ``torch.optim.Adam`` defaults);
  plain PyTorch with fused Adam; on CUDA, plain PyTorch with the whole step in a CUDA graph;
- Pyro's examples/vae style: ``pyro.infer.SVI.step`` with the param store;
- Pyro's ``Trace_ELBO.differentiable_loss`` + Adam (pyro-vae's step before the Trainer)
  and ``JitTrace_ELBO`` (the old ``--jit``);
- pyro-vae's :class:`~pyro_vae.runner.step.Trainer` -- ``fit_epoch``, the loop that
  ``pyro-vae train`` runs -- eager and with the fast step (traced graph on the CPU, CUDA
  graph on CUDA), for ``Trace_ELBO`` and ``TraceMeanField_ELBO``, and on the CPU the fast
  step compiled by Inductor (``--compile-step``) and the fast step with torch's BLAS in
  place of oneDNN for the matrix products;
- NumPyro's examples/vae (a jitted ``svi.update`` per step, and the whole epoch in one
  jitted ``lax.fori_loop``) where JAX and NumPyro are installed.

Reports the median seconds per epoch, images per second, the ratio to the plain eager loop
at the same batch size, peak memory, and host reads per step (on CUDA: synchronising
calls seen by ``torch.cuda.set_sync_debug_mode``; on the CPU, where nothing synchronises,
the same calls -- ``item``, ``bool``, ``tolist`` ... -- counted by a ``TorchFunctionMode``).
On the CPU the process first keeps freed memory for reuse (``keep_freed_memory``, as
``pyro-vae train`` does), for every contender alike. Then times ``pyro_vae.train`` end to
end on the same data. Writes JSON and the
"Training speed (DEVICE)" section of docs/benchmarks.md.

    python -m scripts.benchmark [--device cpu|cuda] [--epochs 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from torch.overrides import TorchFunctionMode

from pyro_vae import VAE, Objective, RunConfig, Trainer, make_elbo
from pyro_vae.data import DeviceBatches, load_mnist_sample, read_idx_split
from pyro_vae.runner.allocator import keep_freed_memory
from pyro_vae.runner.state import EpochProgress
from pyro_vae.runner.threads import ThreadTuner
from pyro_vae.runner.train import fit_epoch
from scripts import numpyro_vae
from scripts._docs import machine_description, update_section
from scripts.reference import ReferenceVAE

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Contender:
    """A training loop: ``epoch(n)`` runs epoch ``n``; ``step(x)`` one step (for counting)."""

    def __init__(self, name: str, batch_size: int, epoch: Callable[[int], None],
                 step: Callable[[torch.Tensor], object] | None = None, peak=None):
        self.name, self.batch_size, self.epoch, self.step = name, batch_size, epoch, step
        self.seconds: list[float] = []
        self.host_reads: float | None = None
        self.peak_bytes = 0


def eager_loop(loss_fn, optimizer, batches: DeviceBatches, device):
    """``(epoch, step)`` of a hand-written loop: zero_grad, backward, step; the epoch's
    loss summed on the device and read once."""
    def step(xb):
        loss = loss_fn(xb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def epoch(n):
        total = torch.zeros((), device=device)
        for xb in batches.batches(batches.permutation(n)):
            total += step(xb)
        total.item()

    return epoch, step


# -- plain PyTorch ------------------------------------------------------------------------


def plain(x, b, device, fused=False):
    vae = ReferenceVAE().to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, **({"fused": True} if fused else {}))
    batches = DeviceBatches(x, b, dynamic=True)

    name = "plain PyTorch, eager" + (", fused Adam" if fused else "")
    return Contender(name, b, *eager_loop(vae.loss, optimizer, batches, device))


def plain_cuda_graph(x, b, device):
    """The whole plain step (forward, backward, capturable Adam) in one CUDA graph."""
    vae = ReferenceVAE().to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, capturable=True)
    batches = DeviceBatches(x, b, dynamic=True)
    static_x = torch.bernoulli(x[:b])
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            vae.loss(static_x).backward()
            optimizer.step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = vae.loss(static_x)
        static_loss.backward()
        optimizer.step()

    def step(xb):
        if xb.shape != static_x.shape:  # the last, smaller batch: eager
            optimizer.zero_grad(set_to_none=True)
            loss = vae.loss(xb)
            loss.backward()
            optimizer.step()
            return loss.detach()
        static_x.copy_(xb)
        graph.replay()
        return static_loss.detach().clone()

    def epoch(n):
        total = torch.zeros((), device=device)
        for xb in batches.batches(batches.permutation(n)):
            total += step(xb)
        total.item()

    return Contender("plain PyTorch, whole step in a CUDA graph", b, epoch, step)


# -- Pyro ---------------------------------------------------------------------------------


def pyro_svi(x, b, device):
    """Pyro's examples/vae style: the networks in the param store, ``SVI.step``."""
    vae = VAE().to(device)

    def model(xb):
        pyro.module("decoder", vae.decoder)
        vae.model(xb)

    def guide(xb):
        pyro.module("encoder", vae.encoder)
        vae.guide(xb)

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    batches = DeviceBatches(x, b, dynamic=True)

    def epoch(n):
        for xb in batches.batches(batches.permutation(n)):
            svi.step(xb)

    return Contender("Pyro examples/vae style: SVI.step", b, epoch, svi.step)


def pyro_loss(x, b, device, jit=False):
    """Pyro's ELBO ``differentiable_loss`` + torch Adam: pyro-vae's step before the Trainer."""
    vae = VAE().to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    batches = DeviceBatches(x, b, dynamic=True)
    if jit:
        elbo = JitTrace_ELBO(ignore_jit_warnings=True)

        def model(xb, batch_size):
            pyro.module("jit_decoder", vae.decoder)
            vae.model(xb)

        def guide(xb, batch_size):
            pyro.module("jit_encoder", vae.encoder)
            vae.guide(xb)

        def loss_fn(xb):
            return elbo.differentiable_loss(model, guide, xb, batch_size=xb.shape[0])
    else:
        elbo = Trace_ELBO()

        def loss_fn(xb):
            return elbo.differentiable_loss(vae.model, vae.guide, xb)

    name = "JitTrace_ELBO" if jit else "Trace_ELBO"
    return Contender(f"Pyro {name}.differentiable_loss + Adam", b,
                     *eager_loop(loss_fn, optimizer, batches, device))


def pyro_vae_trainer(x, b, device, fast=True, elbo="trace", threads=False, compile=False,
                     onednn=True):
    """pyro-vae's Trainer: the loop ``pyro-vae train`` runs, nothing copied; ``threads``:
    with its thread tuner, as ``pyro-vae train`` runs it on the CPU; ``compile``: the traced
    step compiled by Inductor (``--compile-step``; compiled in the warm-up epoch);
    ``onednn=False``: the traced step's matrix products left to torch's BLAS."""
    config = RunConfig().train
    config.elbo = elbo
    vae = VAE().to(device)
    trainer = Trainer(Objective(vae, make_elbo(config), len(x)), 1e-3, fast=fast,
                      compile=compile, compile_batch=b, onednn=onednn)
    batches = DeviceBatches(x, b, dynamic=True)
    tuner = ThreadTuner() if threads and device.type == "cpu" else None

    def epoch(n):
        done = fit_epoch(trainer, batches, EpochProgress(batches.permutation(n)),
                         threads=tuner)
        done.loss_sum.item()  # the one read per epoch that training makes

    name = {"trace": "Trace_ELBO", "meanfield": "TraceMeanField_ELBO"}[elbo]
    way = {"traced": "fast step (traced graph)", "cuda-graph": "fast step (CUDA graph)",
           "eager": "eager step"}[trainer.mode]
    if trainer.compile:
        way = "fast step (Inductor-compiled graph)"
    if trainer.mode == "traced" and not trainer.onednn:
        way = way[:-1] + ", torch's BLAS products)"
    return Contender(f"pyro-vae Trainer, {name}, {way}", b, epoch, trainer.step)


# -- measuring ----------------------------------------------------------------------------


class HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's value to the host."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy",
             "nonzero"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


def host_reads_per_step(c: Contender, x, device, steps=5) -> float | None:
    if c.step is None:
        return None
    xb = torch.bernoulli(x[: c.batch_size])
    c.step(xb)
    sync(device)
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    c.step(xb)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen) / steps
    with HostReads() as reads:
        for _ in range(steps):
            c.step(xb)
    return reads.count / steps


def peak_memory(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def load_images(args) -> tuple[torch.Tensor, str]:
    folder = args.data_dir or (SHARED_MNIST if SHARED_MNIST.is_dir() else None)
    if folder is not None:
        x, _ = read_idx_split(folder, "train")
        return x[: args.images], "the real MNIST training set"
    sample = load_mnist_sample()
    reps = -(-args.images // len(sample.train_x))
    return sample.train_x.repeat(reps, 1)[: args.images], "mnist-sample tiled"


def end_to_end(args, device, batch_size) -> dict:
    """``pyro-vae train`` in its own process, as users run it: wall clock from start to
    exit, with the test ELBO and the checkpoint of every epoch and the closing figures."""
    folder = args.data_dir or SHARED_MNIST
    data = (["--dataset", "mnist", "--data-dir", str(folder)] if folder.is_dir()
            else ["--dataset", "mnist-sample"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "pyro_vae", "train", *data, "--epochs",
                   str(args.epochs), "--batch-size", str(batch_size), "--device", device.type,
                   "--quiet", "--out", str(out)]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        # the step the run chose (compile_step auto: by its length and Inductor's cache)
        compiled = json.loads((out / "config.json").read_text())["train"]["compile_step"]
    rates = [r["images_per_second"] for r in metrics]
    return {"batch_size": batch_size, "epochs": args.epochs, "wall_seconds": wall,
            "dataset": data[1], "compiled": bool(compiled),
            "images_per_second_median": statistics.median(rates),
            "images_per_second_after_first": statistics.median(rates[1:] or rates),
            "test_elbo": metrics[-1]["test_elbo"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per contender")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256, 1024])
    parser.add_argument("--quick", action="store_true", help="batch 128, fewer contenders")
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":  # as `pyro-vae train` does; the whole process, every contender
        keep_freed_memory()
    warnings.filterwarnings("ignore", message=".*torch.jit.trace.*")
    pyro.set_rng_seed(0)
    x_cpu, source = load_images(args)
    x = x_cpu.to(device)

    sizes = [128] if args.quick else args.batch_sizes
    contenders = []
    for b in sizes:
        contenders += [plain(x, b, device), plain(x, b, device, fused=True)]
        if device.type == "cuda":
            contenders.append(plain_cuda_graph(x, b, device))
        contenders += [pyro_svi(x, b, device), pyro_loss(x, b, device)]
        if b == 128 and not args.quick:
            contenders.append(pyro_loss(x, b, device, jit=True))
        contenders += [pyro_vae_trainer(x, b, device, fast=False),
                       pyro_vae_trainer(x, b, device),
                       *([pyro_vae_trainer(x, b, device, onednn=False)]
                         if device.type == "cpu" else []),
                       pyro_vae_trainer(x, b, device, elbo="meanfield")]
        if device.type == "cpu":
            contenders.append(pyro_vae_trainer(x, b, device, compile=True))
        contenders += numpyro_vae.contenders(x_cpu, b, Contender)
    for c in contenders:  # warm-up epoch (tracing, graph capture, JIT, caches)
        c.epoch(0)
        c.host_reads = host_reads_per_step(c, x, device)
        print(f"warm-up: {c.name}, batch {c.batch_size}", file=sys.stderr, flush=True)
    for epoch in range(1, args.epochs + 1):
        for c in contenders:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            c.epoch(epoch)
            sync(device)
            c.seconds.append(time.perf_counter() - start)
            c.peak_bytes = max(c.peak_bytes, peak_memory(device) or 0)
            print(f"epoch {epoch}: {c.name}, batch {c.batch_size}: {c.seconds[-1]:.2f} s",
                  file=sys.stderr, flush=True)
    rows = []
    for c in contenders:
        med = statistics.median(c.seconds)
        ref = next(r for r in contenders
                   if r.name == "plain PyTorch, eager" and r.batch_size == c.batch_size)
        rows.append({
            "name": c.name, "batch_size": c.batch_size, "seconds_per_epoch": med,
            "epochs": c.seconds, "images_per_second": len(x) / med,
            "ratio_to_plain": med / statistics.median(ref.seconds),
            "host_reads_per_step": c.host_reads,
            "peak_memory_mb": c.peak_bytes / 2**20 if device.type == "cuda" else None,
        })
    del contenders[:]  # free their models and graphs before the end-to-end runs
    e2e = [end_to_end(args, device, b) for b in sizes]

    result = {"device": args.device, "machine": machine_description(args.device),
              "images": len(x), "data": source, "timed_epochs": args.epochs, "rows": rows,
              "end_to_end": e2e, "numpyro": numpyro_vae.available()}
    print(json.dumps(result, indent=2))
    path = args.json or Path(f"docs/results/benchmark_{args.device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    update_section(args.doc, f"Training speed ({args.device})", report(args, result))


def report(args, result) -> str:
    reads = ("synchronising calls per step (`torch.cuda.set_sync_debug_mode`)"
             if args.device == "cuda" else "host reads per step (`item`, `bool`, ... counted "
             "by a TorchFunctionMode; on a CPU nothing waits, on a GPU each would be a sync)")
    command = (f"python -m scripts.benchmark --device {args.device} --epochs {args.epochs}"
               + (" --quick" if args.quick else "")
               + (f" --batch-sizes {' '.join(map(str, args.batch_sizes))}"
                  if args.batch_sizes != [128, 256, 1024] and not args.quick else ""))
    lines = [
        f"Command: `{command}`. Machine: {result['machine']}.",
        "",
        f"{result['images']:,} images ({result['data']}) per epoch, 784-400-20 ReLU, "
        f"dynamically binarized on the device; median of {args.epochs} timed epochs after "
        "one warm-up epoch, contenders interleaved epoch by epoch"
        + ("; glibc's malloc keeps freed memory for every contender, as `pyro-vae train` "
           "sets it (section \"Allocator (cpu)\")" if args.device == "cpu" else "")
        + ". *ratio*: seconds per "
        "epoch over the plain eager loop's at the same batch size (lower is faster). "
        f"*reads*: {reads}, measured after the first step.",
        "",
        "| loop | batch | s / epoch | images / s | ratio | reads |"
        + (" peak MB |" if args.device == "cuda" else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if args.device == "cuda" else ""),
    ]
    for r in result["rows"]:
        reads_cell = "" if r["host_reads_per_step"] is None else f"{r['host_reads_per_step']:g}"
        lines.append(
            f"| {r['name']} | {r['batch_size']} | {r['seconds_per_epoch']:.3f} | "
            f"{r['images_per_second']:,.0f} | {r['ratio_to_plain']:.3f} | {reads_cell} |"
            + (f" {r['peak_memory_mb']:.0f} |" if args.device == "cuda" else ""))
    if not result["numpyro"]:
        lines += ["", "NumPyro's examples/vae: not measured here (JAX and NumPyro are not "
                  "installed on this machine)."]
    else:  # the yardstick: pyro-vae's step against NumPyro's fused epoch
        lines += ["", "Against NumPyro's fused epoch: the ratio of the medians above, and in "
                  "brackets the ratio in each round of epochs (the two contenders ran seconds "
                  "apart in a round, so a round's ratio is the least touched by this machine's "
                  "drift):", ""]
        for b in sorted({r["batch_size"] for r in result["rows"]}):
            at = {r["name"]: r for r in result["rows"] if r["batch_size"] == b}
            fused = next((r for k, r in at.items() if "fori_loop" in k), None)
            ours = [(k.split("(")[-1].rstrip(")"), r) for k, r in at.items()
                    if k.startswith("pyro-vae Trainer, Trace_ELBO, fast")]
            if fused is not None:
                lines.append(f"- batch {b}: pyro-vae's step takes " + ", ".join(
                    f"{r['seconds_per_epoch'] / fused['seconds_per_epoch']:.2f}x ("
                    + " / ".join(f"{a / f:.2f}" for a, f in zip(r["epochs"], fused["epochs"]))
                    + f"; {way})" for way, r in ours) + " the time of NumPyro's fused epoch.")
    lines += ["", "`pyro-vae train` end to end, in its own process (start-up, data loading, "
              "test ELBO and checkpoint every epoch, closing figures; "
              f"{result['end_to_end'][0]['dataset']}, {args.epochs} epochs). Its training "
              "images / s is the median over epochs after the first (which traces the step), "
              "set against the Trainer's contender above with the step the run chose "
              "(`compile_step` auto: compiled for long runs, traced for a first, shorter one):",
              "", "| batch | step | wall clock (s) | training images / s | against the "
              "Trainer's | test ELBO |", "|---:|---|---:|---:|---:|---:|"]
    for e in result["end_to_end"]:
        way = "Inductor-compiled graph" if e.get("compiled") else "traced graph"
        same = [r for r in result["rows"] if r["batch_size"] == e["batch_size"]
                and r["name"] == f"pyro-vae Trainer, Trace_ELBO, fast step ({way})"]
        versus = f"{e['images_per_second_after_first'] / same[0]['images_per_second']:.2f}" \
            if same else "--"
        lines.append(f"| {e['batch_size']} | {way.split()[0].lower()} | "
                     f"{e['wall_seconds']:.1f} | {e['images_per_second_after_first']:,.0f} | "
                     f"{versus} | {e['test_elbo']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
