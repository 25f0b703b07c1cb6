"""Run under torchrun by tests/test_distributed.py: one ``pyro-vae`` command, in-process,
then check that it left nothing behind: no Python thread but this one, no process group.

    torchrun --nproc_per_node 2 tests/helpers/ddp_cli.py COMMAND [ARGS...]

Exits with the command's status, or 9 (naming what was left) if anything stayed.
"""

import sys
import threading

import torch.distributed as dist

from pyro_vae.cli import main

status = main(sys.argv[1:])
left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
if left or dist.is_initialized():
    print(f"left behind: threads {left}, process group {dist.is_initialized()}",
          file=sys.stderr)
    sys.exit(9)
sys.exit(status)
