"""Reliability: non-finite losses, killed processes, bad input, property tests."""

import json
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributions import constraints

from pyro_vae import DataError, TrainingDiverged, get_likelihood, load_run, train
from pyro_vae.cli import main
from pyro_vae.data import read_idx
from pyro_vae.likelihoods import register_likelihood
from pyro_vae.runner.state import load_state

from .helpers import built_in_likelihoods, tiny_config, write_idx

# -- non-finite losses ------------------------------------------------------------------


def poisoned_likelihood(name: str, bad_steps: set[int]):
    """A Bernoulli whose log-probabilities are NaN at the given training steps (1-based).

    It counts Python calls, so the runs using it take eager steps (``fast_step=False``):
    a replayed graph does not run the builder's Python again.
    """
    calls = {"n": 0}

    @register_likelihood(name, support=constraints.boolean, binary=True, overwrite=True)
    def build(logits):
        if torch.is_grad_enabled() and logits.dim() > 1:  # training steps only
            calls["n"] += 1
            if calls["n"] in bad_steps:
                logits = logits * float("nan")
        return dist.Bernoulli(logits=logits, validate_args=False)

    return calls


def test_nan_stops_the_run_naming_epoch_and_step_and_keeps_the_last_epoch(tmp_path):
    calls = poisoned_likelihood("test-nan", {8 + 3})  # epoch 2 (8 steps per epoch), step 3
    config = tiny_config(epochs=3, fast_step=False)
    config.model.likelihood = "test-nan"
    with pytest.raises(TrainingDiverged, match="epoch 2 at step 3 of 8") as info:
        train(config, tmp_path / "run", progress=False)
    assert "TrainConfig.lr" in str(info.value) and "epoch 1, untouched" in str(info.value)
    assert "--" not in str(info.value)  # a library message: no command-line flags
    assert calls["n"] >= 8 + 3
    assert load_state(tmp_path / "run" / "checkpoint.pt").epoch == 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1]
    assert all(torch.isfinite(p).all() for p in load_run(tmp_path / "run").vae.parameters())


def test_nan_policy_skip_counts_skipped_steps_and_finishes(tmp_path):
    poisoned_likelihood("test-nan-skip", {2, 5})
    config = tiny_config(epochs=2, nan_policy="skip", fast_step=False)
    config.model.likelihood = "test-nan-skip"
    run = train(config, tmp_path / "run", progress=False)
    assert [r["skipped_steps"] for r in run.metrics] == [2, 0]
    assert all(np.isfinite(r["train_elbo"]) and np.isfinite(r["test_elbo"]) for r in run.metrics)
    assert all(torch.isfinite(p).all() for p in run.vae.parameters())


def test_diverged_run_exits_3_from_the_command_line(tmp_path, capsys):
    poisoned_likelihood("test-nan-cli", {1})
    code = main(["train", "--dataset", "mnist-sample", "--train-limit", "128", "--test-limit",
                 "50", "--hidden-dims", "16", "--likelihood", "test-nan-cli", "--quiet",
                 "--no-fast-step",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 3 and "non-finite loss" in err and len(err.strip().splitlines()) == 1
    assert "--lr" in err and "--nan-policy skip" in err  # rewritten into flags


# -- killed processes ---------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_moments_always_leaves_a_resumable_run(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pyro_vae", "train", "--dataset", "mnist-sample",
           "--train-limit", "2000", "--test-limit", "200", "--hidden-dims", "64", "--z-dim", "4",
           "--batch-size", "32", "--epochs", "40", "--quiet", "--out", str(out)]
    rng = random.Random(0)
    for attempt in range(4):
        argv = cmd if attempt == 0 else [*cmd[:4], "--resume", str(out), "--quiet"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt == 0:  # a first checkpoint to resume from (start-up takes seconds)
            deadline = time.time() + 120
            while not (out / "checkpoint.pt").exists():
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.05)
        time.sleep(rng.uniform(0, 2.5) + (0 if attempt == 0 else 2.0))  # epochs take ~0.3 s
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        epoch = load_state(out / "checkpoint.pt").epoch
        assert [r["epoch"] for r in records][:epoch] == list(range(1, epoch + 1))
        assert len(records) <= epoch + 1  # at most one line ahead of the checkpoint
    done = subprocess.run([*cmd[:4], "--resume", str(out), "--quiet", "--epochs", "40"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 41))


# -- bad input at the command line ------------------------------------------------------------


def bad_folder(tmp_path, rng, kind):
    folder = tmp_path / kind
    folder.mkdir()
    for split, n in (("train", 30), ("t10k", 10)):
        write_idx(folder / f"{split}-images-idx3-ubyte",
                  rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    target = folder / "train-images-idx3-ubyte"
    if kind == "truncated":
        target.write_bytes(target.read_bytes()[:-100])
    elif kind == "magic":
        target.write_bytes(b"\x00\x00\x77\x03" + target.read_bytes()[4:])
    elif kind == "counts":
        write_idx(folder / "train-labels-idx1-ubyte", rng.integers(0, 10, 29, dtype=np.uint8))
    elif kind == "unreadable":
        target.unlink()
        target.mkdir()  # a folder where a file should be: unreadable even for root
    elif kind == "missing":
        target.unlink()
    return folder


@pytest.mark.parametrize("kind, message", [
    ("truncated", "truncated or corrupt"),
    ("magic", "wrong magic number"),
    ("counts", "30 images but"),
    ("unreadable", "cannot read"),
    ("missing", "does not hold the four"),
])
def test_broken_data_folders_exit_2_with_one_line(tmp_path, rng, capsys, kind, message):
    folder = bad_folder(tmp_path, rng, kind)
    code = main(["train", "--dataset", "mnist", "--data-dir", str(folder), "--quiet",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("out", ["{file}/run", "/proc/pyro-vae-cannot-write-here"])
def test_unwritable_output_folder_exits_2(tmp_path, capsys, out):
    (tmp_path / "file").write_text("a file, not a folder")
    code = main(["train", "--dataset", "mnist-sample", "--quiet",
                 "--out", out.format(file=tmp_path / "file")])
    err = capsys.readouterr().err
    assert code == 2 and ("cannot write" in err or "not a folder" in err)
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["corrupt", "hostile", "incompatible", "config"])
def test_resume_from_a_damaged_run_exits_2_and_keeps_it(tmp_path, capsys, damage):
    out = tmp_path / "run"
    train(tiny_config(epochs=1), out, progress=False)
    if damage == "corrupt":
        (out / "checkpoint.pt").write_bytes(b"\x00garbage")
    elif damage == "hostile":
        import pickle
        (out / "checkpoint.pt").write_bytes(pickle.dumps({"format": 1, "x": object()}))
    elif damage == "incompatible":
        config = json.loads((out / "config.json").read_text())
        config["model"]["likelihood"] = "continuous-bernoulli"
        (out / "config.json").write_text(json.dumps(config))
    else:
        (out / "config.json").write_text("{not json")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_data_outside_the_support_is_refused_before_training(tmp_path):
    @register_likelihood("test-lower-half", overwrite=True,
                         support=constraints.interval(0.0, 0.5))
    def lower_half(logits):
        return dist.Uniform(torch.zeros_like(logits), 0.5)

    config = tiny_config()
    config.model.likelihood = "test-lower-half"
    with pytest.raises(DataError, match="outside the support of likelihood 'test-lower-half'"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    with pytest.raises(DataError, match="outside the support"):
        get_likelihood("continuous-bernoulli").check_support(torch.tensor([0.5, float("nan")]))


# -- property tests -------------------------------------------------------------------------

finite = st.floats(-8, 8, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(built_in_likelihoods()), raw=st.lists(finite, min_size=2, max_size=2),
       u=st.floats(0, 1, width=32))
def test_log_prob_is_finite_everywhere_on_the_support(name, raw, u):
    lik = get_likelihood(name)
    params = [torch.tensor([r]) for r in raw[: lik.num_params]]
    x = torch.tensor([float(u > 0.5) if lik.binary else u])
    value = lik.build(*params).log_prob(x)
    assert torch.isfinite(value).all()


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_idx_reader_round_trips_random_arrays(tmp_path_factory, shape, seed):
    array = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    path = write_idx(tmp_path_factory.mktemp("idx") / "f", array, compress=seed % 2 == 0)
    np.testing.assert_array_equal(read_idx(path).numpy(), array)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=64))
def test_idx_reader_refuses_random_bytes_with_a_data_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("idx") / "f"
    path.write_bytes(data)
    try:
        array = read_idx(path)
    except DataError:
        return
    assert array.numel() * array.element_size() == len(data) - 4 - 4 * array.ndim  # valid
