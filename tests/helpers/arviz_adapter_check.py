"""Exercise pyro_vae/arviz_compat.py with whatever ArviZ this interpreter has.

Loads the module by path (not through the package, which needs torch), so it runs in a
light environment with only arviz and numpy. Prints the ArviZ version; exits non-zero
(through an assertion) if anything is off.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np

path = Path(__file__).resolve().parents[2] / "pyro_vae" / "arviz_compat.py"
spec = importlib.util.spec_from_file_location("arviz_compat", path)
compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compat)

rng = np.random.default_rng(0)
draws = rng.normal(size=(2, 400, 3, 4))  # (chain, draw, image, latent)
data = compat.to_arviz({"z": draws}, {"diverging": np.zeros((2, 400), dtype=bool)},
                       dims={"z": ["image", "latent"]},
                       coords={"image": np.arange(3), "latent": np.arange(4)})
sizes = dict(data["posterior"]["z"].sizes)
assert sizes == {"chain": 2, "draw": 400, "image": 3, "latent": 4}, sizes
assert bool(data["sample_stats"]["diverging"].values.any()) is False
r = compat.rhat(draws)
assert r.shape == (3, 4) and np.all(r < 1.05), r
assert np.all(compat.rhat(draws + np.array([0.0, 3.0])[:, None, None, None]) > 1.5)
e = compat.ess(draws, "bulk")
assert e.shape == (3, 4) and np.all(e > 300), e
assert compat.ess(draws, "tail").shape == (3, 4)
table = compat.summary(data)
assert len(table) == 12 and "r_hat" in table.columns, table.columns
# PSIS k-hat: ordered by the weights' tail index (k = 0.2, 1.0), on both versions
light = compat.pareto_khat(np.log(rng.pareto(1 / 0.2, size=2000) + 1))
heavy = compat.pareto_khat(np.log(rng.pareto(1 / 1.0, size=2000) + 1))
assert light < 0.4 and heavy > 0.7, (light, heavy)
print(f"arviz {compat.az.__version__} (major {compat.ARVIZ_MAJOR}) on Python "
      f"{sys.version.split()[0]}: ok")
