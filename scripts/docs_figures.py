"""Write the example figures shown in docs/evaluation.md (small PNGs in docs/figures/).

Trains two runs on mnist-sample (the default 784-400-20 network for 30 epochs, and a
2-D latent space for the manifold), or reuses them if they exist, then saves one figure
of each kind. Every figure is checked to stay under 200 KB.

    python -m scripts.docs_figures [--epochs 30]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyro_vae import RunConfig, load_run, train
from pyro_vae.plots import figures_for_run, save_figures

LIMIT = 200_000


def trained(path: Path, epochs: int, z_dim: int):
    if (path / "checkpoint.pt").exists():
        run = load_run(path)
        if run.epoch >= epochs:
            return run
        return train(resume=path, epochs=epochs, progress=False)
    config = RunConfig()
    config.data.dataset, config.train.epochs, config.model.z_dim = "mnist-sample", epochs, z_dim
    return train(config, path, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--runs", type=Path, default=Path("runs/docs"))
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()
    for name, z_dim, kinds in [("z20", 20, ("reconstructions", "samples", "curves", "latent",
                                            "traversals", "interpolations")),
                               ("z2", 2, ("latent", "manifold"))]:
        run = trained(args.runs / name, args.epochs, z_dim)
        figures = figures_for_run(run, kinds)
        figures = {f"{key}_{name}" if name == "z2" else key: fig for key, fig in figures.items()}
        for path in save_figures(figures, args.out, dpi=80):
            size = path.stat().st_size
            assert size < LIMIT, f"{path} is {size} bytes; docs figures stay under {LIMIT}"
            print(path, size)


if __name__ == "__main__":
    main()
