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
        "pyro-vae: error: unknown likelihood 'poisson'; choose one of: bernoulli, "
        "bernoulli-relaxed, beta, continuous-bernoulli, normal, normal-fixed"]


@pytest.mark.parametrize("argv, message", [
    (["--likelihood", "gauss"], "unknown likelihood"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--epochs", "-1"], "--epochs must be a positive integer"),
    (["--z-dim", "0"], "--z-dim must be a positive integer"),
    (["--lr", "0"], "--lr must be positive"),
    (["--lr=-1e-3"], "--lr must be positive"),
    (["--likelihood", "normal-fixed", "--likelihood-option", "sigma=1"], "no option sigma"),
    (["--likelihood", "normal-fixed", "--likelihood-option", "scale=0"], "scale > 0"),
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
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["train", *SMALL, "--out", str(out)]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


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
