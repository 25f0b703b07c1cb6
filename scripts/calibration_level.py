"""How often does ``pyro-vae calibrate`` reject a guide that is exactly right?

Runs the check on probabilistic PCA with its exact posterior as the guide (the model of
tests/test_calibration.py) for many seeds and counts the rejections, in all and by part
(ranks, moments); at level alpha it should be about alpha. Writes the section "The level
of the check" of docs/priors-and-posteriors.md:

    python -m scripts.calibration_level [--seeds 200] [--simulations 200] [--draws 20]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from pyro_vae.calibration import ALPHA, calibrate_model
from scripts._docs import update_section
from tests.test_calibration import PPCA

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--simulations", type=int, default=200)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "priors-and-posteriors.md")
    args = parser.parse_args()
    results = [calibrate_model(PPCA(1.0), args.simulations, args.draws, seed=seed)
               for seed in range(args.seeds)]
    rejected = sum(not r.passed for r in results)
    ranks = sum(not r.ranks_uniform for r in results)
    moments = sum(not r.moments_match for r in results)
    se = math.sqrt(ALPHA * (1 - ALPHA) / args.seeds)
    body = (f"`python -m scripts.calibration_level --seeds {args.seeds} --simulations "
            f"{args.simulations} --draws {args.draws}`: the exact posterior of probabilistic "
            f"PCA, checked with {args.seeds} seeds at level {ALPHA:g}, was rejected "
            f"**{rejected} times ({rejected / args.seeds:.1%})**: {ranks} by the ranks, "
            f"{moments} by the moments (each tested at {ALPHA / 2:g}). The binomial standard "
            f"error of a {ALPHA:.0%} rate over {args.seeds} seeds is {se:.1%}.")
    print(body)
    update_section(args.doc, "The level of the check", body)


if __name__ == "__main__":
    main()
