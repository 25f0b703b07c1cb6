"""Execute the notebooks in docs/notebooks in place, so they are stored with their outputs.

    python -m scripts.execute_notebooks            # the full settings (several minutes)

Runs each notebook from the repository's root, with ``CI`` unset (the notebooks' full
settings) and figures as PNGs; the test suite re-executes them at tiny settings.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat.validator import normalize

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "docs" / "notebooks").glob("*.ipynb"))


def execute(path: Path, timeout: int = 3600) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    _, notebook = normalize(notebook)  # cell ids, as nbformat >= 5.1 expects
    notebook = nbformat.from_dict(notebook)
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook stems (default: all)")
    args = parser.parse_args()
    os.environ.pop("CI", None)
    os.environ.pop("MPLBACKEND", None)
    for path in NOTEBOOKS:
        if args.names and path.stem not in args.names:
            continue
        start = time.perf_counter()
        notebook = execute(path)
        for cell in notebook.cells:  # timings and kernel ids differ on every run
            cell.get("metadata", {}).pop("execution", None)
        nbformat.write(notebook, path)
        print(f"{path.relative_to(ROOT)}: {time.perf_counter() - start:.0f} s, "
              f"{path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
