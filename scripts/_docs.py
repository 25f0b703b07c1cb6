"""Helpers for scripts that record measurements in docs/*.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def machine_description(device: str = "cpu") -> str:
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()}-core CPU ({cpu}), {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def update_section(doc: Path, title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of ``doc`` with ``body``."""
    text = doc.read_text() if doc.exists() else ""
    # the data folders of the project's own machines mean nothing to readers
    body = re.sub(r"(\.\./)+shared/data/[\w-]+", "MNIST_DIR", body)
    block = f"## {title}\n\n<!-- written by a script; do not edit by hand -->\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
