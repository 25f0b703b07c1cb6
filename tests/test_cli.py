import json
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae import register_model
from pyro_vae.cli import main
from pyro_vae.model import data_plate

SMALL = ["--dataset", "mnist-sample", "--train-limit", "256", "--test-limit", "100",
         "--hidden-dims", "32", "--z-dim", "2", "--epochs", "1", "--quiet"]


def test_train_then_resume_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    assert "run folder" in capsys.readouterr().out
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_python_dash_m_runs_the_tool_and_exits_2_on_bad_input(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pyro_vae", "train", "--likelihood", "poisson",
                             "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pyro-vae: error: unknown likelihood 'poisson'; --likelihood must be one of: "
        "bernoulli, bernoulli-relaxed, beta, continuous-bernoulli, normal, normal-fixed "
        "(or register your own likelihood in a module and --import it)"]


def test_resume_refuses_new_settings_and_missing_runs(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "none")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--lr", "0.1"]) == 2
    assert "only --epochs applies" in capsys.readouterr().err


def test_existing_run_folder_is_kept(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["train", *SMALL, "--out", str(out)]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_relaxed_bernoulli_warns_in_one_line(tmp_path, capsys):
    argv = ["train", *SMALL, "--binarize", "none", "--out", str(tmp_path / "r")]
    argv.remove("--quiet")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "not a bound on a log-likelihood" in err


def test_likelihoods_command_lists_the_registry(capsys):
    assert main(["likelihoods"]) == 0
    out = capsys.readouterr().out
    assert "continuous-bernoulli" in out and "beta" in out
    assert "options: scale=0.1" in out and "NOT normalized" in out and "scores all reals" in out
    assert "``" not in out  # docstring markup is not shown raw


def test_evaluate_plot_and_sample_a_trained_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    assert {p.name for p in (out / "figures").iterdir()} >= {"reconstructions.png",
                                                             "samples.png"}
    capsys.readouterr()
    assert main(["evaluate", str(out), "--iwae-samples", "50", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "log p(x), K=50" in printed and "bits/dim" in printed
    assert main(["evaluate", str(out), "--iwae-samples", "2", "--quiet"]) == 0
    kept = json.loads((out / "eval.json").read_text())
    assert set(kept["test"]) == {"50", "2"}  # a quick check does not replace a longer one
    result = kept["test"]["50"]
    assert result["num_images"] == 100 and result["iwae_samples"] == 50
    # the importance-sampled estimate is not below the ELBO beyond Monte-Carlo error
    assert result["log_px"] >= result["elbo"] - 3 * result["gap_se"]
    assert main(["plot", str(out)]) == 0
    assert {p.name for p in (out / "figures").iterdir()} >= {
        "reconstructions.png", "samples.png", "curves.png", "latent.png", "manifold.png",
        "traversals.png", "interpolations.png"}
    assert main(["sample", str(out), "-n", "16", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["sample", str(out), "-n", "4", "--out", str(tmp_path / "s2.PNG")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "s2.PNG")  # the file written
    assert [p.name for p in tmp_path.glob("s2.*")] == ["s2.PNG"]


@pytest.mark.slow
def test_diagnose_writes_json_and_figures(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["diagnose", str(out), "--images", "2", "--num-samples", "60", "--warmup",
                 "60", "--chains", "2", "--iwae-samples", "300"]) == 0
    printed = capsys.readouterr().out
    assert "approx gap" in printed
    rows = json.loads((out / "diagnostics.json").read_text())["images"]
    assert len(rows) == 2 and {"rhat_max", "k_hat", "amortization_gap"} <= set(rows[0])
    names = {p.name for p in (out / "figures").iterdir()}
    assert {"diagnostics_pairs.png", "diagnostics_forest.png", "diagnostics_khat.png",
            "diagnostics_gaps.png"} <= names
    assert main(["diagnose", str(out), "--chains", "0"]) == 2


def test_each_warning_is_printed_once(tmp_path, capsys):
    run = str(tmp_path / "r")
    for argv in (["train", *SMALL, "--binarize", "none", "--out", run],
                 ["plot", run, "--only", "samples"]):
        assert main(argv) == 0
        err = capsys.readouterr().err.splitlines()
        assert sum("scored with bernoulli-relaxed" in line for line in err) == 1, err
        assert len(err) == len(set(err)), err  # no line twice


class _NoPictures(torch.nn.Module):
    """The protocol's two programs and nothing else: no encode, decode or sample_prior."""

    def __init__(self, x_dim, z_dim, likelihood):
        super().__init__()
        self.x_dim, self.z_dim, self.likelihood = x_dim, z_dim, likelihood
        self.decoder = torch.nn.Linear(z_dim, x_dim)
        self.loc = torch.nn.Linear(x_dim, z_dim)

    def model(self, x, num_data=None, kl_weight=None, index=None):
        with data_plate(x, num_data, index):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0)
                            .expand([x.shape[0], self.z_dim]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, num_data=None, kl_weight=None, index=None):
        with data_plate(x, num_data, index):
            pyro.sample("z", dist.Normal(self.loc(x), 1.0).to_event(1))


@register_model("test-no-pictures", overwrite=True)
def _no_pictures(config, likelihood):
    """A model with no picture methods (tests/test_cli.py)."""
    return _NoPictures(config.x_dim, config.z_dim, likelihood)


def test_a_model_without_pictures_trains_and_refuses_diagnose_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--model", "test-no-pictures", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "figures:" not in printed and "run folder:" in printed
    assert main(["diagnose", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not one" in err[0]
