"""The ``pyro-vae`` command: parses arguments, calls the library, reports.

This is the only module that reads ``sys.argv`` or prints for people. Errors the user can
fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import sys
from pathlib import Path

import torch

from . import __version__
from .commands import (
    MAX_DIAGNOSED_IMAGES,
    diagnose_run,
    evaluate,
    sample,
    write_figures,
)
from .config import (
    BINARIZE_MODES,
    DEVICES,
    ELBOS,
    LR_SCHEDULES,
    NAN_POLICIES,
    OBJECTIVES,
    RunConfig,
)
from .data import DATASETS
from .errors import ConfigError, PyroVAEError, TrainingDiverged
from .likelihoods import available_likelihoods, describe_support, get_likelihood
from .networks import available_networks
from .plots import FIGURE_KINDS
from .runner.resolve import resolve_device
from .runner.rundir import load_run
from .runner.train import train, train_summary

# exit statuses: 2 bad input, 3 training diverged, 4 out of memory or disk space,
# 1 an internal error (a bug: PYRO_VAE_DEBUG=1 shows its traceback), 130 interrupted
EXIT_INTERNAL, EXIT_USAGE, EXIT_DIVERGED, EXIT_RESOURCE, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error that points at --help instead of the usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _hidden_dims(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 400 or 512,256, got {text!r}"
        ) from None


def _option(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep or not key:
            raise ValueError
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=NUMBER such as scale=0.05, got {text!r}"
                                         ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyro-vae",
        description="Variational autoencoders as Pyro model/guide functions, trained with SVI.",
        epilog="pyro-vae COMMAND --help describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"pyro-vae {__version__}")
    # every command can load the user's own likelihoods (and networks) first
    plugins = argparse.ArgumentParser(add_help=False)
    plugins.add_argument("--import", dest="imports", action="append", default=[],
                         metavar="MODULE",
                         help="import MODULE first, e.g. one that registers your own "
                              "likelihood (repeatable; the current folder is searched)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    t = sub.add_parser("train", help="train a VAE and write a run folder", parents=[plugins],
                       description="Train a VAE with SVI and write a run folder "
                                   "(config.json, metrics.jsonl, checkpoint.pt, figures/).")
    t.add_argument("--config", type=Path, metavar="FILE.json",
                   help="start from the settings in FILE.json (the schema of a run's "
                        "config.json); flags given as well override it")
    where = t.add_argument_group("run folder")
    where.add_argument("--out", type=Path, help="run folder to create (default: runs/quickstart)")
    where.add_argument("--resume", type=Path, metavar="RUN_DIR",
                       help="continue this run from its checkpoint (with --epochs: up to N)")
    where.add_argument("--force", action="store_true",
                       help="replace a run that --out already holds")
    d = t.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, help="default: auto (MNIST, else mnist-sample)")
    d.add_argument("--data-dir", help="folder with the IDX files (flat or torchvision layout)")
    d.add_argument("--binarize", choices=BINARIZE_MODES,
                   help="default: dynamic for bernoulli, none otherwise")
    d.add_argument("--train-limit", type=int, metavar="N", help="use the first N training images")
    d.add_argument("--test-limit", type=int, metavar="N", help="use the first N test images")
    d.add_argument("--no-download", dest="download", action="store_false", default=None,
                   help="never try to download a data set")
    m = t.add_argument_group("model")
    m.add_argument("--likelihood", help=f"one of {', '.join(available_likelihoods())} "
                                        "(default: bernoulli)")
    m.add_argument("--likelihood-option", type=_option, action="append", metavar="KEY=VALUE",
                   help="likelihood setting, e.g. scale=0.05 for normal-fixed (repeatable)")
    m.add_argument("--z-dim", type=int, help="latent dimensions (default: 20)")
    m.add_argument("--hidden-dims", type=_hidden_dims, help="hidden sizes, e.g. 400 or 512,256")
    m.add_argument("--activation", help="relu (default), softplus, tanh or elu")
    m.add_argument("--network", help=f"encoder and decoder: one of "
                                     f"{', '.join(available_networks())} (default: mlp)")
    m.add_argument("--stochastic-layers", type=int, choices=(1, 2),
                   help="2: z2 -> z1 -> x, as Burda et al. (default: 1)")
    m.add_argument("--z1-dim", type=int, help="two layers: size of z1 (default: 100)")
    m.add_argument("--top-hidden-dims", type=_hidden_dims,
                   help="two layers: hidden sizes between z1 and z2 (default: 50,50)")
    o = t.add_argument_group("optimization")
    o.add_argument("--epochs", type=int, help="total epochs (default: 10)")
    o.add_argument("--batch-size", type=int, help="default: 128")
    o.add_argument("--lr", type=float, help="Adam learning rate (default: 1e-3)")
    o.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                   help="constant (default) or burda: --lr * 10^(-i/7) for 3^i epochs, "
                        "i = 0..7 (Burda et al., 3,280 epochs)")
    o.add_argument("--adam-eps", type=float, help="Adam's epsilon (default: 1e-8)")
    o.add_argument("--elbo", choices=ELBOS,
                   help="trace (Trace_ELBO, default) or meanfield (analytic KL)")
    o.add_argument("--num-particles", type=int,
                   help="ELBO particles, vectorized; K of --objective iwae (default: 1)")
    o.add_argument("--objective", choices=OBJECTIVES,
                   help="elbo (default) or iwae: the importance-weighted bound of Burda et al. "
                        "with K = --num-particles samples per image")
    o.add_argument("--dreg", action="store_true", default=None,
                   help="with --objective iwae: doubly reparameterized gradients "
                        "(Tucker et al., 2019)")
    o.add_argument("--kl-warmup", type=int, metavar="EPOCHS",
                   help="raise the KL weight linearly over EPOCHS epochs (default: 0, none)")
    o.add_argument("--beta", type=float, help="weight of the KL term (default: 1)")
    o.add_argument("--no-fast-step", dest="fast_step", action="store_false", default=None,
                   help="run every step eagerly through Pyro instead of replaying it as a "
                        "traced graph (CPU) or a CUDA graph (CUDA)")
    o.add_argument("--seed", type=int, help="default: 0")
    o.add_argument("--device", choices=DEVICES, help="default: auto (CUDA if available)")
    o.add_argument("--nan-policy", choices=NAN_POLICIES,
                   help="on a non-finite loss: stop (default, keeps the last good epoch) "
                        "or skip the step and count it")
    o.add_argument("--tensorboard", action="store_true", default=None,
                   help="also write TensorBoard events (scalars, images, histograms) to "
                        "RUN_DIR/tensorboard/")
    t.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="test ELBO and importance-sampled log-likelihood",
                       parents=[plugins],
                       description="ELBO with its terms and the importance-sampled log p(x) "
                                   "of a run; kept in RUN_DIR/eval.json by split and K.")
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    e.add_argument("--split", choices=("test", "train"), default="test",
                   help="the images to evaluate (default: test)")
    e.add_argument("--iwae-samples", type=int, default=5000, metavar="K",
                   help="importance samples per image (default: 5000, as Burda et al.)")
    e.add_argument("--batch-size", type=int, default=100, help="images per batch (default: 100)")
    e.add_argument("--device", choices=DEVICES, default="auto",
                   help="default: auto (CUDA if available)")
    e.add_argument("--quiet", action="store_true", help="no progress, results only")
    e.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", help="write the figures of a run to RUN_DIR/figures/",
                       parents=[plugins],
                       description="Reconstructions, prior samples, training curves, latent "
                                   "space, latent traversals and interpolations (and the "
                                   "latent manifold when z is 2-D), as PNGs in "
                                   "RUN_DIR/figures/.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--only", choices=FIGURE_KINDS, action="append", metavar="KIND",
                   help=f"write only this figure (repeatable): {', '.join(FIGURE_KINDS)}")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="default: auto (CUDA if available)")
    p.set_defaults(func=cmd_plot)

    s = sub.add_parser("sample", help="draw images from the prior of a trained run",
                       parents=[plugins],
                       description="Decode N draws z ~ N(0, I) of a trained run and write "
                                   "the images as one PNG grid.")
    s.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    s.add_argument("-n", "--num-samples", type=int, default=64,
                   help="how many images (default: 64)")
    s.add_argument("--out", type=Path, required=True, metavar="FILE.png",
                   help="the PNG file to write")
    s.add_argument("--draws", action="store_true",
                   help="show draws x ~ p(x | z) instead of the likelihood's mean")
    s.add_argument("--seed", type=int, default=0,
                   help="the same seed gives the same images (default: 0)")
    s.add_argument("--device", choices=DEVICES, default="auto",
                   help="default: auto (CUDA if available)")
    s.set_defaults(func=cmd_sample)

    g = sub.add_parser("diagnose", help="guide against NUTS, PSIS k-hat, inference gaps",
                       parents=[plugins],
                       description="Posterior diagnostics for the first test images; writes "
                                   "RUN_DIR/diagnostics.json and RUN_DIR/figures/diagnostics_*. "
                                   "Prints its expected time first: NUTS runs per image.")
    g.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    g.add_argument("--images", type=int, default=4,
                   help=f"test images to diagnose (default: 4, at most "
                        f"{MAX_DIAGNOSED_IMAGES})")
    g.add_argument("--num-samples", type=int, default=500,
                   help="draws per NUTS chain and from the guide (default: 500)")
    g.add_argument("--warmup", type=int, default=500, help="NUTS warm-up steps (default: 500)")
    g.add_argument("--chains", type=int, default=2, help="NUTS chains (default: 2)")
    g.add_argument("--iwae-samples", type=int, default=5000, metavar="K",
                   help="importance samples for log p(x) per image (default: 5000)")
    g.add_argument("--seed", type=int, default=0, help="default: 0")
    g.add_argument("--device", choices=DEVICES, default="cpu",
                   help="default: cpu (NUTS on one image is faster there than on a GPU)")
    g.add_argument("--quiet", action="store_true", help="no progress, results only")
    g.set_defaults(func=cmd_diagnose)

    ls = sub.add_parser("likelihoods", help="list the registered likelihoods",
                        parents=[plugins],
                        description="Every registered likelihood: decoder outputs per pixel, "
                                    "the values it scores, whether it is normalized, and its "
                                    "options (--likelihood-option KEY=VALUE).")
    ls.set_defaults(func=cmd_likelihoods)
    return parser


_FIELDS = {
    "data": ["dataset", "data_dir", "binarize", "train_limit", "test_limit", "download"],
    "model": ["likelihood", "z_dim", "hidden_dims", "activation", "network",
              "stochastic_layers", "z1_dim", "top_hidden_dims"],
    "train": ["epochs", "batch_size", "lr", "lr_schedule", "adam_eps", "elbo", "num_particles",
              "objective", "dreg", "kl_warmup", "beta", "fast_step", "seed", "device",
              "nan_policy", "tensorboard"],
}
# config fields whose flag is not simply --field-name
_FLAGS = {"likelihood_options": "--likelihood-option", "download": "--no-download",
          "fast_step": "--no-fast-step"}
_FIELD = re.compile(r"\b(?:Model|Data|Train)Config\.(\w+)(?: = '([^']*)')?")


def _flag(field: str) -> str:
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def for_cli(message: str) -> str:
    """A library message with its Python names (``TrainConfig.lr``, ``force=True``)
    rewritten into this tool's flags (``--lr``, ``--force``)."""
    message = _FIELD.sub(lambda m: _flag(m[1]) + (f" {m[2]}" if m[2] else ""), message)
    message = re.sub(r"\bresume=", "--resume ", message)
    message = message.replace("force=True", "--force").replace(" out folder", " --out")
    message = message.replace("then import it before loading the run", "then --import it")
    message = re.sub(r"\bimport ([\w.]+) before loading the run", r"pass --import \1", message)
    message = re.sub(r"or register your own with register_(\w+)",
                     r"or register your own \1 in a module and --import it", message)
    return message


def read_config_file(path: Path) -> RunConfig:
    try:
        return RunConfig.read(path)
    except ConfigError as e:
        raise ConfigError(f"--config {e}") from None


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The settings of ``--config`` (else the defaults), overridden by the flags given."""
    config = read_config_file(args.config) if args.config is not None else RunConfig()
    for section, names in _FIELDS.items():
        for name in names:
            value = getattr(args, name)
            if value is not None:
                setattr(getattr(config, section), name, value)
    if args.likelihood_option:
        config.model.likelihood_options = dict(args.likelihood_option)
    return config


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume is not None:
        given = [f"--{n.replace('_', '-')}" for names in _FIELDS.values() for n in names
                 if n != "epochs" and getattr(args, n) is not None]
        given += ["--likelihood-option"] if args.likelihood_option else []
        given += ["--out"] if args.out is not None else []
        given += ["--config"] if args.config is not None else []
        if given:
            raise ConfigError(f"--resume continues a run with its own settings; drop "
                              f"{', '.join(given)} (only --epochs applies)")
        run = train(resume=args.resume, epochs=args.epochs, progress=_progress(args))
    else:
        out = args.out if args.out is not None else Path("runs/quickstart")
        run = train(config_from_args(args), out, force=args.force, progress=_progress(args))
    if _rank() > 0:  # under torchrun, rank 0 reports and writes the figures
        return EXIT_INTERRUPTED if run.interrupted else 0
    if run.interrupted:
        print(f"interrupted after epoch {run.epoch}; continue with: "
              f"pyro-vae train --resume {run.path}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if run.metrics:
        last = run.metrics[-1]
        print(f"epoch {last['epoch']}: {train_summary(last)}, "
              f"test ELBO {last['test_elbo']:.2f} nats/image "
              f"(log-likelihood term {last['test_log_likelihood']:.2f}, KL {last['test_kl']:.2f})")
    if run.path is not None:
        figures = _figures(run, ("reconstructions", "samples"))
        print("figures: " + ", ".join(str(f) for f in figures))
    print(f"run folder: {run.path}")
    return 0


def _figures(run, kinds=None) -> list[Path]:
    return write_figures(run, kinds)


def _load(args):
    return load_run(args.run_dir, device=resolve_device(getattr(args, "device", "cpu")))


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.iwae_samples < 1 or args.batch_size < 1:
        raise ConfigError("--iwae-samples and --batch-size must be positive integers")
    run = _load(args)
    result = evaluate(run, args.split, args.iwae_samples, args.batch_size,
                      progress=False if args.quiet else None)
    k = result["iwae_samples"]
    rows = [("ELBO", result["elbo"], result["elbo_se"]),
            ("  E_q log p(x|z)", result["log_likelihood_term"], result["log_likelihood_term_se"]),
            ("  KL(q || p)", result["kl"], result["kl_se"]),
            (f"log p(x), K={k}", result["log_px"], result["log_px_se"]),
            ("log p(x) - ELBO", result["gap"], result["gap_se"])]
    epoch = f"epoch {run.epoch}" + (f", then {run.partial_step} steps of epoch {run.epoch + 1}"
                                     if run.partial_step else "")
    print(f"{run.path} ({epoch}, {result['likelihood']}), {args.split} split, "
          f"{result['num_images']} images, nats per image:")
    for name, value, se in rows:
        print(f"  {name:18s} {value:10.2f}  +- {se:.2f}")
    if result["bits_per_dim"] is not None:
        print(f"  {'bits/dim':18s} {result['bits_per_dim']:10.4f}")
    if not result["normalized"]:
        print("  note: this likelihood is not normalized; these are not log-likelihoods")
    print(f"kept in {run.path / 'eval.json'} under {args.split}, K={k} "
          f"({result['seconds']:.1f} s)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    for path in _figures(_load(args), args.only):
        print(path)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if args.num_samples < 1:
        raise ConfigError("-n must be a positive integer")
    if args.out.suffix.lower() != ".png":
        raise ConfigError(f"--out must name a .png file, got {args.out}")
    try:
        sample(_load(args), args.num_samples, draws=args.draws, seed=args.seed, out=args.out)
    except ConfigError as e:
        raise ConfigError(str(e).replace("(draws=False)", "(drop --draws)")) from None
    print(args.out)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    for name in ("images", "num_samples", "warmup", "chains", "iwae_samples"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.chains < 2:
        print("pyro-vae: note: R-hat needs at least 2 chains; it is reported as NaN",
              file=sys.stderr)
    run = _load(args)
    result = diagnose_run(run, args.images, args.num_samples, args.warmup, args.chains,
                          args.iwae_samples, args.seed, progress=False if args.quiet else None)
    rows = result.per_image
    print(f"{'image':>5} {'label':>5} {'R-hat':>6} {'ESS bulk':>8} {'div':>4} {'k-hat':>6} "
          f"{'log p(x)':>9} {'approx gap':>10} {'amort gap':>9}")
    for r in rows:
        print(f"{r['image']:>5} {r['label']:>5} {r['rhat_max']:6.3f} {r['ess_bulk_min']:8.0f} "
              f"{r['divergences']:>4} {r['k_hat']:6.2f} {r['log_px']:9.2f} "
              f"{r['approximation_gap']:10.2f} {r['amortization_gap']:9.2f}")
    print(f"wrote {run.path / 'diagnostics.json'} and 4 figures in "
          f"{run.path / 'figures'} (diagnostics_*.png)")
    return 0


def cmd_likelihoods(args: argparse.Namespace) -> int:
    for name in available_likelihoods():
        lik = get_likelihood(name)
        options = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k} (required)"
                            for k, v in lik.options().items()) or "none"
        print(f"{name}\n  {_plain(lik.description)}\n"
              f"  {lik.num_params} decoder output(s) per pixel; scores "
              f"{describe_support(lik.support)}; "
              f"{'normalized' if lik.normalized else 'NOT normalized (not a likelihood)'}"
              f"{'; binary pixels only' if lik.binary else ''}\n  options: {options}")
    return 0


def _plain(text: str) -> str:
    """A docstring's first line without reStructuredText markup (``x`` -> x)."""
    return re.sub(r"``([^`]*)``", r"\1", text)


def _import_plugins(modules: list[str]) -> None:
    """Import each ``--import`` module (from the current folder too, as ``python -m``)."""
    if modules and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise ConfigError(f"--import {name}: no module named {e.name!r} (put {name}.py in "
                              "the current folder or on PYTHONPATH)") from None
        except PyroVAEError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's module failed: say how, in one line
            text = " ".join(str(e).split())[:200]
            raise ConfigError(f"--import {name} failed: {type(e).__name__}: {text}") from None


def _progress(args) -> bool | None:
    return False if args.quiet else None


class _FlagFormatter(logging.Formatter):
    """Log lines with the library's field names rewritten into this tool's flags."""

    def format(self, record):
        return for_cli(super().format(record))


def _log_to_stderr(level: int) -> None:
    """Send the library's log records to stderr as ``pyro-vae: message`` lines."""
    logger = logging.getLogger("pyro_vae")
    for handler in [h for h in logger.handlers if getattr(h, "_pyro_vae_cli", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_FlagFormatter("pyro-vae: %(message)s"))
    handler._pyro_vae_cli = True
    logger.addHandler(handler)
    logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # under torchrun only rank 0 reports progress; every rank still reports errors
    quiet = getattr(args, "quiet", False) or _rank() > 0
    _log_to_stderr(logging.WARNING if quiet else logging.INFO)
    try:
        _import_plugins(getattr(args, "imports", []))
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - every failure leaves as one line
        if os.environ.get("PYRO_VAE_DEBUG"):
            raise
        code, message = _failure(e)
        print(f"pyro-vae: error: {message}", file=sys.stderr)
        return code
    except KeyboardInterrupt:  # a second Ctrl-C: abort at once (the last checkpoint stands)
        print("pyro-vae: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _failure(e: Exception) -> tuple[int, str]:
    """The exit status and one-line message for an exception that left a command."""
    if isinstance(e, TrainingDiverged):
        return EXIT_DIVERGED, for_cli(str(e))
    if isinstance(e, PyroVAEError):
        return EXIT_USAGE, for_cli(str(e))
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return EXIT_RESOURCE, ("out of memory; lower --batch-size (train) or --batch-size / "
                               "--iwae-samples (evaluate), and --resume an interrupted run")
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        reason = e.strerror or str(e) or type(e).__name__
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return EXIT_RESOURCE, (f"{reason}{where}; free some space, then --resume: the "
                                   "last checkpoint is intact")
        return EXIT_USAGE, f"{reason}{where}; check the path and its permissions"
    text = " ".join(str(e).split())[:200]
    return EXIT_INTERNAL, (f"internal error ({type(e).__name__}: {text}); please report it, "
                           "with the traceback that PYRO_VAE_DEBUG=1 shows")


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)
