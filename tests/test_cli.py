import json
import subprocess
import sys

import pytest

from pyro_vae.cli import main

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


@pytest.mark.parametrize("argv, message", [
    (["--likelihood", "gauss"], "unknown likelihood"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--epochs", "-1"], "--epochs must be a positive integer"),
    (["--z-dim", "0"], "--z-dim must be a positive integer"),
    (["--lr", "0"], "--lr must be a positive finite number"),
    (["--lr=-1e-3"], "--lr must be a positive finite number"),
    (["--lr", "inf"], "--lr must be a positive finite number"),
    (["--seed", "-1"], "--seed must be an integer in [0, 4294967295]"),
    (["--seed", str(2**40)], "--seed must be an integer"),
    (["--likelihood", "normal-fixed", "--likelihood-option", "sigma=1"], "no option sigma"),
    (["--likelihood", "normal-fixed", "--likelihood-option", "scale=0"], "finite scale > 0"),
    (["--hidden-dims", "400,x"], "comma-separated integers"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/dir"], "not a folder"),
    (["--binarize", "sometimes"], "invalid choice"),
    (["--likelihood", "bernoulli", "--binarize", "none", "--device", "cuda"], "no CUDA"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    try:
        if "cuda" in argv:
            import torch
            if torch.cuda.is_available():
                pytest.skip("this machine has CUDA")
        code = main(["train", "--dataset", "mnist-sample", "--quiet", *argv,
                     "--out", str(tmp_path / "r")])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


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


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "{missing}"], "not a run folder"),
    (["evaluate", "{run}", "--iwae-samples", "0"], "positive"),
    (["sample", "{run}", "-n", "0", "--out", "x.png"], "positive"),
    (["sample", "{run}", "--out", "x.jpg"], ".png"),
    (["plot", "{missing}"], "not a run folder"),
])
def test_run_commands_reject_bad_input_with_exit_2(tmp_path, capsys, argv, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    argv = [a.format(run=run, missing=tmp_path / "nope") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


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
