"""The README's Python blocks run as written, in order, in a fresh process."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.slow
def test_the_readme_python_blocks_run(tmp_path):
    script = tmp_path / "readme.py"
    script.write_text("\n".join(python_blocks()))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "samples.png").is_file()
    assert (tmp_path / "runs" / "cb" / "eval.json").is_file()


@pytest.mark.slow
def test_the_minimal_svi_script_trains_one_small_epoch():
    result = subprocess.run([sys.executable, "-m", "scripts.svi_minimal", "--epochs", "1",
                             "--train-limit", "512"], cwd=README.parent, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"epoch 1: train ELBO -\d+\.\d\d, test ELBO -\d+\.\d\d nats/image\n",
                        result.stdout)
    script = (README.parent / "scripts" / "svi_minimal.py").read_text()
    assert len(script.splitlines()) < 60  # as the README promises
