"""Everything the ``pyro-vae`` commands do, as Python functions of a run.

Each takes a :class:`~pyro_vae.runner.rundir.Run` or the path of a run folder, and does
what its command does -- results returned, files written where the command writes them::

    import pyro_vae

    run = pyro_vae.load_run("runs/quickstart")
    pyro_vae.evaluate(run, iwae_samples=500)      # the command: evaluate
    pyro_vae.write_figures(run)                   # plot
    pyro_vae.sample(run, 16, out="samples.png")   # sample
    pyro_vae.diagnose_run(run, images=2)          # diagnose
    pyro_vae.calibrate(run, simulations=1000)     # calibrate

``train`` is :func:`pyro_vae.train` itself. The command-line tool derives its options
from these signatures (defaults included), calls these functions, and only prints.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from . import seeds
from .calibration import Calibration, calibrate_model, check_sizes
from .data import binarize
from .diagnostics import Diagnosis, diagnose, estimate_seconds
from .errors import ConfigError, get_logger
from .estimators import correct, elbo_terms, fixed_noise, importance_log_likelihood
from .export import NUTS_DRAWS
from .files import check_writable, parse_json, read_bytes, refuse_link, write_atomic
from .latents import active_units
from .model import VAE
from .plots import (
    calibration_ecdf,
    describe,
    figures_for_run,
    forest,
    image_grid,
    inference_gap_bars,
    khat_per_image,
    png_bytes,
    posterior_pairs,
    save_figures,
)
from .progress import duration
from .runner.resolve import resolve_device
from .runner.rundir import Run, RunDir, load_run
from .tracking import TensorBoard

log = get_logger(__name__)

EVALUATIONS = "eval.json"
DIAGNOSTICS = "diagnostics.json"
CALIBRATION = "calibration.json"
SPLITS = ("test", "train")
MAX_DIAGNOSED_IMAGES = 100  # NUTS per image: past this, diagnose takes hours
MAX_SAMPLES = 10_000  # images in one sample grid (100 x 100; 2,800 pixels a side)


def as_run(run: Run | str | os.PathLike, device: str | torch.device = "cpu") -> Run:
    """``run`` itself, or the run loaded from the folder it names onto ``device``
    (``auto``: CUDA if available)."""
    if isinstance(run, Run):
        return run
    return load_run(run, device=resolve_device(str(device)))


def _check_counts(**counts) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{{{name}}} must be a positive integer, got {value!r}")


def evaluate_run(run: Run, split: str = "test", iwae_samples: int = 5000,
                 batch_size: int = 100, progress: bool | None = False) -> dict:
    """ELBO terms and importance-sampled ``log p(x)`` of a trained run on one split.

    Returns means over images (nats per image, higher is better) with their standard
    errors; bits per dimension where the likelihood is a probability mass function of the
    data it scores. Binarized data sets are binarized once with the run's fixed seed, so
    results repeat on every device. ``progress``: ``None`` -- a bar on a terminal, log
    lines elsewhere; ``False`` -- silent. :func:`evaluate` also keeps the result.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    _check_counts(iwae_samples=iwae_samples, batch_size=batch_size)
    vae, config = run.vae, run.config
    x, y = run.data.test_x, run.data.test_y
    if split == "train":
        x, y = run.data.train_x, run.data.train_y
        if config.data.binarize == "dynamic":
            x = binarize(x, seeds.train_eval_binarization(config.data.binarize_seed))
    start = time.perf_counter()
    terms = elbo_terms(vae, x, batch_size, seed=seeds.elbo_noise(config.train.seed))
    log_px = importance_log_likelihood(vae, x, iwae_samples, batch_size,
                                       seed=seeds.importance_noise(config.train.seed),
                                       progress=progress)
    n, lik = len(x), vae.likelihood
    result = {"split": split, "num_images": n, "iwae_samples": iwae_samples,
              "likelihood": lik.name, "normalized": lik.normalized, "epoch": run.epoch,
              "partial_step": run.partial_step}
    for name, values in [("elbo", terms.elbo), ("log_likelihood_term", terms.log_likelihood),
                         ("kl", terms.kl), ("log_px", log_px), ("gap", log_px - terms.elbo)]:
        result[name] = values.mean().item()
        result[f"{name}_se"] = (values.std() / math.sqrt(n)).item() if n > 1 else math.nan
    # bits/dim is the usual figure for a probability mass function on binary pixels; a
    # density of 8-bit pixels is not one without dequantization, so none is given then
    result["bits_per_dim"] = (-result["log_px"] / (vae.x_dim * math.log(2))
                              if lik.binary else None)
    if callable(getattr(vae, "posterior", None)):  # q(z | x) in one: active units
        with fixed_noise(seeds.importance_noise(config.train.seed), x.device):
            result["active_units"] = active_units(vae, x)
    if hasattr(vae, "classify"):  # a model with classes: how often argmax q(y | x) is right
        result["accuracy"] = correct(vae, x, y.to(x.device), batch_size).item() / n
    result["seconds"] = time.perf_counter() - start
    return result


def evaluation_table(r: dict) -> str:
    """An :func:`evaluate_run` result as the lines ``pyro-vae evaluate`` prints."""
    partial = f", then {r['partial_step']} steps more" if r["partial_step"] else ""
    lines = [f"(epoch {r['epoch']}{partial}, {r['likelihood']}), {r['split']} split, "
             f"{r['num_images']} images, nats per image:"]
    for name, key in [("ELBO", "elbo"), ("  E_q log p(x|z)", "log_likelihood_term"),
                      ("  KL(q || p)", "kl"), (f"log p(x), K={r['iwae_samples']}", "log_px"),
                      ("log p(x) - ELBO", "gap")]:
        lines.append(f"  {name:18s} {r[key]:10.2f}  +- {r[key + '_se']:.2f}")
    if r.get("active_units") is not None:
        lines.append(f"  {'active units':18s} {r['active_units']:10d}  (Cov_x E_q[z] > 0.01)")
    if r["bits_per_dim"] is not None:
        lines.append(f"  {'bits/dim':18s} {r['bits_per_dim']:10.4f}")
    if r.get("accuracy") is not None:
        lines.append(f"  {'accuracy':18s} {r['accuracy']:10.4f}  (argmax q(y | x))")
    if not r["normalized"]:
        lines.append("  note: this likelihood is not normalized; these are not log-likelihoods")
    return "\n".join(lines)


def evaluate(run: Run | str | os.PathLike, split: str = "test", iwae_samples: int = 5000,
             batch_size: int = 100, *, device: str = "auto", write: bool = True,
             progress: bool | None = False) -> dict:
    """:func:`evaluate_run` of a run (or its folder, loaded onto ``device``).

    With ``write`` the result is kept in ``RUN_DIR/eval.json`` under its split and ``K``
    (:func:`read_evaluations`), beside earlier ones: a quick ``K = 1`` check never replaces
    a ``K = 5000`` result. Runs trained with TensorBoard also get the numbers there.
    """
    run = as_run(run, device)
    outputs = RunDir(run.path) if write and run.path is not None else None
    if outputs is not None:  # before the work: its result must have a place to go
        outputs.check_output(EVALUATIONS)
        _evaluations(outputs.path / EVALUATIONS, warn=True)
    result = evaluate_run(run, split, iwae_samples, batch_size, progress=progress)
    if outputs is not None:
        with outputs.outputs_lock():  # concurrent evaluations: one merge at a time
            results = _evaluations(outputs.path / EVALUATIONS, keep_damaged=True)
            results.setdefault(split, {})[str(iwae_samples)] = result
            outputs.write(EVALUATIONS, _json(results))
        if run.config.train.tensorboard:
            board = TensorBoard(run.path)
            board.evaluation(result)
            board.close()
    return result


def read_evaluations(run: Run | str | os.PathLike) -> dict[str, dict[str, dict]]:
    """The evaluations kept in ``RUN_DIR/eval.json``: ``{split: {K: result}}``.

    A file written before results were keyed (one flat result) is read into this form; an
    unreadable or malformed one reads as empty, with a warning (:func:`evaluate` keeps it
    as ``eval.json.damaged`` before writing a new one, so nothing is lost).
    """
    return _evaluations(_folder(run) / EVALUATIONS, warn=True)


def _folder(run: Run | str | os.PathLike) -> Path:
    return Path(run.path if isinstance(run, Run) else run)


def _evaluations(path: Path, keep_damaged: bool = False, warn: bool = False
                 ) -> dict[str, dict[str, dict]]:
    if not path.is_file() and not path.is_symlink():
        return {}
    try:
        data = parse_json(read_bytes(path))
        if isinstance(data, dict) and "split" in data and "iwae_samples" in data:
            data = {data["split"]: {str(data["iwae_samples"]): data}}  # one flat result
        _check_evaluations(data)
    except ValueError as e:
        if keep_damaged:
            kept = path.with_name(EVALUATIONS + ".damaged")
            os.replace(path, kept)
            log.warning("%s was damaged (%s); kept as %s", path, e, kept)
        elif warn:
            log.warning("%s is damaged (%s); read as empty, and kept as %s.damaged when a "
                        "new result is written", path, e, EVALUATIONS)
        return {}
    return data


def _check_evaluations(data) -> None:
    """Raise ``ValueError`` naming the first entry that is not ``{split: {K: result}}``."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    for split, by_k in data.items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        if not isinstance(by_k, dict):
            raise ValueError(f"{split} is not an object of results by K")
        for k, result in by_k.items():
            if not k.isdigit() or not isinstance(result, dict):
                raise ValueError(f"{split}.{k} is not a result under its K")
            if not isinstance(result.get("log_px"), (int, float, type(None))):
                raise ValueError(f"{split}.{k}.log_px is not a number")


def _json(data) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"


def write_figures(run: Run | str | os.PathLike, kinds=None, folder: str | Path | None = None,
                  *, device: str = "auto") -> list[Path]:
    """Write the run's figures (or the ``kinds`` named) as PNGs to ``RUN_DIR/figures`` (or
    ``folder``); returns their paths. :func:`pyro_vae.plots.figures_for_run` returns the
    figures themselves, for a notebook."""
    run = as_run(run, device)
    root = folder
    if folder is None:
        if run.path is None:
            raise ConfigError("this run was trained in memory; give a folder for its figures")
        folder, root = run.path / "figures", run.path
    check_writable(folder, root, no_links=folder != root)  # before the work; in the run's
    # own figures folder no link is left alone
    return save_figures(figures_for_run(run, kinds), folder, root=root)


def sample(run: Run | str | os.PathLike, num_samples: int = 64, *, draws: bool = False,
           seed: int = 0, out: str | Path | None = None, device: str = "auto") -> Figure:
    """A grid of ``num_samples`` images from the prior: the likelihood's mean of
    ``p(x | z)``, or draws ``x ~ p(x | z)`` with ``draws``; saved to ``out`` (a .png) if
    given. The same ``seed`` gives the same images."""
    _check_counts(num_samples=num_samples)
    if num_samples > MAX_SAMPLES:
        raise ConfigError(f"{{num_samples}} is {num_samples}, but one grid shows at most "
                          f"{MAX_SAMPLES} images; ask for fewer")
    if out is not None:
        if Path(out).suffix.lower() != ".png":
            raise ConfigError(f"the output must name a .png file, got {out}")
        refuse_link(out)
        check_writable(Path(out).parent)
    run = as_run(run, device)
    with fixed_noise(seed, run.device), torch.no_grad():  # a user's model may not say it
        d = run.vae.sample_prior(num_samples)
        if draws:
            try:
                images, what = d.sample(), "draws x ~ p(x | z)"
            except NotImplementedError as e:
                raise ConfigError(f"{e}; sample the mean instead (without {{draws}})") from None
        else:
            images, what = d.mean, "mean of p(x | z)"
    fig = image_grid(images.cpu(), title=f"{num_samples} prior samples, {what} -- {describe(run)}")
    if out is not None:  # the name as given (s.PNG stays s.PNG), written atomically
        write_atomic(out, png_bytes(fig, 110))
    return fig


def diagnose_run(run: Run | str | os.PathLike, images: int = 4, num_samples: int = 500,
                 warmup: int = 500, chains: int = 2, iwae_samples: int = 5000, seed: int = 0,
                 *, device: str = "cpu", write: bool = True, progress: bool | None = False
                 ) -> Diagnosis:
    """Posterior diagnostics of the first ``images`` test images (:func:`diagnose`).

    Logs the expected time first (a short timed NUTS pilot); asks for at most
    :data:`MAX_DIAGNOSED_IMAGES` images and never more than the test set holds (a request
    beyond that is capped, with a warning). With ``write``: ``RUN_DIR/diagnostics.json``,
    the NUTS draws (``RUN_DIR/diagnostics_draws.npz``, plain arrays that
    :func:`pyro_vae.export.to_inference_data` reads) and four figures
    ``RUN_DIR/figures/diagnostics_*.png``.
    """
    _check_counts(images=images, num_samples=num_samples, warmup=warmup, chains=chains,
                  iwae_samples=iwae_samples)
    if chains < 2:
        log.warning("R-hat needs at least 2 chains; it is reported as NaN")
    run = as_run(run, device)
    if getattr(run.vae, "enumerated", False):
        raise ConfigError(f"diagnose compares the guide with NUTS, which cannot sample the "
                          f"discrete latent of model '{run.config.model.name}'; evaluate "
                          "and plot apply to it")
    if not isinstance(run.vae, VAE) or run.vae.stochastic_layers != 1:
        layers = getattr(run.vae, "stochastic_layers", None)
        kind = f"{layers} stochastic layers" if layers else type(run.vae).__name__
        raise ConfigError("diagnose compares the Gaussian guide of the vae model with one "
                          f"latent layer against NUTS; model '{run.config.model.name}' "
                          f"({kind}) is not one; evaluate and plot apply to it")
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
        outputs = RunDir(run.path)
        draws = io.BytesIO()  # for ArviZ export (pyro_vae.export): plain arrays, no pickle
        np.savez(draws, z=result.nuts_draws, diverging=result.nuts_diverging)
        with outputs.outputs_lock():
            outputs.write(DIAGNOSTICS, _json({"images": result.per_image,
                                              "settings": settings}))
            outputs.write(NUTS_DRAWS, draws.getvalue())
        save_figures(diagnosis_figures(result, about=describe(run)), run.path / "figures",
                     root=run.path)
    return result


def calibrate(run: Run | str | os.PathLike, simulations: int = 1000, draws: int = 100,
              seed: int = 0, *, device: str = "auto", write: bool = True,
              progress: bool | None = False) -> Calibration:
    """Simulation-based calibration of a run's guide (:mod:`pyro_vae.calibration`); the
    run's test images give the aggregate posterior on data. With ``write``:
    ``RUN_DIR/calibration.json`` and ``RUN_DIR/figures/calibration.png``."""
    check_sizes(simulations, draws)  # before the run loads
    run = as_run(run, device)
    outputs = RunDir(run.path) if write and run.path is not None else None
    if outputs is not None:  # before the work: its result must have a place to go
        outputs.check_output(CALIBRATION)
        check_writable(run.path / "figures", run.path, no_links=True)
    result = calibrate_model(run.vae, simulations, draws, seed,
                             data=run.data.test_x[:simulations], progress=progress)
    if outputs is not None:
        settings = {"simulations": simulations, "draws": draws, "seed": seed,
                    "epoch": run.epoch}
        with outputs.outputs_lock():
            outputs.write(CALIBRATION, _json({**result.to_dict(), "settings": settings}))
        save_figures({"calibration": calibration_ecdf(result, about=describe(run))},
                     run.path / "figures", root=run.path)
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
