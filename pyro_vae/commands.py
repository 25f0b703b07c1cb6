"""Everything the ``pyro-vae`` commands do, as Python functions of a run.

Each takes a :class:`~pyro_vae.runner.rundir.Run` or the path of a run folder, and does
what its command does -- results returned, files written where the command writes them::

    import pyro_vae

    run = pyro_vae.load_run("runs/quickstart")
    pyro_vae.evaluate(run, iwae_samples=500)      # the command: evaluate
    pyro_vae.write_figures(run)                   # plot
    pyro_vae.sample(run, 16, out="samples.png")   # sample
    pyro_vae.diagnose_run(run, images=2)          # diagnose

``train`` is :func:`pyro_vae.train` itself. The command-line tool calls these functions
and only parses and prints.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from matplotlib.figure import Figure

from .diagnostics import Diagnosis, diagnose, estimate_seconds
from .errors import ConfigError
from .estimators import fixed_noise
from .evaluate import evaluate_run
from .plots import (
    describe,
    figures_for_run,
    forest,
    image_grid,
    inference_gap_bars,
    khat_per_image,
    posterior_pairs,
    save_figures,
)
from .progress import duration
from .runner.rundir import Run, load_run
from .tracking import TensorBoard

log = logging.getLogger(__name__)

EVALUATIONS = "eval.json"
DIAGNOSTICS = "diagnostics.json"
MAX_DIAGNOSED_IMAGES = 100  # NUTS per image: past this, diagnose takes hours


def as_run(run: Run | str | os.PathLike, device: str | torch.device = "cpu") -> Run:
    """``run`` itself, or the run loaded from the folder it names."""
    return run if isinstance(run, Run) else load_run(run, device=device)


# -- evaluate ----------------------------------------------------------------------------


def evaluate(run: Run | str | os.PathLike, split: str = "test", iwae_samples: int = 5000,
             batch_size: int = 100, *, write: bool = True, progress: bool | None = False
             ) -> dict:
    """ELBO terms and importance-sampled ``log p(x)`` (:func:`~pyro_vae.evaluate_run`).

    With ``write`` the result is kept in ``RUN_DIR/eval.json`` under its split and ``K``
    (:func:`read_evaluations`), beside earlier ones: a quick ``K = 1`` check never replaces
    a ``K = 5000`` result. Runs trained with TensorBoard also get the numbers there.
    """
    run = as_run(run)
    result = evaluate_run(run, split, iwae_samples, batch_size, progress=progress)
    if write and run.path is not None:
        results = _evaluations(run.path / EVALUATIONS, keep_damaged=True)
        results.setdefault(split, {})[str(iwae_samples)] = result
        _write_json(run.path / EVALUATIONS, results)
        if run.config.train.tensorboard:
            board = TensorBoard(run.path)
            board.evaluation(result)
            board.close()
    return result


def read_evaluations(run: Run | str | os.PathLike) -> dict[str, dict[str, dict]]:
    """The evaluations kept in ``RUN_DIR/eval.json``: ``{split: {K: result}}``.

    A file written before results were keyed (one flat result) is read into this form; an
    unreadable one reads as empty, with a warning (:func:`evaluate` keeps it as
    ``eval.json.damaged`` before writing a new one, so nothing is lost).
    """
    return _evaluations(_folder(run) / EVALUATIONS)


def _folder(run: Run | str | os.PathLike) -> Path:
    return Path(run.path if isinstance(run, Run) else run)


def _evaluations(path: Path, keep_damaged: bool = False) -> dict[str, dict[str, dict]]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        if keep_damaged:
            kept = path.with_name(EVALUATIONS + ".damaged")
            os.replace(path, kept)
            log.warning("%s was unreadable; kept as %s", path, kept)
        else:
            log.warning("%s is unreadable; read as empty", path)
        return {}
    if "split" in data and "iwae_samples" in data:  # one flat result, as first written
        return {data["split"]: {str(data["iwae_samples"]): data}}
    return data


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# -- figures and samples -----------------------------------------------------------------


def write_figures(run: Run | str | os.PathLike, kinds=None, folder: str | Path | None = None
                  ) -> list[Path]:
    """Write the run's figures (or the ``kinds`` named) as PNGs to ``RUN_DIR/figures`` (or
    ``folder``); returns their paths. :func:`pyro_vae.plots.figures_for_run` returns the
    figures themselves, for a notebook."""
    run = as_run(run)
    if folder is None:
        if run.path is None:
            raise ConfigError("this run was trained in memory; give a folder for its figures")
        folder = run.path / "figures"
    return save_figures(figures_for_run(run, kinds), folder)


def sample(run: Run | str | os.PathLike, num_samples: int = 64, *, draws: bool = False,
           seed: int = 0, out: str | Path | None = None) -> Figure:
    """A grid of ``num_samples`` images from the prior: the likelihood's mean of
    ``p(x | z)``, or draws ``x ~ p(x | z)`` with ``draws``; saved to ``out`` (a .png) if
    given. The same ``seed`` gives the same images."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
    if out is not None and Path(out).suffix.lower() != ".png":
        raise ConfigError(f"out must name a .png file, got {out}")
    run = as_run(run)
    with fixed_noise(seed, run.device):
        d = run.vae.sample_prior(num_samples)
        if draws:
            try:
                images, what = d.sample(), "draws x ~ p(x | z)"
            except NotImplementedError as e:
                raise ConfigError(f"{e}; sample the mean instead (draws=False)") from None
        else:
            images, what = d.mean, "mean of p(x | z)"
    fig = image_grid(images.cpu(), title=f"{num_samples} prior samples, {what} -- {describe(run)}")
    if out is not None:
        out = Path(out)
        save_figures({out.stem: fig}, out.parent)
    return fig


# -- diagnose ----------------------------------------------------------------------------


def diagnose_run(run: Run | str | os.PathLike, images: int = 4, num_samples: int = 500,
                 warmup: int = 500, chains: int = 2, iwae_samples: int = 5000, seed: int = 0,
                 *, write: bool = True, progress: bool | None = False) -> Diagnosis:
    """Posterior diagnostics of the first ``images`` test images (:func:`diagnose`).

    Logs the expected time first (a short timed NUTS pilot); asks for at most
    :data:`MAX_DIAGNOSED_IMAGES` images and never more than the test set holds (a request
    beyond that is capped, with a warning). With ``write``: ``RUN_DIR/diagnostics.json``
    and four figures ``RUN_DIR/figures/diagnostics_*.png``.
    """
    for name, value in [("images", images), ("num_samples", num_samples), ("warmup", warmup),
                        ("chains", chains), ("iwae_samples", iwae_samples)]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    run = as_run(run)
    if run.vae.stochastic_layers != 1:
        raise ConfigError("diagnostics compare the guide with NUTS on one latent layer; this "
                          "run has two stochastic layers")
    available = len(run.data.test_x)
    cap = min(available, MAX_DIAGNOSED_IMAGES)
    if images > cap:
        why = (f"the test set has {available}" if available <= MAX_DIAGNOSED_IMAGES
               else f"at most {MAX_DIAGNOSED_IMAGES} are diagnosed (NUTS runs per image)")
        log.warning("asked for %d images, %s; diagnosing %d", images, why, cap)
        images = cap
    x = run.data.test_x[:images]
    expected = estimate_seconds(run.vae, x, num_samples, warmup, chains, seed)
    log.info("diagnosing %d image(s): %d NUTS chain(s) x %d iterations each, then a fit of "
             "q* per image; expected about %s", images, chains, warmup + num_samples,
             duration(expected))
    labels = run.data.test_y[:images].tolist()
    result = diagnose(run.vae, x, num_samples, warmup, chains, iwae_samples=iwae_samples,
                      seed=seed, labels=labels, progress=progress)
    if write and run.path is not None:
        settings = {"images": images, "num_samples": num_samples, "warmup": warmup,
                    "chains": chains, "iwae_samples": iwae_samples, "seed": seed}
        _write_json(run.path / DIAGNOSTICS, {"images": result.per_image, "settings": settings})
        save_figures(diagnosis_figures(result, about=describe(run)), run.path / "figures")
    return result


def diagnosis_figures(result: Diagnosis, about: str | None = None) -> dict[str, Figure]:
    """The four figures of a diagnosis, by file stem (pairs and forest of the first image)."""
    rows = result.per_image
    first = rows[0]
    image = f"test image {first['image']}" + (f", label {first['label']}"
                                              if first["label"] is not None else "")
    index = [r["image"] for r in rows]
    return {
        "diagnostics_pairs": posterior_pairs(result.guide_draws[0], result.nuts_draws[0],
                                             image=image),
        "diagnostics_forest": forest(result.guide_draws[0], result.nuts_draws[0], image=image),
        "diagnostics_khat": khat_per_image([r["k_hat"] for r in rows], images=index,
                                           about=about),
        "diagnostics_gaps": inference_gap_bars([r["approximation_gap"] for r in rows],
                                               [r["amortization_gap"] for r in rows],
                                               images=index, about=about),
    }
