"""The day-to-day workflow: config files, TensorBoard, the Python functions behind each
command, evaluations kept by split and K, progress of long work."""

import json
import logging
import sys

import pytest
import torch

import pyro_vae
from pyro_vae.cli import main
from pyro_vae.commands import diagnose_run, read_evaluations
from pyro_vae.progress import Progress

from .helpers import comparable, tiny_config

# -- config files ----------------------------------------------------------------------------


def test_a_runs_own_config_json_reruns_it_exactly(tmp_path, capsys):
    first = tmp_path / "first"
    config = tiny_config()
    pyro_vae.train(config, first, progress=False)
    assert main(["train", "--config", str(first / "config.json"), "--out",
                 str(tmp_path / "again"), "--quiet"]) == 0
    capsys.readouterr()
    runs = [pyro_vae.load_run(tmp_path / name) for name in ("first", "again")]
    assert comparable(runs[0].metrics) == comparable(runs[1].metrics)
    assert runs[0].config.to_dict() == runs[1].config.to_dict()


def test_flags_override_a_config_file(tmp_path, capsys):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"model": {"z_dim": 3, "hidden_dims": [16]},
                                "data": {"dataset": "mnist-sample", "train_limit": 128,
                                         "test_limit": 20},
                                "train": {"epochs": 1, "lr": 0.002}}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--z-dim", "5", "--out", str(out),
                 "--quiet"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["z_dim"] == 5  # the flag
    assert saved["model"]["hidden_dims"] == [16] and saved["train"]["lr"] == 0.002  # the file


@pytest.mark.parametrize("content, message", [
    ('{"model": {"zdim": 3}}', "ModelConfig has no field zdim"),
    ('{"modle": {}}', "unknown sections modle"),
    ('{"model": {"z_dim": 0}}', "--z-dim must be a positive integer"),
    ('{"model": ', "not valid JSON (line 1"),
    ("[1, 2]", "a config must be a JSON object"),
    (None, "no such file"),
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 64 levels"),
    (" " * (11 << 20) + "{}", "larger than 10000000 bytes"),
], ids=["field", "section", "value", "json", "list", "missing", "deep", "large"])
def test_a_bad_config_file_is_one_line_with_status_2(tmp_path, capsys, content, message):
    path = tmp_path / "settings.json"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_config_cannot_be_combined_with_resume(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--config", "x.json"]) == 2
    assert "drop --config" in capsys.readouterr().err


# -- TensorBoard --------------------------------------------------------------------------


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = pyro_vae.train(tiny_config(tensorboard=True), tmp_path / "run", progress=False)
    pyro_vae.evaluate(run, iwae_samples=3)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"),
                              size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"elbo/train", "elbo/test", "test/kl", "optim/lr", "speed/images_per_second",
            "eval/test/log_px_K3"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("elbo/test")] == [1, 2]
    assert [e.value for e in events.Scalars("elbo/test")] == pytest.approx(
        [r["test_elbo"] for r in run.metrics], rel=1e-6)
    assert {"reconstructions", "samples", "traversals"} <= set(tags["images"])
    assert "posterior_mean/z_1" in tags["histograms"]


def test_tensorboard_does_not_change_the_training(tmp_path):
    plain = pyro_vae.train(tiny_config(), tmp_path / "plain", progress=False)
    logged = pyro_vae.train(tiny_config(tensorboard=True), tmp_path / "logged", progress=False)
    assert comparable(plain.metrics) == comparable(logged.metrics)


def test_tensorboard_needs_a_run_folder():
    with pytest.raises(pyro_vae.ConfigError, match="writes into the run folder"):
        pyro_vae.train(tiny_config(tensorboard=True), None)


def test_tensorboard_without_its_package_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(pyro_vae.ConfigError, match=r"pip install 'pyro-vae\[tensorboard\]'"):
        pyro_vae.train(tiny_config(tensorboard=True), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


# -- the commands as Python functions -----------------------------------------------------


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("workflow") / "run"
    pyro_vae.train(tiny_config(), path, progress=False)
    return path


def test_evaluate_uses_the_batch_size_it_is_given(run_folder, monkeypatch):
    # the out-of-memory advice says to lower --batch-size: both passes must honour it
    seen = {}
    real_terms = pyro_vae.commands.elbo_terms
    real_log_px = pyro_vae.commands.importance_log_likelihood

    def terms(vae, x, batch_size, seed):
        seen["elbo_terms"] = batch_size
        return real_terms(vae, x, batch_size, seed=seed)

    def log_px(vae, x, num_samples, batch_size, **kwargs):
        seen["log_px"] = batch_size
        return real_log_px(vae, x, num_samples, batch_size, **kwargs)

    monkeypatch.setattr(pyro_vae.commands, "elbo_terms", terms)
    monkeypatch.setattr(pyro_vae.commands, "importance_log_likelihood", log_px)
    pyro_vae.evaluate(run_folder, iwae_samples=2, batch_size=7, write=False)
    assert seen == {"elbo_terms": 7, "log_px": 7}


def test_evaluations_are_kept_by_split_and_k(run_folder):
    long = pyro_vae.evaluate(run_folder, iwae_samples=20)
    pyro_vae.evaluate(run_folder, iwae_samples=1)
    pyro_vae.evaluate(run_folder, split="train", iwae_samples=2, write=True)
    pyro_vae.evaluate(run_folder, iwae_samples=7, write=False)
    kept = read_evaluations(run_folder)
    assert set(kept) == {"test", "train"} and set(kept["test"]) == {"20", "1"}
    assert kept["test"]["20"]["log_px"] == pytest.approx(long["log_px"])
    # K = 1 importance sampling is the ELBO, estimated with other noise: the two means
    # differ by Monte-Carlo error only (4 standard errors of their difference)
    one = kept["test"]["1"]
    se = (one["log_px_se"] ** 2 + one["elbo_se"] ** 2) ** 0.5
    assert one["log_px"] == pytest.approx(one["elbo"], abs=4 * se)


def test_an_old_flat_eval_json_is_read_and_a_damaged_one_is_kept(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"split": "test", "iwae_samples": 50,
                                                    "log_px": -100.0}))
    assert read_evaluations(tmp_path) == {"test": {"50": {"split": "test", "iwae_samples": 50,
                                                          "log_px": -100.0}}}
    (tmp_path / "eval.json").write_text("{broken")
    assert read_evaluations(tmp_path) == {}  # reading changes nothing
    assert (tmp_path / "eval.json").read_text() == "{broken"


def test_evaluate_keeps_a_damaged_eval_json_before_writing(run_folder):
    (run_folder / "eval.json").write_text("{broken")
    pyro_vae.evaluate(run_folder, iwae_samples=2)
    assert (run_folder / "eval.json.damaged").read_text() == "{broken"
    assert set(read_evaluations(run_folder)["test"]) == {"2"}


@pytest.mark.parametrize("content, entry", [
    ('{"test": 5}', "test is not an object of results by K"),
    ('{"test": [1, 2]}', "test is not an object of results by K"),
    ('{"valid": {}}', "unknown split 'valid'"),
    ('{"test": {"5": {"log_px": "high"}}}', "test.5.log_px is not a number"),
], ids=["split a number", "split a list", "unknown split", "log_px a string"])
def test_a_malformed_eval_json_is_named_before_the_evaluation_and_kept(
        run_folder, content, entry, caplog, monkeypatch):
    """The schema is checked before the evaluation runs (it was met only after it, and its
    result lost): a warning names the entry, the file is kept, the result is written."""
    (run_folder / "eval.json").write_text(content)
    order = []
    real = pyro_vae.commands.evaluate_run
    monkeypatch.setattr(pyro_vae.commands, "evaluate_run", lambda *a, **k: (
        order.append(("evaluated", "damaged" in caplog.text)), real(*a, **k))[1])
    pyro_vae.evaluate(run_folder, iwae_samples=2)
    assert order == [("evaluated", True)]  # the warning came first
    assert entry in caplog.text
    assert (run_folder / "eval.json.damaged").read_text() == content
    assert set(read_evaluations(run_folder)["test"]) == {"2"}


def test_sample_repeats_with_its_seed_and_leaves_the_global_stream_alone(run_folder, tmp_path):
    run = pyro_vae.load_run(run_folder)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = pyro_vae.sample(run, 4, seed=5, out=tmp_path / "a.png")
    assert torch.rand(1) == before
    b = pyro_vae.sample(run_folder, 4, seed=5)
    image = [ax.images[0].get_array() for ax in (a.axes[0], b.axes[0])]
    assert (image[0] == image[1]).all()
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_write_figures_writes_every_kind(run_folder):
    paths = pyro_vae.write_figures(run_folder, ["traversals", "interpolations"])
    assert [p.name for p in paths] == ["traversals.png", "interpolations.png"]


def test_diagnose_caps_the_number_of_images_with_a_message(run_folder, caplog):
    run = pyro_vae.load_run(run_folder)
    run.splits = run.data
    run.splits.test_x = run.splits.test_x[:2]
    with caplog.at_level(logging.INFO, logger="pyro_vae"):
        result = diagnose_run(run, images=10**5, num_samples=10, warmup=10, chains=1,
                              iwae_samples=10, write=False)
    assert len(result.per_image) == 2
    assert "asked for 100000 images, the test set has 2; diagnosing 2" in caplog.text
    assert "expected about" in caplog.text


# -- progress ------------------------------------------------------------------------------


def test_progress_off_a_terminal_is_a_log_line_per_tenth_with_the_time_left(caplog):
    with caplog.at_level(logging.INFO, logger="pyro_vae"):
        with Progress(20, "work", unit="image") as bar:
            for _ in range(20):
                bar.update()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10
    assert lines[0].startswith("work: 10% (2/20 images)") and "left" in lines[0]
    assert lines[-1].startswith("work: 100% (20/20 images)")


def test_evaluate_logs_its_progress(run_folder, caplog):
    with caplog.at_level(logging.INFO, logger="pyro_vae"):
        pyro_vae.evaluate(run_folder, iwae_samples=2, batch_size=20, write=False,
                          progress=None)
    assert any(r.getMessage().startswith("log p(x), K=2: 100%") for r in caplog.records)


def test_draws_from_the_relaxed_bernoulli_say_which_option_to_drop(tmp_path):
    from pyro_vae.cli import flag_name
    from pyro_vae.errors import naming
    config = tiny_config(epochs=1)
    config.data.binarize = "none"  # bernoulli on gray-scale: scored by bernoulli-relaxed
    run = pyro_vae.train(config, tmp_path / "run", progress=False)
    with pytest.raises(pyro_vae.ConfigError) as info:
        pyro_vae.sample(run, 4, draws=True)
    assert str(info.value).endswith("sample the mean instead (without draws)")
    with naming(flag_name):
        assert str(info.value).endswith("sample the mean instead (without --draws)")
