"""The Pyro internals pyro-vae builds on, checked by name: a Pyro release that moves or
changes one fails here, naming it, instead of deep inside a training step."""

import inspect

import pyro
import pytest
from pyro.infer import (
    Trace_ELBO,
    TraceMeanField_ELBO,
    trace_elbo,
    trace_mean_field_elbo,
    traceenum_elbo,
)
from pyro.infer import elbo as pyro_elbo
from pyro.infer import util as infer_util

# (what, object, the parameters pyro-vae passes it, in order)
INTERNALS = [
    ("pyro.infer.trace_elbo._compute_log_r", getattr(trace_elbo, "_compute_log_r", None),
     ["model_trace", "guide_trace"]),
    ("pyro.infer.trace_mean_field_elbo.check_fully_reparametrized",
     getattr(trace_mean_field_elbo, "check_fully_reparametrized", None), ["guide_site"]),
    ("ELBO._get_traces", getattr(Trace_ELBO, "_get_traces", None),
     ["self", "model", "guide", "args", "kwargs"]),
    ("ELBO._get_vectorized_trace", getattr(Trace_ELBO, "_get_vectorized_trace", None),
     ["self", "model", "guide", "args", "kwargs"]),
    ("ELBO._vectorized_num_particles", getattr(Trace_ELBO, "_vectorized_num_particles", None),
     ["self", "fn"]),
    ("pyro.infer.elbo.ELBOModule", getattr(pyro_elbo, "ELBOModule", None),
     ["self", "model", "guide", "elbo"]),
    ("TraceMeanField_ELBO", TraceMeanField_ELBO,
     ["self", "num_particles", "max_plate_nesting"]),
    ("pyro.infer.traceenum_elbo._compute_model_factors",
     getattr(traceenum_elbo, "_compute_model_factors", None), ["model_trace", "guide_trace"]),
    ("pyro.infer.util.Dice", getattr(infer_util, "Dice", None),
     ["self", "guide_trace", "ordering"]),
    ("Dice._get_log_factors", getattr(getattr(infer_util, "Dice", None), "_get_log_factors",
                                      None), ["self", "target_ordinal"]),
]


@pytest.mark.parametrize("what, obj, params", INTERNALS, ids=[w for w, _, _ in INTERNALS])
def test_the_pyro_internals_we_use_exist_with_the_parameters_we_pass(what, obj, params):
    assert obj is not None, f"Pyro {pyro.__version__} has no {what}; pyro_vae/objective.py " \
                            "needs it (see the pin in pyproject.toml)"
    signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    names = list(signature.parameters)
    missing = [p for p in params if p not in names]
    assert not missing, f"{what} in Pyro {pyro.__version__} lacks {missing}: {signature}"


def test_the_installed_pyro_is_the_pinned_minor_version():
    major, minor = (int(part) for part in pyro.__version__.split(".")[:2])
    assert (major, minor) == (1, 9), f"pyproject.toml pins pyro-ppl 1.9.x; found {pyro.__version__}"
