"""The measurement scripts run end to end on tiny settings."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_likelihood_study_runs_end_to_end(tmp_path):
    doc = tmp_path / "likelihoods.md"
    doc.write_text("# Likelihoods\n\n## Measured: mnist-sample\n\nold\n")
    result = subprocess.run(
        [sys.executable, "-m", "scripts.likelihood_study", "--epochs", "1",
         "--train-limit", "256", "--test-limit", "40", "--iwae-samples", "4",
         "--knn-train", "256", "--runs", str(tmp_path / "runs"), "--figures",
         str(tmp_path / "figures"), "--doc", str(doc), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["key"] for r in rows] == ["bernoulli-gray", "bernoulli-binarized",
                                        "continuous-bernoulli", "normal", "normal-fixed", "beta"]
    relaxed = rows[0]
    assert relaxed["log_px"] is None and relaxed["missing_log_normalizer"] > 784 * 0.69
    assert all(r["log_px"] is not None for r in rows[1:])
    text = doc.read_text()
    assert "old" not in text and "| Beta |" in text and "likelihoods_samples" in text
    assert len(list((tmp_path / "figures").glob("*.png"))) == 2


@pytest.mark.slow
def test_the_ss_vae_reproduction_runs_end_to_end_and_resumes(tmp_path):
    doc = tmp_path / "docs" / "semi-supervised.md"
    command = [sys.executable, "-m", "scripts.reproduce_ss_vae", "--dataset", "mnist-sample",
               "--validation", "500", "--labels", "100", "--draws", "2",
               "--baseline-steps", "100", "--runs", str(tmp_path / "runs"), "--doc", str(doc)]
    for epochs in ("1", "2"):  # the second call resumes the runs of the first
        result = subprocess.run([*command, "--epochs", epochs], capture_output=True,
                                text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "docs" / "results" / "ss_vae.json").read_text())
    runs = data["results"]["100"]
    assert [r["epochs"] for r in runs] == [2, 2] and [r["seed"] for r in runs] == [0, 1]
    assert all(0 <= r["test_accuracy"] <= 1 and 0 <= r["baseline"]["test_accuracy"] <= 1
               for r in runs)
    text = doc.read_text()
    assert "| 100 | 0.9319 (0.0060) | 0.8803 |" in text and "2 of Pyro's 50 epochs" in text
    assert {p.name for p in (tmp_path / "docs" / "figures").glob("*.png")} == {
        "ss_vae_100_accuracy.png", "ss_vae_100_confusion.png", "ss_vae_100_conditional.png"}


@pytest.mark.slow
def test_the_ss_vae_benchmark_times_pyros_loop_and_ours(tmp_path):
    doc = tmp_path / "benchmarks.md"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark_ss_vae", "--dataset", "mnist-sample",
         "--steps", "2", "--repeats", "1", "--doc", str(doc)],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    text = doc.read_text()
    for name in ("Pyro's ss_vae_M2 loop (SVI, TraceEnum_ELBO + aux Trace_ELBO)",
                 "pyro-vae M2, eager steps",
                 "pyro-vae M2, traced step (default)"):
        assert f"| {name} |" in text


@pytest.mark.slow
def test_pyros_own_ss_vae_loop_runs_on_our_data(tmp_path):
    doc = tmp_path / "docs" / "semi-supervised.md"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.pyro_ss_vae_loop", "--dataset", "mnist-sample",
         "--validation", "500", "--labels", "100", "--epochs", "2", "--doc", str(doc)],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "docs" / "results" / "ss_vae_pyro_loop_100.json").read_text())
    assert [r["epoch"] for r in data["history"]] == [1, 2]
    assert 0 <= data["test_accuracy"] <= 1
    assert "## Pyro's own loop, 100 labels, 2 epochs" in doc.read_text()


def test_the_load_benchmark_times_each_loop_quiet_and_beside_a_busy_core(tmp_path):
    doc, out = tmp_path / "benchmarks.md", tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark_load", "--images", "1024", "--epochs", "1",
         "--only", "pyro-vae", "--doc", str(doc), "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == [
        "pyro-vae Trainer, fast step, thread tuner (pyro-vae train)"]
    assert all(r["quiet_ms"] > 0 and r["loaded_ms"] > 0 for r in rows)
    assert "## Training under load (cpu)" in doc.read_text()


def test_the_gpu_check_names_real_cuda_tests_and_reports_each_part(tmp_path):
    """What a CPU can check of scripts/gpu_check: its CUDA tests exist, a part that
    passes, fails or runs out of time is recorded as such, and the report lists them."""
    import argparse

    from scripts import gpu_check

    for node in gpu_check.CUDA_TESTS:
        path, name = node.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), node
    names = [p[0] for p in gpu_check.parts(argparse.Namespace(
        data_dir=None, epochs=2, scratch=str(tmp_path)))]
    assert names == ["CUDA tests", "benchmark (cuda)", "pyro-vae train --device cuda, 3 epochs"]
    results = [gpu_check.run_part("ok", [sys.executable, "-c", "print('fine')"], 30),
               gpu_check.run_part("bad", [sys.executable, "-c", "raise SystemExit(3)"], 30),
               gpu_check.run_part("slow", [sys.executable, "-c", "import time; time.sleep(5)"],
                                  1)]
    assert [r["outcome"] for r in results] == ["passed", "failed (exit 3)", "ran out of its 1 s"]
    text = gpu_check.report(results, "a test machine")
    assert "| ok | passed |" in text and "`fine`" in text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is here")
def test_the_gpu_check_without_a_gpu_says_so_and_exits_2(capsys):
    from scripts import gpu_check

    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_the_priors_and_posteriors_table_runs_end_to_end(tmp_path):
    doc = tmp_path / "priors.md"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.priors_and_posteriors", "--dataset", "mnist-sample",
         "--epochs", "1", "--train-limit", "300", "--test-limit", "40", "--iwae-samples", "4",
         "--simulations", "30", "--runs", str(tmp_path / "runs"), "--doc", str(doc),
         "--figures", str(tmp_path / "figures")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    text = doc.read_text()
    assert text.count("| N(0, I) prior") == 2 and "| VampPrior, IAF guide |" in text
    assert "mnist-sample, 40 test images" in text
    assert {p.name for p in (tmp_path / "figures").glob("*.png")} == {
        "calibration_standard.png", "calibration_vamp.png", "calibration_iaf.png",
        "calibration_vamp-iaf.png", "vamp_pseudo_inputs.png"}


def run_script(tmp_path, name: str, *args: str) -> str:
    """``python -m scripts.NAME ARGS --doc DOC`` from the repository root; DOC's text."""
    doc = tmp_path / "doc.md"
    result = subprocess.run([sys.executable, "-m", f"scripts.{name}", *args, "--doc", str(doc)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return doc.read_text()


@pytest.mark.slow
def test_the_compiled_step_measurement_runs_end_to_end(tmp_path):
    text = run_script(tmp_path, "compiled_step", "--batch-sizes", "8", "--calls", "3",
                      "--rounds", "1")
    row = next(line for line in text.splitlines() if line.startswith("| 8 |"))
    loss, grads = (float(v) for v in row.strip(" |").split("|")[-1].split("/"))
    assert loss < 1e-5 and grads < 1e-4  # the same loss and gradients on the same noise


def test_the_calibration_level_script_counts_rejections_of_an_exact_posterior(tmp_path):
    text = run_script(tmp_path, "calibration_level", "--seeds", "3", "--simulations", "50",
                      "--draws", "10")
    assert "## The level of the check" in text and "with 3 seeds" in text


def test_the_interrupt_sweep_counts_runs_that_exit_130_with_one_line(tmp_path):
    text = run_script(tmp_path, "interrupt_sweep", "--runs", "2", "--latest", "0.5")
    assert "## Two Ctrl-Cs at random moments" in text and "of 2 runs exited 130" in text


def test_the_matmul_kernel_measurement_times_every_product_of_a_step(tmp_path):
    text = run_script(tmp_path, "matmul_kernels", "--batch-sizes", "8", "--calls", "2",
                      "--rounds", "1")
    rows = [line for line in text.splitlines() if line.startswith("| 8 |")]
    assert len(rows) == 12 and "all 11 products of a step" in rows[-1]  # 784-400-20


def test_the_allocator_measurement_compares_glibc_s_default_with_kept_memory(tmp_path):
    text = run_script(tmp_path, "allocator_effect", "--batch-sizes", "64", "--rounds", "1",
                      "--epochs", "1", "--images", "512")
    row = next(line for line in text.splitlines() if line.startswith("| 64 |"))
    assert "## Allocator (cpu)" in text and len(row.split("|")) == 7


def test_the_benchmark_sets_pyro_vae_train_against_the_step_it_chose():
    from scripts import benchmark

    def row(way, seconds):
        return {"name": f"pyro-vae Trainer, Trace_ELBO, fast step ({way})", "batch_size": 128,
                "seconds_per_epoch": seconds, "epochs": [seconds],
                "images_per_second": 60000 / seconds, "ratio_to_plain": 1.0,
                "host_reads_per_step": 0, "peak_memory_mb": None}

    def run(compiled):
        return {"batch_size": 128, "compiled": compiled, "wall_seconds": 10.0,
                "images_per_second_after_first": 54000.0, "test_elbo": -100.0,
                "dataset": "mnist"}

    result = {"machine": "a test machine", "images": 60000, "data": "mnist", "numpyro": False,
              "rows": [row("traced graph", 2.0), row("Inductor-compiled graph", 1.0)],
              "end_to_end": [run(True), run(False)]}
    args = argparse.Namespace(device="cpu", epochs=5, quick=False, batch_sizes=[128])
    text = benchmark.report(args, result)
    assert "| 128 | inductor-compiled | 10.0 | 54,000 | 0.90 | -100.00 |" in text
    assert "| 128 | traced | 10.0 | 54,000 | 1.80 | -100.00 |" in text
