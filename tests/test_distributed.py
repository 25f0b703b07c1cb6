"""Data-parallel training with torchrun: 2 processes, Gloo, on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae import RunConfig, train

from .helpers.ddp_step import BATCH, SEED, setup

HELPER = Path(__file__).parent / "helpers" / "ddp_train.py"
STEP_HELPER = Path(__file__).parent / "helpers" / "ddp_step.py"
CLI_HELPER = Path(__file__).parent / "helpers" / "ddp_cli.py"


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


def test_one_ddp_step_averages_the_ranks_gradients_exactly(tmp_path):
    # both ranks draw the same noise for their half of the batch, so the gradient DDP
    # leaves on every rank must be the mean of the two halves' gradients computed here in
    # one process; a sum (twice that) or a rank left out fails by far more than rounding
    torchrun(2, STEP_HELPER, tmp_path, cwd=tmp_path)
    vae, objective, x, index = setup()
    expected = {n: torch.zeros_like(p) for n, p in vae.named_parameters()}
    for rank in range(2):
        half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        torch.manual_seed(SEED)
        loss = objective(x[half], index[half])
        for (name, _), g in zip(vae.named_parameters(),
                                torch.autograd.grad(loss, list(vae.parameters()))):
            expected[name] += g / 2
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["grads"]
        for name, g in expected.items():
            torch.testing.assert_close(saved[name], g, rtol=1e-5, atol=1e-6)


def test_training_under_ddp_learns_like_one_process(two_rank_run):
    config = RunConfig()
    config.data.dataset, config.data.train_limit, config.data.test_limit = "mnist-sample", 1024, 200
    config.model.hidden_dims, config.model.z_dim = (64,), 4
    config.train.epochs, config.train.batch_size, config.train.device = 2, 64, "cpu"
    single = train(config, progress=False).metrics
    ddp = metrics(two_rank_run / "run")
    # different noise per rank, so only a loose agreement; the exact check of DDP's
    # gradient averaging is the one-step test above
    for a, b in zip(single, ddp):
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


def test_a_command_under_torchrun_exits_0_leaving_no_thread_or_process_group(tmp_path):
    """Each rank runs ``pyro-vae train`` in-process, then checks that no Python thread and
    no process group outlived it (the helper exits 9 otherwise); the job must exit 0, with
    no abort at interpreter exit ("terminate called without an active exception")."""
    result = torchrun(2, CLI_HELPER, "train", "--dataset", "mnist-sample", "--train-limit", "256",
                      "--test-limit", "64", "--hidden-dims", "16", "--z-dim", "2",
                      "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--quiet",
                      "--tensorboard", "--out", tmp_path / "run", cwd=tmp_path)
    assert "terminate called" not in result.stderr and "left behind" not in result.stderr
