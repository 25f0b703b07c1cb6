import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyro_vae import ConfigError, elbo_terms, load_run, seeds, train
from pyro_vae.errors import RunDirError
from pyro_vae.runner.state import load_state

from .helpers import comparable, default_sigint, tiny_config


def test_training_in_memory_returns_metrics_per_epoch():
    run = train(tiny_config(), progress=False)
    assert run.path is None and [r["epoch"] for r in run.metrics] == [1, 2]
    for record in run.metrics:
        assert {"epoch", "train_elbo", "test_elbo", "seconds", "images_per_second"} <= set(record)
        assert record["test_elbo"] < 0
        assert record["test_elbo"] == pytest.approx(
            record["test_log_likelihood"] - record["test_kl"], rel=1e-5)
    assert run.metrics[1]["train_elbo"] > run.metrics[0]["train_elbo"]


def test_training_does_not_change_the_callers_config():
    config = tiny_config()
    train(config, progress=False)
    assert config.data.binarize is None and config.model.x_dim == 784


def test_run_folder_rebuilds_model_and_data(tmp_path):
    run = train(tiny_config(), tmp_path / "run", progress=False)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt"} <= names
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["dataset"] == "mnist-sample" and saved["data"]["binarize"] == "dynamic"
    loaded = load_run(tmp_path / "run")
    assert loaded.metrics == run.metrics
    torch.testing.assert_close(loaded.data.test_x, run.data.test_x, rtol=0, atol=0)
    again = elbo_terms(loaded.vae, loaded.data.test_x,
                       seed=seeds.elbo_noise(loaded.config.train.seed)).mean()["elbo"]
    assert again == pytest.approx(run.metrics[-1]["test_elbo"], abs=1e-4)


def test_resume_gives_the_metrics_of_an_uninterrupted_run(tmp_path):
    straight = train(tiny_config(epochs=3), tmp_path / "a", progress=False)
    train(tiny_config(epochs=2), tmp_path / "b", progress=False)
    resumed = train(resume=tmp_path / "b", epochs=3, progress=False)
    assert comparable(resumed.metrics) == comparable(straight.metrics)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_existing_run_is_refused_without_force(tmp_path):
    train(tiny_config(epochs=1), tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(RunDirError, match="resume="):
        train(tiny_config(epochs=1), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before
    train(tiny_config(epochs=1), tmp_path / "run", force=True, progress=False)


@pytest.mark.parametrize("settings", [
    {"elbo": "meanfield"},
    {"num_particles": 3},
    {"fast_step": False},
    {"fast_step": False, "elbo": "meanfield", "num_particles": 2},
])
def test_elbo_variants_train(settings):
    run = train(tiny_config(epochs=1, **settings), progress=False)
    assert torch.isfinite(torch.tensor(run.metrics[0]["train_elbo"]))
    # better than the best model without a latent code that ignores the data: p = 1/2 per pixel
    assert run.metrics[0]["test_elbo"] > -784 * math.log(2)


def test_fast_and_eager_steps_train_to_the_same_metrics():
    """The traced graph replays what Pyro computes eagerly, noise included: the same
    metrics to float32 rounding (its matrix products are oneDNN's, not the BLAS's)."""
    fast = comparable(train(tiny_config(fast_step=True), progress=False).metrics)
    eager = comparable(train(tiny_config(fast_step=False), progress=False).metrics)
    assert [r.keys() for r in fast] == [r.keys() for r in eager]
    for a, b in zip(fast, eager):
        for key, value in a.items():
            if isinstance(value, float):
                assert value == pytest.approx(b[key], rel=1e-4, abs=1e-4), key
            else:
                assert value == b[key], key


def test_resume_with_fewer_epochs_than_finished_is_refused(tmp_path):
    train(tiny_config(epochs=2), tmp_path / "run", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="finished 2 epochs"):
        train(resume=tmp_path / "run", epochs=1, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_sigint_mid_epoch_saves_and_resumes_exactly(tmp_path):
    """Ctrl-C between two steps: a mid-epoch checkpoint that resumes bit for bit."""
    args = ["--dataset", "mnist-sample", "--epochs", "3", "--batch-size", "8",
            "--hidden-dims", "64", "--z-dim", "4", "--test-limit", "100", "--quiet"]
    cmd = [sys.executable, "-m", "pyro_vae", "train", *args]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "a")], stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)
    metrics = tmp_path / "a" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.3)  # well inside epoch 2 (an epoch takes a few seconds)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    state = load_state(tmp_path / "a" / "checkpoint.pt")
    assert state.epoch == 1 and 0 < state.partial["step"] < 563
    resumed = subprocess.run([*cmd[:4], "--resume", str(tmp_path / "a"), "--quiet"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run([*cmd, "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert straight.returncode == 0
    read = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read(tmp_path / "a"), read(tmp_path / "b")
    assert [r["epoch"] for r in a] == [1, 2, 3]
    assert [r["train_elbo"] for r in a] == [r["train_elbo"] for r in b]
    assert [r["test_elbo"] for r in a] == [r["test_elbo"] for r in b]
    # the interrupted and resumed run leaves the same files as the straight one
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))


@pytest.mark.parametrize(("epochs", "device", "setting", "chosen"), [
    (3, "cpu", None, True),  # 3 x 700,000 images: 2.1 million
    (2, "cpu", None, False),
    (3, "cuda", None, False),  # CUDA graphs, not Inductor
    (2, "cpu", True, True),  # a setting is kept as it is
    (3, "cpu", False, False),
])
def test_auto_compile_step_compiles_the_cpu_step_of_runs_of_two_million_images(
        epochs, device, setting, chosen, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing compiled before
    from pyro_vae.runner.compiling import AUTO_COMPILE_IMAGES, compile_step

    assert AUTO_COMPILE_IMAGES == 2_000_000
    config = tiny_config(epochs=epochs, compile_step=setting)
    assert compile_step(config, 700_000, torch.device(device)) is chosen


def test_the_auto_compile_choice_is_recorded_in_the_run_s_config(tmp_path):
    run = train(tiny_config(epochs=1), tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run.config.train.compile_step is False and saved["train"]["compile_step"] is False


def test_a_step_compiled_before_into_the_cache_compiles_from_500_000_images(tmp_path,
                                                                            monkeypatch):
    from pyro_vae.runner.compiling import compile_step, remember_compiled

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    config = tiny_config(epochs=3)  # 3 x 200,000 images
    assert not compile_step(config, 200_000, cpu)
    remember_compiled(config)
    assert compile_step(config, 200_000, cpu)
    assert not compile_step(tiny_config(epochs=1), 200_000, cpu)  # 200,000: too few
    other_rate = tiny_config(epochs=3, lr=0.5, seed=7)  # the same step
    assert compile_step(other_rate, 200_000, cpu)
    other_model = tiny_config(epochs=3)
    other_model.model.z_dim += 1
    assert not compile_step(other_model, 200_000, cpu)
    (tmp_path / "pyro-vae-compiled-steps.json").write_text("{not json")
    assert not compile_step(config, 200_000, cpu)  # an unreadable memory knows nothing


@pytest.mark.slow
def test_a_compiled_run_keeps_its_kernels_in_pyro_vae_s_cache_folder(tmp_path):
    """torchvision imports Dynamo, which points TORCHINDUCTOR_CACHE_DIR at /tmp unless
    the run has set it first."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    args = ["--dataset", "mnist-sample", "--epochs", "1", "--batch-size", "64",
            "--hidden-dims", "32", "--z-dim", "4", "--test-limit", "100", "--quiet",
            "--compile-step", "--out", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-m", "pyro_vae", "train", *args], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    cache = tmp_path / "cache" / "pyro-vae" / "inductor"
    assert (cache / "pyro-vae-compiled-steps.json").is_file()
    assert len(list(cache.iterdir())) > 1  # Inductor's own files beside it
