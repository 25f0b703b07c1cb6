"""Run under torchrun by tests/test_distributed.py: one DDP training step on shared noise.

    torchrun --nproc_per_node 2 tests/helpers/ddp_step.py OUT_DIR

Each rank takes its half of a fixed batch, draws the same noise (one seed on every rank)
and saves the gradients that DDP left on its parameters after one step.
"""

import os
import sys

import torch

from pyro_vae import VAE, Objective, SyncFreeTrace_ELBO, Trainer
from pyro_vae.runner.distributed import init_from_env

BATCH, NUM_DATA, SEED = 16, 64, 7


def setup():
    """The VAE, objective and batch that the test rebuilds in one process."""
    torch.manual_seed(0)
    vae = VAE("bernoulli", x_dim=16, z_dim=3, hidden_dims=(8,))
    objective = Objective(vae, SyncFreeTrace_ELBO(max_plate_nesting=1), num_data=NUM_DATA)
    x = torch.bernoulli(torch.full((BATCH, 16), 0.4),
                        generator=torch.Generator().manual_seed(1))
    return vae, objective, x, torch.arange(BATCH)


if __name__ == "__main__":
    out = sys.argv[1]
    ctx = init_from_env(torch.device("cpu"))
    vae, objective, x, index = setup()
    trainer = Trainer(objective, 1e-2, module=ctx.wrap(objective, torch.device("cpu")))
    half = slice(ctx.rank * BATCH // 2, (ctx.rank + 1) * BATCH // 2)
    torch.manual_seed(SEED)
    loss, _ = trainer.step(x[half], index[half])
    grads = {n: p.grad for n, p in vae.named_parameters()}
    torch.save({"loss": loss, "grads": grads}, os.path.join(out, f"rank{ctx.rank}.pt"))
    del trainer
    ctx.close()
