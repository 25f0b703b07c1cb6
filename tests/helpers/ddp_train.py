"""Run under torchrun by tests/test_distributed.py: train, then save this rank's weights.

    torchrun --nproc_per_node 2 tests/helpers/ddp_train.py OUT_DIR WEIGHTS_DIR [epochs]
"""

import os
import sys

import torch

from pyro_vae import RunConfig, train

out, weights, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2
config = RunConfig()
config.data.dataset, config.data.train_limit, config.data.test_limit = "mnist-sample", 1024, 200
config.model.hidden_dims, config.model.z_dim = (64,), 4
config.train.epochs, config.train.batch_size, config.train.device = epochs, 32, "cpu"
run = train(config, out, progress=False) if not os.path.exists(out) else \
    train(resume=out, epochs=epochs, progress=False)
torch.save(run.vae.state_dict(), os.path.join(weights, f"rank{os.environ.get('RANK', '0')}.pt"))
