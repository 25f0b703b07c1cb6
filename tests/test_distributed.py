"""Data-parallel training with torchrun: 2 processes, Gloo, on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae import RunConfig, train

HELPER = Path(__file__).parent / "helpers" / "ddp_train.py"


def torchrun(nproc, *args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert result.returncode == 0, (f"exit {result.returncode}\nstdout: {result.stdout[-1500:]}"
                                    f"\nstderr: {result.stderr[-3000:]}")
    return result


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    (root / "weights").mkdir()
    torchrun(2, HELPER, root / "run", root / "weights", 2, cwd=root)
    return root


def test_parameters_are_bit_identical_across_ranks(two_rank_run):
    w0 = torch.load(two_rank_run / "weights" / "rank0.pt", weights_only=True)
    w1 = torch.load(two_rank_run / "weights" / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_only_rank_0_writes_the_run_folder(two_rank_run):
    files = sorted(p.name for p in (two_rank_run / "run").iterdir())
    assert files == [".lock", "checkpoint.pt", "config.json", "metrics.jsonl"]
    assert [r["epoch"] for r in metrics(two_rank_run / "run")] == [1, 2]
    assert sorted(os.listdir(two_rank_run)) == ["run", "weights"]


def test_loss_trajectory_matches_one_process_at_the_same_global_batch(two_rank_run):
    config = RunConfig()
    config.data.dataset, config.data.train_limit, config.data.test_limit = "mnist-sample", 1024, 200
    config.model.hidden_dims, config.model.z_dim = (64,), 4
    config.train.epochs, config.train.batch_size, config.train.device = 2, 64, "cpu"
    single = train(config, progress=False).metrics
    ddp = metrics(two_rank_run / "run")
    # Same initial weights (DDP broadcasts rank 0's, seeded as the single process), same
    # global batches; only the reparameterization and binarization noise differs. Over
    # seeds the single-process train ELBO varies by about 2 nats after 2 epochs here.
    for a, b in zip(single, ddp):
        assert abs(a["train_elbo"] - b["train_elbo"]) < 6.0
        assert abs(a["test_elbo"] - b["test_elbo"]) < 6.0
    assert ddp[1]["train_elbo"] > ddp[0]["train_elbo"]  # it learns


def test_a_two_rank_checkpoint_resumes_on_one_process_and_on_two(two_rank_run, tmp_path):
    import shutil

    for nproc in (1, 2):
        run = tmp_path / f"resume{nproc}"
        shutil.copytree(two_rank_run / "run", run)
        (tmp_path / f"w{nproc}").mkdir()
        if nproc == 1:
            resumed = train(resume=run, epochs=3, progress=False).metrics
        else:
            torchrun(2, HELPER, run, tmp_path / f"w{nproc}", 3, cwd=tmp_path)
            resumed = metrics(run)
        assert [r["epoch"] for r in resumed] == [1, 2, 3]
        assert resumed[:2] == metrics(two_rank_run / "run")
        assert resumed[2]["train_elbo"] > resumed[1]["train_elbo"] - 5


@pytest.mark.slow
@pytest.mark.parametrize("options, key", [
    (["--objective", "iwae", "--num-particles", "3", "--dreg"], "test_iwae"),
    (["--kl-warmup", "2", "--beta", "0.5", "--stochastic-layers", "2", "--network", "conv"],
     "kl_weight"),
], ids=["iwae-dreg", "kl-weight-two-layers-conv"])
def test_research_options_train_under_torchrun_and_resume_on_one_process(tmp_path, options, key):
    run = tmp_path / "run"
    torchrun(2, "-m", "pyro_vae", "train", "--dataset", "mnist-sample", "--train-limit", "256",
             "--test-limit", "64", "--hidden-dims", "32", "--z-dim", "4", "--batch-size", "32",
             "--epochs", "1", "--quiet", *options, "--out", run, cwd=tmp_path)
    assert key in metrics(run)[0]
    resumed = train(resume=run, epochs=2, progress=False)
    assert [r["epoch"] for r in resumed.metrics] == [1, 2]
