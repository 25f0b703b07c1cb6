"""Training speed of pyro-vae against a hand-written PyTorch VAE, side by side in one run.

Every contender trains the PyTorch example's network (784-400-20, ReLU) on the same
60,000 images (mnist-sample tiled, or --dataset mnist), one epoch at a time in turn
(interleaved), so load on the machine affects all alike. Reports the median seconds per
epoch, images per second, the ratio to the reference at the same batch size, achieved
GFLOP/s against a dense matmul of the same shapes timed in the same run, and peak memory.
Writes JSON and the "Training speed (DEVICE)" section of docs/benchmarks.md.

    python scripts/benchmark.py [--device cpu|cuda] [--epochs 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch

from pyro_vae import VAE, RunConfig
from pyro_vae.data import DeviceBatches, load_mnist_sample
from pyro_vae.evaluate import importance_log_likelihood
from pyro_vae.reference import ReferenceVAE, train_reference_epoch
from pyro_vae.train import make_loss

sys.path.insert(0, str(Path(__file__).parent))
from _docs import machine_description, update_section  # noqa: E402

X_DIM, HIDDEN, Z_DIM = 784, 400, 20
# multiply-adds of one image through encoder (784-400-40) and decoder (20-400-784)
MACS = X_DIM * HIDDEN + HIDDEN * 2 * Z_DIM + Z_DIM * HIDDEN + HIDDEN * X_DIM
TRAIN_FLOP_PER_IMAGE = 3 * 2 * MACS  # forward + backward (two matmuls per layer)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Contender:
    """A training loop that runs one epoch when called and returns its seconds."""

    def __init__(self, name: str, batch_size: int, epoch: Callable[[], float], group: str):
        self.name, self.batch_size, self.epoch, self.group = name, batch_size, epoch, group
        self.seconds: list[float] = []
        self.peak_bytes = 0


def pyro_contender(x, batch_size, elbo="trace", jit=False, particles=1, device=None):
    config = RunConfig()
    config.train.elbo, config.train.jit, config.train.num_particles = elbo, jit, particles
    vae = VAE().to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    loss_fn = make_loss(vae, config, len(x))[0]
    batches = DeviceBatches(x, batch_size, dynamic=True)

    count = iter(range(1, 10**6))

    def epoch() -> float:
        total = torch.zeros((), device=device)
        sync(device)
        start = time.perf_counter()
        for xb in batches.batches(batches.permutation(next(count))):
            loss = loss_fn(xb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        total.item()
        return time.perf_counter() - start

    name = {"trace": "Trace_ELBO", "meanfield": "TraceMeanField_ELBO"}[elbo]
    name = ("Jit" if jit else "") + name + (f", {particles} particles" if particles > 1 else "")
    return Contender(f"pyro-vae {name}", batch_size, epoch, "pyro-vae")


def reference_contender(x, batch_size, device):
    vae = ReferenceVAE().to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    batches = DeviceBatches(x, batch_size, dynamic=True)

    count = iter(range(1, 10**6))

    def epoch() -> float:
        sync(device)
        return train_reference_epoch(vae, optimizer, batches, next(count))[1]

    return Contender("plain PyTorch reference", batch_size, epoch, "reference")


def dataloader_contender(images_uint8, batch_size, device):
    """The PyTorch example's data path: DataLoader over PIL images with ToTensor per item."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    class PILImages(Dataset):
        def __init__(self, images):
            self.images, self.to_tensor = images.numpy(), transforms.ToTensor()

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.to_tensor(Image.fromarray(self.images[i], mode="L")), 0

    loader = DataLoader(PILImages(images_uint8), batch_size=batch_size, shuffle=True)
    vae = ReferenceVAE().to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)

    def epoch() -> float:
        sync(device)
        start = time.perf_counter()
        for xb, _ in loader:
            xb = torch.bernoulli(xb.to(device).view(-1, X_DIM))
            loss = vae.loss(xb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        return time.perf_counter() - start

    return Contender("PyTorch example data path (DataLoader + ToTensor)", batch_size, epoch,
                     "reference")


def matmul_gflops(batch_size, device, repeats=20) -> float:
    """GFLOP/s of the training step's matmuls alone (forward + backward shapes)."""
    shapes = [(X_DIM, HIDDEN), (HIDDEN, 2 * Z_DIM), (Z_DIM, HIDDEN), (HIDDEN, X_DIM)]
    weights = [torch.randn(i, o, device=device) for i, o in shapes]
    acts = [torch.randn(batch_size, i, device=device) for i, _ in shapes]
    grads = [torch.randn(batch_size, o, device=device) for _, o in shapes]

    def step():
        for a, w, g in zip(acts, weights, grads):
            a @ w  # forward
            g @ w.T  # gradient of the input
            a.T @ g  # gradient of the weight

    for _ in range(3):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    return repeats * batch_size * TRAIN_FLOP_PER_IMAGE / (time.perf_counter() - start) / 1e9


def eval_gflops(x, device, num_samples=1000, images=100) -> tuple[float, float]:
    """Importance-sampled evaluation: achieved decoder GFLOP/s, and a matmul's for it."""
    vae = VAE().to(device)
    xb = torch.bernoulli(x[:images])
    importance_log_likelihood(vae, xb[:10], 50)
    sync(device)
    start = time.perf_counter()
    importance_log_likelihood(vae, xb, num_samples)
    sync(device)
    seconds = time.perf_counter() - start
    flop = 2 * images * num_samples * (Z_DIM * HIDDEN + HIDDEN * X_DIM)
    a = torch.randn(214 * 100, HIDDEN, device=device)
    w = torch.randn(HIDDEN, X_DIM, device=device)
    a @ w
    sync(device)
    t = time.perf_counter()
    for _ in range(5):
        a @ w
    sync(device)
    dense = 5 * 2 * a.shape[0] * HIDDEN * X_DIM / (time.perf_counter() - t) / 1e9
    return flop / seconds / 1e9, dense


def peak_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per contender")
    parser.add_argument("--quick", action="store_true",
                        help="batch 128 only, no DataLoader path (a smoke run)")
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    pyro.set_rng_seed(0)

    sample = load_mnist_sample()
    reps = -(-args.images // len(sample.train_x))
    x_cpu = sample.train_x.repeat(reps, 1)[: args.images]  # (N, 784) in [0, 1]
    x = x_cpu.to(device)
    uint8 = (x_cpu * 255).round().to(torch.uint8).view(-1, 28, 28)

    contenders = []
    for b in (128,) if args.quick else (128, 256, 1024):
        contenders += [reference_contender(x, b, device), pyro_contender(x, b, device=device),
                       pyro_contender(x, b, "meanfield", device=device)]
    if not args.quick:
        contenders += [pyro_contender(x, 128, jit=True, device=device),
                       pyro_contender(x, 128, "meanfield", jit=True, device=device),
                       pyro_contender(x, 128, particles=4, device=device),
                       dataloader_contender(uint8, 128, device)]
    for c in contenders:  # warm-up epoch (JIT compilation, allocator, caches)
        c.epoch()
        print(f"warm-up: {c.name}, batch {c.batch_size}", file=sys.stderr, flush=True)
    for epoch in range(args.epochs):
        for c in contenders:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            c.seconds.append(c.epoch())
            c.peak_bytes = max(c.peak_bytes, peak_memory(device))
            print(f"epoch {epoch + 1}: {c.name}, batch {c.batch_size}: {c.seconds[-1]:.2f} s",
                  file=sys.stderr, flush=True)

    matmul = {b: matmul_gflops(b, device) for b in sorted({c.batch_size for c in contenders})}
    eval_rate, eval_dense = eval_gflops(x, device)
    rows = []
    for c in contenders:
        med = statistics.median(c.seconds)
        ref = next(r for r in contenders
                   if r.name == "plain PyTorch reference" and r.batch_size == c.batch_size)
        rows.append({
            "name": c.name, "batch_size": c.batch_size, "seconds_per_epoch": med,
            "epochs": c.seconds, "images_per_second": len(x) / med,
            "ratio_to_reference": med / statistics.median(ref.seconds),
            "gflop_per_second": len(x) * TRAIN_FLOP_PER_IMAGE / med / 1e9,
            "matmul_gflop_per_second": matmul[c.batch_size],
            "peak_memory_mb": c.peak_bytes / 2**20,
        })
    result = {"device": args.device, "machine": machine_description(args.device),
              "images": len(x), "timed_epochs": args.epochs, "rows": rows,
              "eval_gflop_per_second": eval_rate, "eval_matmul_gflop_per_second": eval_dense}
    print(json.dumps(result, indent=2))
    path = args.json or Path(f"docs/results/benchmark_{args.device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")

    memory = "peak GPU memory allocated" if device.type == "cuda" else "process peak RSS so far"
    lines = [
        f"Command: `python scripts/benchmark.py --device {args.device} --epochs {args.epochs}"
        f"{' --quick' if args.quick else ''}`. Machine: {result['machine']}.",
        "",
        f"{len(x):,} images of 784 pixels per epoch, 784-400-20 ReLU network, median of "
        f"{args.epochs} timed epochs after one warm-up, contenders interleaved epoch by epoch. "
        "GFLOP/s counts the matmuls of forward and backward passes "
        f"({TRAIN_FLOP_PER_IMAGE / 1e6:.2f} MFLOP per image); the matmul column is the same "
        "shapes' matmuls alone, timed in the same run.",
        "",
        "| loop | batch | s / epoch | images / s | ratio to reference | GFLOP/s | "
        f"matmul GFLOP/s | % of matmul | {memory} (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['batch_size']} | {r['seconds_per_epoch']:.2f} | "
            f"{r['images_per_second']:,.0f} | {r['ratio_to_reference']:.3f} | "
            f"{r['gflop_per_second']:.0f} | {r['matmul_gflop_per_second']:.0f} | "
            f"{100 * r['gflop_per_second'] / r['matmul_gflop_per_second']:.0f}% | "
            f"{r['peak_memory_mb']:.0f} |")
    lines += ["", f"Importance-sampled evaluation (100 images, K = 1,000, decoder matmuls): "
              f"{eval_rate:.0f} GFLOP/s against {eval_dense:.0f} GFLOP/s for a dense matmul of "
              f"the decoder's output layer shape ({100 * eval_rate / eval_dense:.0f}%)."]
    update_section(args.doc, f"Training speed ({args.device})", "\n".join(lines))


if __name__ == "__main__":
    main()
