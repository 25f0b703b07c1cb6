"""The ``pyro-vae`` command: parses arguments, calls the library, reports; the only module
that reads ``sys.argv`` or prints. Nothing here declares a setting: ``train``'s flags come
from the fields of :mod:`pyro_vae.config`, the other commands' options from the signatures
in :mod:`pyro_vae.commands`, and library messages' setting tokens are spelled as flags by
:func:`flag_name`. Errors the user can fix print one line and exit with status 2."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import inspect
import logging
import os
import sys
from pathlib import Path

import torch

from . import __version__, config
from .commands import (
    SPLITS,
    calibrate,
    diagnose_run,
    evaluate,
    evaluation_table,
    sample,
    write_figures,
)
from .config import RunConfig
from .errors import ConfigError, PyroVAEError, TrainingDiverged, naming
from .likelihoods import available_likelihoods, get_likelihood
from .models import available_models, get_model
from .plots import FIGURE_KINDS, figure_kinds
from .registry import import_modules
from .runner.train import train, train_summary

# exit statuses: 2 bad input, 3 training diverged, 4 out of memory or disk space,
# 1 an internal error (a bug: PYRO_VAE_DEBUG=1 shows its traceback), 130 interrupted
EXIT_INTERNAL, EXIT_USAGE, EXIT_DIVERGED, EXIT_RESOURCE, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
_ARGUMENTS = {"resume": "--resume {}", "import": "--import {}"}


class _Parser(argparse.ArgumentParser):  # one error line that points at --help
    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def flag_name(setting: str, value: str | None = None) -> str:
    """How this tool spells a setting token (:mod:`pyro_vae.errors`): ``--lr``,
    ``--objective iwae``, ``--no-fast-step``, ``--force``."""
    if "." not in setting:
        spelled = _ARGUMENTS.get(setting, "--" + setting.replace("_", "-"))
        return spelled.format(value) if "{}" in spelled else \
            spelled + (f" {value}" if value is not None else "")
    section, name = setting.split(".")
    f, hint = next((f, h) for f, h in config.fields(section) if f.name == name)
    flag = "--" + (f.metadata["flag"] or f.name.replace("_", "-"))
    if value is None or config.base_type(hint) is dict:
        return flag
    if config.base_type(hint) is bool:
        negated = flag.startswith("--no-")
        return flag if (value == "True") != negated else f"without {flag}"
    return f"{flag} {value}"


def _ints(text: str) -> tuple[int, ...]:
    with contextlib.suppress(ValueError):
        return tuple(int(part) for part in text.split(",") if part.strip())
    raise argparse.ArgumentTypeError(
        f"expected comma-separated integers such as 400 or 512,256, got {text!r}")


def _key_value(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    with contextlib.suppress(ValueError):
        if sep and key.strip():
            return key.strip(), float(value)
    raise argparse.ArgumentTypeError(f"expected KEY=NUMBER such as scale=0.05, got {text!r}")


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """One flag per field of :class:`RunConfig` with ``cli`` metadata, grouped by section."""
    for section, title in (("data", "data"), ("model", "model"), ("train", "optimization")):
        group = parser.add_argument_group(title)
        for f, hint in [(f, h) for f, h in config.fields(section) if f.metadata["cli"]]:
            meta = f.metadata
            base, allowed = config.base_type(hint), config.choices(hint)
            help = meta["help"]
            kwargs = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS}
            if base is bool:
                kwargs["action"] = "store_false" if meta["flag"] else "store_true"
            else:
                if f.default is not None and f.default is not dataclasses.MISSING:
                    shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) \
                        else f.default
                    help += f" (default: {shown})"
                kwargs["metavar"] = meta["metavar"] or f.name.upper()
                if allowed:
                    kwargs.update(choices=allowed, type=type(allowed[0]), metavar=None)
                elif getattr(base, "__origin__", None) is tuple:
                    kwargs["type"] = _ints
                elif getattr(base, "__origin__", None) is dict:
                    kwargs.update(type=_key_value, action="append")
                else:
                    kwargs["type"] = base
            group.add_argument(flag_name(f"{section}.{f.name}"),
                               help=help.replace("%", "%%"), **kwargs)


def _add_options(parser: argparse.ArgumentParser, func, options: dict) -> None:
    """Options for ``func``'s parameters, its defaults: ``{name: help or (help, kwargs)}``."""
    params = inspect.signature(func).parameters
    for name, spec in options.items():
        help, extra = spec if isinstance(spec, tuple) else (spec, {})
        extra = dict(extra)
        flags = extra.pop("flags", None) or [flag_name(name)]
        default = params[name].default
        kwargs = {"default": default, **extra}
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        elif default is not None:
            kwargs.setdefault("type", type(default))
            help += f" (default: {default})"
        parser.add_argument(*flags, dest=name, help=help, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyro-vae", epilog="pyro-vae COMMAND --help describes each command.",
                     description="Variational autoencoders as Pyro model/guide functions, "
                                 "trained with SVI.")
    parser.add_argument("--version", action="version", version=f"pyro-vae {__version__}")
    plugins = argparse.ArgumentParser(add_help=False)
    plugins.add_argument("--import", dest="imports", action="append", default=[],
                         metavar="MODULE", help="import MODULE first, e.g. one that registers "
                         "your own likelihood (repeatable; the current folder is searched)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    def command(name, func, help, description):
        p = sub.add_parser(name, help=help, description=description, parents=[plugins])
        p.set_defaults(func=func)
        if name not in _LISTINGS:
            p.add_argument("--quiet", action="store_true", help="no progress, results only")
        if name not in ("train", *_LISTINGS):
            p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
        return p

    t = command("train", cmd_train, "train a VAE and write a run folder",
                "Train a VAE with SVI and write a run folder.")
    t.add_argument("--config", type=Path, metavar="FILE.json", help="start from the settings "
                   "in FILE.json (the schema of config.json); flags given as well override it")
    t.add_argument("--out", type=Path, help="run folder to create (default: runs/quickstart)")
    t.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue this run from its checkpoint (with --epochs: up to N)")
    t.add_argument("--force", action="store_true", help="replace a run that --out holds")
    _add_settings(t)
    device = ("the device", {"choices": config.DEVICES})
    e = command("evaluate", cmd_evaluate, "test ELBO and importance-sampled log-likelihood",
                "ELBO terms and log p(x) of a run, kept in RUN_DIR/eval.json by split and K.")
    _add_options(e, evaluate, {"split": ("the images to evaluate", {"choices": SPLITS}),
                               "iwae_samples": ("importance samples per image",
                                                {"metavar": "K"}),
                               "batch_size": "images per batch", "device": device})
    p = command("plot", cmd_plot, "write the figures of a run to RUN_DIR/figures/",
                "The figures of a run as PNGs in RUN_DIR/figures/.")
    kinds = ", ".join(FIGURE_KINDS)
    _add_options(p, write_figures, {"kinds": (f"write only this figure (repeatable): {kinds}", {
        "flags": ["--only"], "choices": FIGURE_KINDS, "action": "append", "metavar": "KIND"}),
        "device": device})
    s = command("sample", cmd_sample, "write images drawn from the prior as a PNG grid",
                "Decode N draws z ~ N(0, I) of a run into one PNG grid.")
    _add_options(s, sample, {
        "num_samples": ("how many images", {"flags": ["-n", "--num-samples"]}),
        "out": ("the PNG file to write", {"type": Path, "required": True,
                                          "metavar": "FILE.png"}),
        "draws": "show draws x ~ p(x | z) instead of the likelihood's mean",
        "seed": "the same seed gives the same images", "device": device})
    g = command("diagnose", cmd_diagnose, "guide against NUTS, PSIS k-hat, inference gaps",
                "Posterior diagnostics of the first test images (diagnostics.json, figures); "
                "NUTS runs per image, so the expected time comes first.")
    _add_options(g, diagnose_run, {
        "images": "test images to diagnose", "num_samples": "draws per NUTS chain and guide",
        "warmup": "NUTS warm-up steps", "chains": "NUTS chains",
        "iwae_samples": ("importance samples for log p(x)", {"metavar": "K"}),
        "seed": "the seed of NUTS and of the guide's draws",
        "device": ("the device (NUTS on one image is faster on the CPU)",
                   {"choices": config.DEVICES})})
    c = command("calibrate", cmd_calibrate, "simulation-based calibration of the guide",
                "Simulation-based calibration of q(z | x): ranks of latents drawn from the "
                "model among the guide's draws, ECDF bands, moments "
                "(calibration.json, figures/calibration.png).")
    _add_options(c, calibrate, {"simulations": "pairs (z, x) drawn from the model",
                                "draws": "guide draws per simulated image",
                                "seed": "the same seed gives the same result",
                                "device": device})
    command("likelihoods", cmd_likelihoods, "list the registered likelihoods",
            "Every registered likelihood: outputs per pixel, support, options.")
    command("models", cmd_models, "list the registered models",
            "Every registered model (--model NAME) and its options (--model-option).")
    return parser


_LISTINGS = ("likelihoods", "models")  # commands that list what is registered


def _settings(args: argparse.Namespace) -> dict:  # {"train.lr": 0.01, ...}, as given
    return {key: value for key, value in vars(args).items() if "." in key}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The settings of ``--config`` (else the defaults), overridden by the flags given."""
    try:
        base = RunConfig.read(args.config) if args.config is not None else RunConfig()
    except ConfigError as e:
        raise ConfigError(f"--config {e}") from None
    return base.updated(_settings(args))


def cmd_train(args: argparse.Namespace) -> int:
    progress = False if args.quiet else None
    if args.resume is not None:
        given = [flag_name(k) for k in _settings(args) if k != "train.epochs"]
        given += [f for f, v in (("--out", args.out), ("--config", args.config)) if v]
        if given:
            raise ConfigError(f"--resume continues a run with its own settings; drop "
                              f"{', '.join(given)} (only --epochs applies)")
        run = train(resume=args.resume, epochs=_settings(args).get("train.epochs"),
                    progress=progress)
    else:
        out = args.out if args.out is not None else Path("runs/quickstart")
        run = train(config_from_args(args), out, force=args.force, progress=progress)
    if _rank() > 0:  # under torchrun, rank 0 reports and writes the figures
        return EXIT_INTERRUPTED if run.interrupted else 0
    if run.interrupted:
        print(f"interrupted after epoch {run.epoch}; continue with: "
              f"pyro-vae train --resume {run.path}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if run.metrics:
        r = run.metrics[-1]
        accuracy = f", test accuracy {r['test_accuracy']:.4f}" if "test_accuracy" in r else ""
        print(f"epoch {r['epoch']}: {train_summary(r)}, test ELBO {r['test_elbo']:.2f} nats/image "
              f"(log-likelihood term {r['test_log_likelihood']:.2f}, KL {r['test_kl']:.2f})"
              + accuracy)
    if run.path is not None:
        # the quick look: those of the two the model can draw (pyro_vae.models' protocol)
        kinds = [k for k in ("reconstructions", "samples") if k in figure_kinds(run.vae)]
        if kinds:
            print("figures: " + ", ".join(map(str, write_figures(run, kinds))))
    print(f"run folder: {run.path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    r = evaluate(args.run_dir, args.split, args.iwae_samples, args.batch_size,
                 device=args.device, progress=False if args.quiet else None)
    print(f"{args.run_dir} {evaluation_table(r)}\nkept in {args.run_dir / 'eval.json'} under "
          f"{r['split']}, K={r['iwae_samples']} ({r['seconds']:.1f} s)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    print("\n".join(map(str, write_figures(args.run_dir, args.kinds, device=args.device))))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    sample(args.run_dir, args.num_samples, draws=args.draws, seed=args.seed, out=args.out,
           device=args.device)
    print(args.out)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    result = diagnose_run(args.run_dir, args.images, args.num_samples, args.warmup,
                          args.chains, args.iwae_samples, args.seed, device=args.device,
                          progress=False if args.quiet else None)
    print(f"{result.table()}\nwrote {args.run_dir / 'diagnostics.json'} and 4 figures in "
          f"{args.run_dir / 'figures'} (diagnostics_*.png)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    result = calibrate(args.run_dir, args.simulations, args.draws, args.seed,
                       device=args.device, progress=False if args.quiet else None)
    print(f"{result.table()}\nwrote {args.run_dir / 'calibration.json'} and "
          f"{args.run_dir / 'figures' / 'calibration.png'}")
    return 0


def cmd_likelihoods(args: argparse.Namespace) -> int:
    print("\n".join(get_likelihood(name).summary() for name in available_likelihoods()))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    print("\n".join(get_model(name).summary() for name in available_models()))
    return 0


@contextlib.contextmanager
def _log_to_stderr(level: int):
    """The library's log records as ``pyro-vae: message`` lines on stderr, while the
    command runs (the logger is left as it was: ``main`` may run in a notebook or test)."""
    logger = logging.getLogger("pyro_vae")
    handler, previous = logging.StreamHandler(sys.stderr), logger.level
    handler.setFormatter(logging.Formatter("pyro-vae: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # under torchrun only rank 0 reports progress; every rank still reports errors
    quiet = getattr(args, "quiet", False) or _rank() > 0
    with naming(flag_name), _log_to_stderr(logging.WARNING if quiet else logging.INFO):
        try:
            import_modules(args.imports)
            return args.func(args)
        except Exception as e:  # noqa: BLE001 - every failure leaves as one line
            if os.environ.get("PYRO_VAE_DEBUG"):
                raise
            code, message = _failure(e, args.command, _path_flag(args, e))
            print(f"pyro-vae: error: {message}", file=sys.stderr)
            return code
        except KeyboardInterrupt:  # a second Ctrl-C: abort at once (the last checkpoint stands)
            print("pyro-vae: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


# what sizes each command's memory, for the message of an allocation that failed
_SIZED_BY = {"train": "--batch-size, --num-particles, --hidden-dims or --z-dim",
             "evaluate": "--batch-size or --iwae-samples", "sample": "-n",
             "diagnose": "--images, --chains or --iwae-samples",
             "calibrate": "--simulations or --draws"}
_OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "not enough memory")


# the options that name paths, as each command spells them
_PATH_FLAGS = {"out": "--out", "resume": "--resume", "data_dir": "--data-dir",
               "config": "--config", "run_dir": "RUN_DIR"}


def _path_flag(args: argparse.Namespace, e: Exception) -> str | None:
    """The option whose path an ``OSError`` is about (the longest that leads to it)."""
    filename = str(getattr(e, "filename", None) or "")
    given = [(str(value), flag) for name, flag in _PATH_FLAGS.items()
             if (value := getattr(args, name, None)) is not None]
    matches = [(len(v), flag) for v, flag in given if filename.startswith(v)]
    return max(matches)[1] if filename and matches else None


def _failure(e: Exception, command: str | None = None, flag: str | None = None
             ) -> tuple[int, str]:
    """The exit status and one-line message for an exception that left a command; ``flag``:
    the option whose path an ``OSError`` is about, named in the fix."""
    if isinstance(e, PyroVAEError):
        return (EXIT_DIVERGED if isinstance(e, TrainingDiverged) else EXIT_USAGE), str(e)
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
            isinstance(e, RuntimeError) and any(w in str(e) for w in _OUT_OF_MEMORY)):
        lower = (f"lower {_SIZED_BY[command]}" if command in _SIZED_BY else
                 "free memory (close other programs), or use a machine with more")
        return EXIT_RESOURCE, (f"out of memory ({type(e).__name__}); {lower}"
                               + (", and --resume the run" if command == "train" else ""))
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        reason = e.strerror or str(e) or type(e).__name__
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            then = ("then run it again (a run that finished an epoch continues with --resume "
                    "from its last checkpoint, intact)" if command == "train" else
                    "then run it again: what it had written before is intact")
            return EXIT_RESOURCE, f"{reason}{where}; free some space, {then}"
        given = f" given to {flag}" if flag else ""
        if e.errno == errno.ENAMETOOLONG:
            return EXIT_USAGE, f"{reason}{where}; choose a shorter path{given}"
        return EXIT_USAGE, f"{reason}{where}; check the path{given} and its permissions"
    text = " ".join(str(e).split())[:200]
    return EXIT_INTERNAL, (f"internal error ({type(e).__name__}: {text}); please report it, "
                           "with the traceback that PYRO_VAE_DEBUG=1 shows")


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)
