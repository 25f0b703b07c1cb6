"""Reliability: non-finite losses, killed processes, bad input, property tests."""

import contextlib
import errno
import json
import os
import random
import shutil
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
from pyro_vae.runner.state import load_state, read_payload, write_payload

from .helpers import built_in_likelihoods, default_sigint, tiny_config, write_idx

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

# decoder outputs anywhere a trained network puts them, saturated sigmoids included
finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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


# -- the table of bad inputs: one line, the right status, nothing destroyed ----------------------

SMALL = ["--dataset", "mnist-sample", "--train-limit", "256", "--test-limit", "100",
         "--hidden-dims", "32", "--z-dim", "2", "--epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch run, copied into each case's folder."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(out)]) == 0
    return out


def damage_json(name, text):
    def setup(tmp):
        (tmp / "run" / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def edit_config(section, key, value):
    def setup(tmp):
        path = tmp / "run" / "config.json"
        config = json.loads(path.read_text())
        config[section][key] = value
        path.write_text(json.dumps(config))
    return setup


def damage_checkpoint(kind):
    def setup(tmp):
        path = tmp / "run" / "checkpoint.pt"
        good = read_payload(path)
        if kind == "garbage":
            path.write_bytes(b"\x00garbage")
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif kind == "bare pickle":
            import pickle
            path.write_bytes(pickle.dumps({"format": 1, "x": object()}))
        elif kind == "flipped byte":
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
        elif kind == "symlink":
            path.unlink()
            path.symlink_to("/etc/passwd")
        # the rest carry a valid checksum: what lies behind it is checked too
        elif kind == "hostile":
            write_payload(path, {"format": 1, "x": Hostile()})
        elif kind == "list":
            write_payload(path, [1, 2])
        elif kind == "no-model":
            write_payload(path, {k: v for k, v in good.items() if k != "model"})
        elif kind == "shapes":
            good["model"] = {k: torch.zeros(3) for k in good["model"]}
            write_payload(path, good)
        elif kind == "config-not-dict":
            good["config"] = "nope"
            write_payload(path, good)
        elif kind == "epoch":
            good["epoch"] = -3
            write_payload(path, good)
        elif kind == "optimizer":
            good["optimizer"] = {"state": {}, "param_groups": [{"params": [99]}]}
            write_payload(path, good)
    return setup


def read_only_board(tmp):
    """A run trained with TensorBoard whose events folder was made read-only."""
    edit_config("train", "tensorboard", True)(tmp)
    (tmp / "run" / "tensorboard").mkdir(mode=0o555)


def crafted_image_size(pixels):
    """A run whose config.json and checkpoint agree on images of ``pixels`` pixels, over
    data of 784: consistent with itself, not with its data."""
    def setup(tmp):
        from pyro_vae import RunConfig, build_vae

        edit_config("model", "x_dim", pixels)(tmp)
        path = tmp / "run" / "checkpoint.pt"
        state = read_payload(path)
        state["config"]["model"]["x_dim"] = pixels
        state["model"] = build_vae(RunConfig.from_dict(state["config"])).state_dict()
        write_payload(path, state)
    return setup


class Hostile:
    def __reduce__(self):
        return (print, ("this ran",))


def data_folder(kind):
    """A folder of four small IDX files, one damaged as ``kind`` says."""
    def setup(tmp):
        rng = np.random.default_rng(0)
        folder = tmp / "data"
        folder.mkdir()
        side = 32 if kind == "32x32" else 28
        for split, n in (("train", 30), ("t10k", 10)):
            write_idx(folder / f"{split}-images-idx3-ubyte",
                      rng.integers(0, 256, size=(n, side, side), dtype=np.uint8))
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
        elif kind == "float-pixels":  # pixels of 1000 as 32-bit floats (IDX type 0x0D)
            pixels = np.full((30, 28, 28), 1000.0, dtype=">f4")
            target.write_bytes(bytes([0, 0, 0x0D, 3]) + np.array([30, 28, 28], ">u4").tobytes()
                               + pixels.tobytes())
        elif kind == "missing":
            target.unlink()
        elif kind == "empty-file":
            target.write_bytes(b"")
        elif kind == "gzip-garbage":
            target.unlink()
            gz = folder / "train-images-idx3-ubyte.gz"
            gz.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"garbage" * 50)
        elif kind == "fashion-labels":  # Fashion-MNIST's label counts, under --dataset mnist
            write_idx(folder / "train-labels-idx1-ubyte", np.repeat(np.arange(10), 6000)
                      .astype(np.uint8))
        elif kind == "mnist-labels":  # MNIST's label counts, under --dataset fashion-mnist
            counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
            write_idx(folder / "train-labels-idx1-ubyte",
                      np.repeat(np.arange(10), counts).astype(np.uint8))
    return setup


def copy_run(tmp):
    pass  # marker: the case needs the finished run (copied for every case)


def nothing(tmp):
    pass


# (id, setup, argv, exit status, words the message holds); argv may name {run}, {tmp},
# {data}; every case copies the finished run to {tmp}/run first
TRAIN = ["train", *SMALL, "--out", "{tmp}/new"]
CASES = [
    # command-line values
    ("unknown likelihood", nothing, [*TRAIN, "--likelihood", "gauss"], 2, "unknown likelihood"),
    ("batch size 0", nothing, [*TRAIN, "--batch-size", "0"], 2, "--batch-size must be"),
    ("epochs -1", nothing, [*TRAIN, "--epochs", "-1"], 2, "--epochs must be"),
    ("z-dim 0", nothing, [*TRAIN, "--z-dim", "0"], 2, "--z-dim must be"),
    ("lr 0", nothing, [*TRAIN, "--lr", "0"], 2, "--lr must be"),
    ("lr negative", nothing, [*TRAIN, "--lr=-1e-3"], 2, "--lr must be a positive finite"),
    ("lr inf", nothing, [*TRAIN, "--lr", "inf"], 2, "--lr must be"),
    ("lr nan", nothing, [*TRAIN, "--lr", "nan"], 2, "--lr must be"),
    ("lr text", nothing, [*TRAIN, "--lr", "fast"], 2, "invalid float"),
    ("seed -1", nothing, [*TRAIN, "--seed", "-1"], 2, "--seed must be"),
    ("seed 2**40", nothing, [*TRAIN, "--seed", str(2**40)], 2, "--seed must be"),
    ("particles 0", nothing, [*TRAIN, "--num-particles", "0"], 2, "--num-particles"),
    ("train-limit 0", nothing, [*TRAIN, "--train-limit", "0"], 2, "--train-limit"),
    ("test-limit -5", nothing, [*TRAIN, "--test-limit", "-5"], 2, "--test-limit"),
    ("hidden dims text", nothing, [*TRAIN, "--hidden-dims", "400,x"], 2, "comma-separated"),
    ("hidden dims 0", nothing, [*TRAIN, "--hidden-dims", "0"], 2, "--hidden-dims"),
    # sizes that cannot fit any machine: refused before anything is allocated
    ("z-dim 2e9", nothing, [*TRAIN, "--z-dim", "2000000000"], 2, "lower --hidden-dims or --z-dim"),
    ("hidden 1e6,1e6", nothing, [*TRAIN, "--hidden-dims", "1000000,1000000"], 2,
     "lower --hidden-dims or --z-dim"),
    ("particles 1e7", nothing, [*TRAIN, "--num-particles", "10000000"], 2,
     "lower --num-particles or --batch-size"),
    ("iwae particles 1e7", nothing, [*TRAIN, "--objective", "iwae", "--num-particles",
                                     "10000000"], 2, "lower --num-particles"),
    ("z-dim 10**30", nothing, [*TRAIN, "--z-dim", str(10**30)], 2, "--z-dim must be at most"),
    ("sample n 1e8", nothing, ["sample", "{run}", "-n", "100000000", "--out", "{tmp}/s.png"], 2,
     "at most 10000 images"),
    ("activation", nothing, [*TRAIN, "--activation", "nope"], 2, "invalid choice"),
    ("binarize choice", nothing, [*TRAIN, "--binarize", "sometimes"], 2, "invalid choice"),
    ("elbo choice", nothing, [*TRAIN, "--elbo", "exact"], 2, "invalid choice"),
    ("device choice", nothing, [*TRAIN, "--device", "tpu"], 2, "invalid choice"),
    *([("cuda without one", nothing, [*TRAIN, "--device", "cuda"], 2, "no CUDA device")]
      if not torch.cuda.is_available() else []),
    ("option name", nothing, [*TRAIN, "--likelihood", "normal-fixed", "--likelihood-option",
                              "sigma=1"], 2, "no option sigma"),
    ("option zero scale", nothing, [*TRAIN, "--likelihood", "normal-fixed",
                                    "--likelihood-option", "scale=0"], 2, "finite scale"),
    ("option inf scale", nothing, [*TRAIN, "--likelihood", "normal-fixed",
                                   "--likelihood-option", "scale=inf"], 2, "finite scale"),
    ("option negative floor", nothing, [*TRAIN, "--likelihood", "normal", "--likelihood-option",
                                        "min_scale=-1"], 2, "min_scale"),
    ("option syntax", nothing, [*TRAIN, "--likelihood-option", "scale"], 2, "KEY=NUMBER"),
    ("binary-only likelihood on gray", nothing, [*TRAIN, "--likelihood", "bernoulli",
                                                 "--binarize", "none", "--likelihood-option",
                                                 "x=1"], 2, "no option x"),
    ("data-dir with the sample", nothing, [*TRAIN, "--data-dir", "{tmp}"], 2,
     "not used by --dataset mnist-sample"),
    # run folders
    ("out is a file's child", damage_json("file", "x"), [*TRAIN[:-1], "{tmp}/run/file/new"], 2,
     "Not a directory"),
    ("out under /proc", nothing, [*TRAIN[:-1], "/proc/pyro-vae-cannot-write"], 2, "cannot write"),
    ("out holds a run", nothing, [*TRAIN[:-1], "{run}"], 2, "holds another run"),
    ("out name too long", nothing, [*TRAIN[:-1], "{tmp}/" + "x" * 300], 2,
     "choose a shorter path given to --out"),
    ("sample out name too long", nothing,
     ["sample", "{run}", "--out", "{tmp}/" + "y" * 300 + ".png"], 2,
     "choose a shorter path given to --out"),
    ("resume missing", nothing, ["train", "--resume", "{tmp}/none"], 2, "not a run folder"),
    ("resume plain folder", nothing, ["train", "--resume", "{tmp}"], 2, "not a run folder"),
    ("resume with lr", nothing, ["train", "--resume", "{run}", "--lr", "0.1"], 2,
     "only --epochs applies"),
    ("resume fewer epochs", nothing, ["train", "--resume", "{run}", "--epochs", "1"], 2,
     "finished 2 epochs"),
    ("resume without checkpoint", lambda tmp: (tmp / "run" / "checkpoint.pt").unlink(),
     ["train", "--resume", "{run}", "--epochs", "3"], 2, "start it again with --force"),
    ("out holds an unfinished run", lambda tmp: (tmp / "run" / "checkpoint.pt").unlink(),
     [*TRAIN[:-1], "{run}"], 2, "never finished an epoch"),
    # config.json content
    ("config not json", damage_json("config.json", "{not json"),
     ["train", "--resume", "{run}", "--epochs", "3"], 2, "not valid JSON"),
    ("config a list", damage_json("config.json", "[1, 2]"),
     ["train", "--resume", "{run}", "--epochs", "3"], 2, "must be a JSON object"),
    ("config wrong type", edit_config("model", "z_dim", "two"),
     ["train", "--resume", "{run}", "--epochs", "3"], 2, "model.z_dim"),
    ("config unknown key", edit_config("model", "depth", 3),
     ["train", "--resume", "{run}", "--epochs", "3"], 2, "no field depth"),
    ("config not utf-8", damage_json("config.json", b"\xff\xfe\x00{"),
     ["train", "--resume", "{run}", "--epochs", "3"], 2, "not valid JSON"),
    ("config data_dir a number", edit_config("data", "data_dir", 5),
     ["evaluate", "{run}", "--iwae-samples", "2"], 2, "data.data_dir must be a non-empty string"),
    ("config z_dim 10**30", edit_config("model", "z_dim", 10**30),
     ["evaluate", "{run}", "--iwae-samples", "2"], 2, "model.z_dim must be at most"),
    ("config nested 100,000 deep", damage_json("config.json", "[" * 100_000 + "]" * 100_000),
     ["evaluate", "{run}", "--iwae-samples", "2"], 2, "nested deeper than 64"),
    ("tensorboard read-only", read_only_board,
     ["train", "--resume", "{run}", "--epochs", "3"], 2, "tensorboard is read-only"),
    ("tensorboard is a file", lambda tmp: (edit_config("train", "tensorboard", True)(tmp),
                                           damage_json("tensorboard", "x")(tmp)),
     ["train", "--resume", "{run}", "--epochs", "3"], 2, "is a file, where TensorBoard"),
    ("a run of 32x32 images", crafted_image_size(32 * 32),
     ["evaluate", "{run}", "--iwae-samples", "2", "--quiet"], 2, "images of 1024 pixels"),
    ("config of another model", edit_config("model", "likelihood", "continuous-bernoulli"),
     ["train", "--resume", "{run}", "--epochs", "3"], 2, "another model"),
    ("config of other data", edit_config("data", "test_limit", 50),
     ["train", "--resume", "{run}", "--epochs", "3"], 2, "another data"),
    ("config section not an object", damage_json("config.json", '{"model": 3}'),
     ["evaluate", "{run}", "--iwae-samples", "2"], 2, "must be an object"),
    # checkpoint content
    *[(f"checkpoint {kind}", damage_checkpoint(kind),
       ["train", "--resume", "{run}", "--epochs", "3"], 2, words)
      for kind, words in [("garbage", "damaged"), ("empty", "damaged"), ("truncated", "damaged"),
                          ("bare pickle", "damaged"), ("flipped byte", "checksum"),
                          ("symlink", "symbolic link"),
                          ("hostile", "could run code"), ("list", "not a pyro-vae checkpoint"),
                          ("no-model", "no model"), ("shapes", "does not fit"),
                          ("config-not-dict", "config is not a dict"), ("epoch", "epoch"),
                          ("optimizer", "does not fit")]],
    ("evaluate a corrupt checkpoint", damage_checkpoint("garbage"),
     ["evaluate", "{run}", "--iwae-samples", "2"], 2, "damaged"),
    ("plot a checkpoint of wrong shapes", damage_checkpoint("shapes"), ["plot", "{run}"], 2,
     "does not fit"),
    # data files
    *[(f"data {kind}", data_folder(kind), [*TRAIN, "--dataset", "mnist", "--data-dir", "{data}"],
       2, words)
      for kind, words in [("truncated", "truncated or corrupt"), ("magic", "wrong magic"),
                          ("counts", "30 images but"), ("unreadable", "cannot read"),
                          ("float-pixels", "holds 32-bit float values; MNIST-format files "
                           "hold unsigned bytes (pixels 0-255, scaled to [0, 1]"),
                          ("missing", "does not hold the four"), ("empty-file", "IDX"),
                          ("gzip-garbage", "cannot read"), ("32x32", "32x32 images"),
                          ("fashion-labels", "holds the fashion-mnist training set")]],
    ("data mnist labels as fashion", data_folder("mnist-labels"),
     [*TRAIN, "--dataset", "fashion-mnist", "--data-dir", "{data}"], 2, "holds the mnist"),
    ("data-dir missing", nothing, [*TRAIN, "--dataset", "mnist", "--data-dir", "{tmp}/nope"], 2,
     "not a folder"),
    ("data-dir empty with auto", lambda tmp: (tmp / "data").mkdir(),
     [*TRAIN, "--dataset", "auto", "--data-dir", "{data}"], 2, "does not hold the four"),
    # the other commands
    ("evaluate missing", nothing, ["evaluate", "{tmp}/nope"], 2, "not a run folder"),
    ("evaluate K 0", nothing, ["evaluate", "{run}", "--iwae-samples", "0"], 2, "positive"),
    ("evaluate batch 0", nothing, ["evaluate", "{run}", "--batch-size", "0"], 2, "positive"),
    ("sample n 0", nothing, ["sample", "{run}", "-n", "0", "--out", "{tmp}/s.png"], 2,
     "positive"),
    ("sample jpg", nothing, ["sample", "{run}", "--out", "{tmp}/s.jpg"], 2, ".png"),
    ("sample under a file", damage_json("file", "x"),
     ["sample", "{run}", "--out", "{tmp}/run/file/s.png"], 2, "{tmp}/run/file"),
    ("plot missing", nothing, ["plot", "{tmp}/nope"], 2, "not a run folder"),
    ("diagnose chains 0", nothing, ["diagnose", "{run}", "--chains", "0"], 2, "positive"),
    ("diagnose images 0", nothing, ["diagnose", "{run}", "--images", "0"], 2, "positive"),
    ("calibrate simulations 1", nothing, ["calibrate", "{run}", "--simulations", "1"], 2,
     "--simulations must be an integer of at least 2"),
    ("calibrate draws 0", nothing, ["calibrate", "{run}", "--draws", "0"], 2, "--draws"),
    ("calibrate missing", nothing, ["calibrate", "{tmp}/nope"], 2, "not a run folder"),
    ("train vamp with m2", nothing, [*TRAIN, "--model", "m2", "--prior", "vamp"], 2,
     "model 'm2' has no prior 'vamp'"),
    ("train iaf with dreg", nothing, [*TRAIN, "--guide", "iaf", "--objective", "iwae",
                                      "--num-particles", "2", "--dreg"], 2,
     "--dreg (doubly reparameterized gradients) needs the Gaussian guide"),
    ("train iaf with z-dim 1", nothing, [*TRAIN, "--guide", "iaf", "--z-dim", "1"], 2,
     "--guide iaf needs --z-dim of at least 2"),
    ("train pseudo-inputs 0", nothing, [*TRAIN, "--prior", "vamp", "--pseudo-inputs", "0"], 2,
     "--pseudo-inputs"),
    ("unknown command", nothing, ["fit"], 2, "invalid choice"),
]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_with_the_right_status_and_destroys_nothing(
        case, tmp_path, capsys, finished_run):
    _, setup, argv, status, words = case
    shutil.copytree(finished_run, tmp_path / "run")
    setup(tmp_path)
    names = {"run": tmp_path / "run", "tmp": tmp_path, "data": tmp_path / "data"}
    argv = [a.format(**names) for a in argv]
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == status, err
    assert words.format(**names) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


def test_an_unexpected_error_is_one_line_with_status_1(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("pyro_vae.cli.train", broken)
    assert main(["train", *SMALL, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "internal error (ZeroDivisionError: a bug)" in err and "PYRO_VAE_DEBUG" in err
    assert len(err.strip().splitlines()) == 1


def test_a_full_disk_during_a_save_exits_4_and_keeps_the_last_checkpoint(
        tmp_path, capsys, monkeypatch, finished_run):
    shutil.copytree(finished_run, tmp_path / "run")
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "3", "--quiet"]) == 4
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.parametrize("damage", ["blank line", "truncated line", "not an object",
                                    "a field not a number", "epoch zero", "nested deep"])
def test_damaged_metrics_lines_never_cost_a_valid_epoch(tmp_path, finished_run, damage, caplog):
    shutil.copytree(finished_run, tmp_path / "run")
    path = tmp_path / "run" / "metrics.jsonl"
    first, second = path.read_text().splitlines()
    bad = {"blank line": "", "truncated line": first[: len(first) // 2],
           "not an object": "[1, 2]",
           "a field not a number": '{"epoch": 2, "train_elbo": "-90"}',
           "epoch zero": '{"epoch": 0, "train_elbo": -90.0}',
           "nested deep": '{"epoch": 2, "x": ' + "[" * 1000 + "]" * 1000 + "}"}[damage]
    path.write_text("\n".join([first, bad, second]) + "\n")
    assert main(["plot", str(tmp_path / "run"), "--only", "curves", "--quiet"]) == 0
    if damage == "a field not a number":
        assert "line 2: train_elbo is '-90', not a number" in caplog.text
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "3", "--quiet"]) == 0
    epochs = [json.loads(line)["epoch"] for line in path.read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_stale_temporary_files_are_removed_on_the_next_start(tmp_path, finished_run):
    shutil.copytree(finished_run, tmp_path / "run")
    stale = tmp_path / "run" / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"x" * 1000)  # what a SIGKILL during a save leaves
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "3", "--quiet"]) == 0
    assert not stale.exists()


def test_an_epoch_whose_every_step_is_skipped_writes_strict_json(tmp_path):
    poisoned_likelihood("test-nan-all", set(range(1, 100)))
    config = tiny_config(epochs=1, nan_policy="skip", fast_step=False)
    config.model.likelihood = "test-nan-all"
    run = train(config, tmp_path / "run", progress=False)
    assert run.metrics[0]["train_elbo"] is None and run.metrics[0]["skipped_steps"] == 8
    line = (tmp_path / "run" / "metrics.jsonl").read_text()
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))


@pytest.mark.slow
def test_two_trainings_on_one_folder_one_writer_at_a_time(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pyro_vae", "train", *SMALL, "--epochs", "400",
           "--out", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").exists():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        for argv in (["train", *SMALL, "--out", str(out), "--force"],
                     ["train", "--resume", str(out), "--epochs", "500", "--quiet"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"being written by another training (PID {first.pid})" in err, err
        # a read-only command works beside it, on its last checkpoint, and says so
        assert main(["evaluate", str(out), "--iwae-samples", "2"]) == 0
        assert f"still training (PID {first.pid})" in capsys.readouterr().err
        assert first.poll() is None  # the first training goes on, undisturbed
    finally:
        first.kill()
        first.wait()
    # the kernel released the lock with the process: the run continues from its checkpoint
    epoch = load_state(out / "checkpoint.pt").epoch
    assert main(["train", "--resume", str(out), "--epochs", str(epoch + 1), "--quiet"]) == 0


ROOTLESS = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def as_user_without_override(argv):
    """Run the CLI where file permissions apply (root's override dropped, if root)."""
    prefix = ROOTLESS if os.geteuid() == 0 else []
    return subprocess.run([*prefix, sys.executable, "-m", "pyro_vae", *argv],
                          capture_output=True, text=True)


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                    reason="root without setpriv: permissions cannot be made to apply")
@pytest.mark.parametrize("kind", ["unreadable data", "unreadable data folder", "unwritable out",
                                  "unreadable run"])
def test_permission_problems_are_one_line(tmp_path, finished_run, kind):
    shutil.copytree(finished_run, tmp_path / "run")
    if kind == "unreadable data":
        data_folder("good")(tmp_path)
        (tmp_path / "data" / "train-images-idx3-ubyte").chmod(0)
        argv = ["train", *SMALL, "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                "--out", str(tmp_path / "new")]
    elif kind == "unreadable data folder":
        data_folder("good")(tmp_path)
        (tmp_path / "data").chmod(0)
        argv = ["train", *SMALL, "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                "--out", str(tmp_path / "new")]
    elif kind == "unwritable out":
        (tmp_path / "locked").mkdir(mode=0o555)
        argv = ["train", *SMALL, "--out", str(tmp_path / "locked" / "run")]
    else:
        (tmp_path / "run" / "checkpoint.pt").chmod(0)
        argv = ["evaluate", str(tmp_path / "run"), "--iwae-samples", "2"]
    before = snapshot(tmp_path)
    result = as_user_without_override(argv)
    assert result.returncode == 2, result.stderr
    assert any(w in result.stderr for w in ("ermission denied", "cannot", "read-only")), \
        result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    if kind == "unreadable data folder":
        assert "cannot read --data-dir" in result.stderr and "make it readable" in result.stderr
        (tmp_path / "data").chmod(0o755)
    assert snapshot(tmp_path) == before


# -- planted symbolic links: refused in one line, nothing outside the run folder written ----

def link(name, to_folder=False):
    """Replace ``run/name`` with a link to a file (or folder) outside the run folder."""
    def setup(tmp):
        target = tmp / "outside" / ("pictures" if to_folder else "notes")
        path = tmp / "run" / name
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)
        path.symlink_to(target)
    return setup


def tensorboard_link(tmp):
    edit_config("train", "tensorboard", True)(tmp)
    link("tensorboard", to_folder=True)(tmp)


RESUME = ["train", "--resume", "{run}", "--epochs", "3", "--quiet"]
LINKS = [  # (id, setup, argv)
    ("lock", link(".lock"), RESUME),
    ("metrics", link("metrics.jsonl"), RESUME),
    ("config", link("config.json"), RESUME),
    ("checkpoint on resume", link("checkpoint.pt"), RESUME),
    ("checkpoint on evaluate", link("checkpoint.pt"), ["evaluate", "{run}", "--iwae-samples", "2"]),
    ("eval.json", link("eval.json"), ["evaluate", "{run}", "--iwae-samples", "2"]),
    ("outputs lock", link(".outputs.lock"), ["evaluate", "{run}", "--iwae-samples", "2"]),
    ("a figure", link("figures/samples.png"), ["plot", "{run}", "--only", "samples"]),
    ("figures on plot", link("figures", to_folder=True), ["plot", "{run}", "--only", "samples"]),
    ("figures on --force", link("figures", to_folder=True), [*TRAIN[:-1], "{run}", "--force"]),
    ("tensorboard", tensorboard_link, RESUME),
    ("sample --out", lambda tmp: (tmp / "s.png").symlink_to(tmp / "outside" / "notes"),
     ["sample", "{run}", "--out", "{tmp}/s.png"]),
]


@pytest.mark.parametrize("case", LINKS, ids=[c[0] for c in LINKS])
def test_a_planted_symlink_is_refused_and_nothing_outside_is_written(
        case, tmp_path, capsys, finished_run):
    _, setup, argv = case
    shutil.copytree(finished_run, tmp_path / "run")
    outside = tmp_path / "outside"
    (outside / "pictures").mkdir(parents=True)
    (outside / "notes").write_text("someone's notes\n")
    (outside / "pictures" / "samples.png").write_bytes(b"someone's picture")
    setup(tmp_path)
    names = {"run": tmp_path / "run", "tmp": tmp_path}
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main([a.format(**names) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "is a symbolic link" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before  # outside, byte for byte; inside too


def test_temporary_names_cannot_be_planted(tmp_path, finished_run):
    """Temporary files get fresh random names created with O_EXCL: a link waiting under the
    old fixed name (eval.json.tmp) is never opened."""
    shutil.copytree(finished_run, tmp_path / "run")
    (tmp_path / "notes").write_text("someone's notes\n")
    for name in ("eval.json.tmp", "config.json.tmp", "metrics.jsonl.tmp"):
        (tmp_path / "run" / name).symlink_to(tmp_path / "notes")
    assert main(["evaluate", str(tmp_path / "run"), "--iwae-samples", "2"]) == 0
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "3", "--quiet"]) == 0
    assert (tmp_path / "notes").read_text() == "someone's notes\n"


def test_a_read_only_run_folder_is_left_as_it_is(tmp_path, capsys, finished_run):
    """Read-only by its permission bits: refused even where the kernel would let the
    process write (root), and before any figure is touched."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(tmp_path)
    for path in [run, *run.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        for argv in (["plot", str(run)], ["evaluate", str(run), "--iwae-samples", "2"],
                     ["sample", str(run), "--out", str(run / "figures" / "s.png")]):
            capsys.readouterr()
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert "is read-only" in err and "chmod u+w" in err, err
            assert len(err.strip().splitlines()) == 1
        assert snapshot(tmp_path) == before
    finally:
        for path in [run, *run.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


def test_a_resume_applies_a_learning_rate_edited_in_config_json(tmp_path, finished_run, caplog):
    shutil.copytree(finished_run, tmp_path / "run")
    edit_config("train", "lr", 0.01)(tmp_path)
    before = load_state(tmp_path / "run" / "checkpoint.pt").model
    with caplog.at_level("INFO", logger="pyro_vae"):
        train(resume=tmp_path / "run", epochs=3, progress=False)
    assert "learning rate 0.01 (config.json) replaces 0.001 (checkpoint)" in caplog.text
    state = load_state(tmp_path / "run" / "checkpoint.pt")
    assert all(float(g["lr"]) == pytest.approx(0.01) for g in state.optimizer["param_groups"])
    # Adam's first steps move each weight by about lr: 0.01 shows, 0.001 would not
    moved = max((state.model[k] - before[k]).abs().max().item() for k in before)
    assert moved > 0.005


def test_a_resume_with_the_rate_it_saved_logs_no_replacement(tmp_path, finished_run, caplog):
    # the rate is a float32 tensor in the checkpoint: 0.001 reads back as 0.0010000000475
    shutil.copytree(finished_run, tmp_path / "run")
    with caplog.at_level("INFO", logger="pyro_vae"):
        train(resume=tmp_path / "run", epochs=3, progress=False)
    assert "replaces" not in caplog.text


@pytest.mark.slow
def test_two_quick_ctrl_c_abort_with_130_and_keep_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pyro_vae", "train", *SMALL, "--epochs", "400",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert load_state(out / "checkpoint.pt").epoch >= 1


# -- a disk that fills: status 4, the fix, and what was written before intact --------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MiB file system (tmpfs) at ``tmp_path/disk``: root only, where mount works."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, leave: int = 0) -> None:
    """Fill ``disk`` with one file, then free ``leave`` bytes of it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
    os.truncate(filler, max(0, filler.stat().st_size - leave))


RUN_ON_DISK = "{disk}/run"
FULL_DISK = [  # (id, bytes left free, argv, the file whose write fails)
    ("resume: metrics", 0, ["train", "--resume", RUN_ON_DISK, "--epochs", "3"],
     "run/metrics.jsonl"),
    ("resume: the checkpoint", 256 << 10, ["train", "--resume", RUN_ON_DISK, "--epochs", "3"],
     "run/checkpoint.pt"),
    ("evaluate: eval.json", 0, ["evaluate", RUN_ON_DISK, "--iwae-samples", "2"],
     "run/eval.json"),
    ("plot: figures", 0, ["plot", RUN_ON_DISK], "run/figures/"),
    ("sample --out", 0, ["sample", RUN_ON_DISK, "--out", "{disk}/s.png"], "s.png"),
    ("train: a new run", 0, [*TRAIN[:-1], "{disk}/new"], "new/"),
]


@pytest.mark.parametrize("case", FULL_DISK, ids=[c[0] for c in FULL_DISK])
def test_a_full_disk_exits_4_with_the_fix_and_keeps_what_was_written(
        case, small_disk, capsys, finished_run):
    _, leave, argv, failing = case
    shutil.copytree(finished_run, small_disk / "run")
    (small_disk / "run" / "eval.json").write_text('{"test": {}}\n')
    fill(small_disk, leave)
    before = snapshot(small_disk / "run")
    capsys.readouterr()
    code = main([a.format(disk=small_disk) for a in argv] + ["--quiet"])
    err = capsys.readouterr().err
    assert code == 4, err
    assert "No space left on device" in err and "free some space" in err, err
    assert f"{small_disk}/{failing}" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    after = snapshot(small_disk / "run")
    # a resume rewrites config.json (its epochs) before training; a metrics line past the
    # checkpoint may stand, and the next resume drops it
    rewritten = ("metrics.jsonl", "config.json")
    assert {k: after.get(k) for k in before if k not in rewritten} == \
        {k: v for k, v in before.items() if k not in rewritten}
    assert after.get("metrics.jsonl", b"").startswith(before.get("metrics.jsonl", b""))
    assert not list((small_disk / "run").rglob("*.tmp"))
    (small_disk / "filler").unlink()
    if argv[0] == "train" and "--resume" in argv:  # space freed: the run continues
        assert main(["train", "--resume", str(small_disk / "run"), "--epochs", "3",
                     "--quiet"]) == 0
        assert [json.loads(x)["epoch"] for x in
                (small_disk / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_tensorboard_on_a_full_disk_raises_in_the_caller_and_prints_nothing(
        small_disk, capfd):
    from pyro_vae.tracking import TensorBoard

    pytest.importorskip("tensorboard")
    fill(small_disk)
    with pytest.raises(OSError) as info:
        board = TensorBoard(small_disk)
        board.epoch({"epoch": 1, "train_elbo": -100.0}, 0.001)
        board.flush()
    assert info.value.errno == errno.ENOSPC
    assert capfd.readouterr().err == ""  # no traceback from the writer's thread


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 40140800000 bytes"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError(),
], ids=["cpu allocator", "cuda", "MemoryError"])
@pytest.mark.parametrize("command", ["train", "evaluate", "sample"])
def test_a_failed_allocation_exits_4_naming_the_sizes_to_lower(
        error, command, tmp_path, capsys, monkeypatch, finished_run):
    shutil.copytree(finished_run, tmp_path / "run")

    def allocate(*args, **kwargs):
        raise error

    run = str(tmp_path / "run")
    argv, sizes = {
        "train": (["train", "--resume", run, "--epochs", "3", "--quiet"],
                  "--batch-size, --num-particles, --hidden-dims or --z-dim"),
        "evaluate": (["evaluate", run, "--iwae-samples", "2", "--quiet"],
                     "--batch-size or --iwae-samples"),
        "sample": (["sample", run, "--out", str(tmp_path / "s.png"), "--quiet"], "lower -n"),
    }[command]
    target = {"train": "pyro_vae.runner.train.Trainer.step",
              "evaluate": "pyro_vae.commands.importance_log_likelihood",
              "sample": "pyro_vae.commands.image_grid"}[command]
    monkeypatch.setattr(target, allocate)
    before = snapshot(tmp_path / "run")
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert "out of memory" in err and sizes in err, err
    assert len(err.strip().splitlines()) == 1
    after = snapshot(tmp_path / "run")  # a resume rewrites config.json (its epochs) first
    assert {k: after[k] for k in before if k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}


# -- Ctrl-C at any moment: status 130, one line ---------------------------------------------

def start_training(out, epochs=400):
    return subprocess.Popen([sys.executable, "-m", "pyro_vae", "train", *SMALL, "--epochs",
                             str(epochs), "--out", str(out)], preexec_fn=default_sigint,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("moment, gap", [("importing", 0.0), ("importing", 0.3),
                                         ("training", 0.0), ("training", 0.3),
                                         ("training", 1.0)])
def test_ctrl_c_twice_at_any_moment_exits_130(tmp_path, moment, gap):
    """While torch is imported (before the tool can catch it) or while training, at
    several spacings: 130, and no traceback."""
    out = tmp_path / "run"
    proc = start_training(out)
    if moment == "importing":  # after Python's own start (past run()'s first line even on a
        time.sleep(0.6)        # busy machine), while torch is still being imported
    else:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").exists():
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(gap)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


@pytest.fixture
def signal_handlers():
    """Restores SIGINT's and SIGTERM's handlers after a test that changes them."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def test_while_a_command_runs_the_first_signal_interrupts_and_later_ones_are_ignored(
        signal_handlers):
    from pyro_vae import __main__ as entry

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, entry._interrupt_once)
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    signal.raise_signal(signal.SIGINT)  # ignored: no exception, the process lives on
    signal.raise_signal(signal.SIGTERM)


def test_the_signal_that_aborts_training_leaves_later_ones_ignored(signal_handlers):
    from pyro_vae.runner.signals import StopRequest

    stop = StopRequest()
    with stop.installed():
        signal.raise_signal(signal.SIGINT)
        assert stop.requested  # the first: a request to stop after this step
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)  # the second aborts
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)  # a third would break the unwinding: ignored


def test_once_the_status_is_decided_no_signal_changes_it(monkeypatch):
    from pyro_vae import __main__ as entry

    monkeypatch.setattr("pyro_vae.cli.main", lambda: 0)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert entry.run() == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -- no stray threads: every command leaves only the threads it found ----------------------

@pytest.mark.parametrize("argv", [
    ["train", "--resume", "{run}", "--epochs", "3"],
    ["train", *SMALL, "--tensorboard", "--out", "{tmp}/board"],
    ["evaluate", "{run}", "--iwae-samples", "2"],
    ["plot", "{run}"],
    ["sample", "{run}", "--out", "{tmp}/s.png"],
    ["train", "--resume", "{tmp}/missing"],  # a failure, too
], ids=["resume", "tensorboard", "evaluate", "plot", "sample", "failing"])
def test_every_command_leaves_no_thread_behind(argv, tmp_path, finished_run):
    import threading

    if "--tensorboard" in argv:
        pytest.importorskip("tensorboard")
    shutil.copytree(finished_run, tmp_path / "run")
    before = set(threading.enumerate())
    main([a.format(run=tmp_path / "run", tmp=tmp_path) for a in argv] + ["--quiet"])
    left = [t for t in threading.enumerate() if t not in before]
    assert not left, left


def test_concurrent_evaluations_merge_eval_json_one_at_a_time(tmp_path, finished_run):
    """An evaluation that finishes while another process holds eval.json's lock waits for
    it, then merges into what that process wrote: no result is lost."""
    from pyro_vae.runner.rundir import RunDir

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with RunDir(run).outputs_lock():
        proc = subprocess.Popen([sys.executable, "-m", "pyro_vae", "evaluate", str(run),
                                 "--iwae-samples", "2"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:  # until its evaluation is done: it now wants the lock
            if "log p(x), K=2: 100%" in line:
                break
        # meanwhile "another evaluation" (this test) writes its result
        (run / "eval.json").write_text(json.dumps({"test": {"7": {"log_px": -1.0}}}))
        time.sleep(1.0)
        assert proc.poll() is None  # still waiting for the lock
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    kept = json.loads((run / "eval.json").read_text())["test"]
    assert set(kept) == {"2", "7"}


def test_the_memory_check_counts_the_model_on_the_meta_device_and_names_the_settings(
        monkeypatch):
    from pyro_vae import ConfigError, RunConfig
    from pyro_vae.runner import resolve

    config = RunConfig()  # 784-400-20: 652,824 parameters, 10.4 MB with Adam's state
    cpu = torch.device("cpu")
    monkeypatch.setattr(resolve, "memory_bytes", lambda device: 11_000_000)
    resolve.check_memory(config, cpu)  # fits
    monkeypatch.setattr(resolve, "memory_bytes", lambda device: 10_000_000)
    with pytest.raises(ConfigError, match=r"652,824 parameters, 10.0 MiB.*9.5 MiB") as info:
        resolve.check_memory(config, cpu)
    assert "ModelConfig.hidden_dims or ModelConfig.z_dim" in str(info.value)
    monkeypatch.setattr(resolve, "memory_bytes", lambda device: 10**9)
    config.train.num_particles = 1000  # 128 x 1000 x 784 outputs: 1.2 GB at least
    with pytest.raises(ConfigError, match="TrainConfig.num_particles"):
        resolve.check_memory(config, cpu)
    resolve.check_memory(config, cpu, num_train=100)  # 100 images a batch: 0.94 GB, fits
