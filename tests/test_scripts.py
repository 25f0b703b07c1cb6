"""The measurement scripts run end to end on tiny settings."""

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
