"""Build ArviZ data from the arrays of pyro_vae.export with whatever ArviZ this interpreter
has, and check that the values come back unchanged (a round trip).

Loads pyro_vae/arviz_compat.py by path (the package needs torch; this runs in a light
environment with arviz and numpy only). Usage: python arviz_export_check.py FOLDER, where
FOLDER holds, per case NAME, NAME.npz (the posterior's and sample_stats' arrays) and
NAME.json (dims and coords). Prints one line per case; fails through an assertion.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

path = Path(__file__).resolve().parents[2] / "pyro_vae" / "arviz_compat.py"
spec = importlib.util.spec_from_file_location("arviz_compat", path)
compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compat)

folder = Path(sys.argv[1])
for meta in sorted(folder.glob("*.json")):
    spec = json.loads(meta.read_text())
    with np.load(meta.with_suffix(".npz"), allow_pickle=False) as arrays:
        posterior = {k[len("posterior."):]: arrays[k] for k in arrays.files
                     if k.startswith("posterior.")}
        stats = {k[len("sample_stats."):]: arrays[k] for k in arrays.files
                 if k.startswith("sample_stats.")} or None
    coords = {k: np.asarray(v) for k, v in spec["coords"].items()}
    data = compat.to_arviz(posterior, stats, dims=spec["dims"], coords=coords)
    for name, values in posterior.items():
        back = data["posterior"][name]
        assert back.dims == ("chain", "draw", *spec["dims"][name]), back.dims
        assert np.array_equal(back.values, values), name
    if stats:
        assert np.array_equal(data["sample_stats"]["diverging"].values, stats["diverging"])
    table = compat.summary(data, kind="stats" if stats is None else "all")
    expected = sum(int(np.prod(v.shape[2:])) for v in posterior.values())
    assert len(table) == expected, (len(table), expected)
    print(f"{meta.stem}: arviz {compat.az.__version__} (major {compat.ARVIZ_MAJOR}) on Python "
          f"{sys.version.split()[0]}: {len(table)} rows, values unchanged")
