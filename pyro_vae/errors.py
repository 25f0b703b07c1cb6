"""Exceptions for problems the user can fix, and how their messages name settings.

Every error raised for bad input derives from :class:`PyroVAEError`. Its message is one
line that names the problem and the fix; the command-line tool prints it and exits with
status 2 instead of showing a traceback.

A message names a setting as a token, never in prose: ``{train.lr}`` (a field of
:class:`~pyro_vae.config.RunConfig`), ``{train.objective=iwae}`` (the field with a value),
or an argument of :func:`~pyro_vae.train` or of a command (``{force}``, ``{out}``,
``{resume=PATH}``, ``{import=MODULE}``, ``{iwae_samples}``, ...).
``str(error)`` spells tokens as Python code does (``TrainConfig.lr``, ``force=True``); the
command-line tool spells them as its flags (``--lr``, ``--force``) by installing its own
:func:`naming` -- a lookup by field, with no parsing of sentences. Log messages use the
same tokens through :func:`get_logger`.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import re
from collections.abc import Callable

# {section.field}, {section.field=value}, {argument} or {argument=value}
_ARGUMENT_NAMES = ("force|out|resume|import|iwae_samples|batch_size|num_samples|images|warmup|"
                   "chains|draws|simulations")
_TOKEN = re.compile(rf"\{{({_ARGUMENT_NAMES}|(?:model|data|train)\.\w+)(?:=([^{{}}]*))?\}}")
_SECTIONS = {"model": "ModelConfig", "data": "DataConfig", "train": "TrainConfig"}
_ARGUMENTS = {"force": "force=True", "out": "out folder", "resume": "resume={}",
              "import": "import {} before loading the run"}


def python_name(setting: str, value: str | None) -> str:
    """How Python code spells a setting token: ``TrainConfig.lr = 'x'``, ``force=True``."""
    section, _, field = setting.partition(".")
    if not field:
        return _ARGUMENTS.get(setting, setting).format(value)
    name = f"{_SECTIONS[section]}.{field}"
    if value is None:
        return name
    try:  # True, 0.5, None as they are; names of choices quoted
        ast.literal_eval(value)
    except (ValueError, SyntaxError):
        value = repr(value)
    return f"{name} = {value}"


_namer: Callable[[str, str | None], str] = python_name


@contextlib.contextmanager
def naming(namer: Callable[[str, str | None], str]):
    """Spell setting tokens with ``namer(setting, value)`` while the block runs."""
    global _namer
    previous, _namer = _namer, namer
    try:
        yield
    finally:
        _namer = previous


def render(text: str, namer: Callable[[str, str | None], str] | None = None) -> str:
    """``text`` with its setting tokens spelled by ``namer`` (default: the current one)."""
    return _TOKEN.sub(lambda m: (namer or _namer)(m[1], m[2]), text)


class _Tokens(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return render(str(msg)), kwargs


def get_logger(name: str) -> logging.LoggerAdapter:
    """A logger whose messages may name settings as tokens (rendered when logged)."""
    return _Tokens(logging.getLogger(name), {})


class PyroVAEError(Exception):
    """Base class for errors caused by input the user can correct."""

    def __str__(self) -> str:
        return render(super().__str__())

    @property
    def setting(self) -> str | None:
        """The first setting the message names (``"train.lr"``), if any."""
        match = _TOKEN.search(super().__str__())
        return match[1] if match else None


class ConfigError(PyroVAEError, ValueError):
    """An invalid setting (unknown name, non-positive size, incompatible combination)."""


class DataError(PyroVAEError):
    """A data set that cannot be found, read, or scored by the chosen likelihood."""


class CheckpointError(PyroVAEError):
    """A checkpoint or run folder that is missing, corrupt, unsafe or incompatible."""


class RunDirError(PyroVAEError):
    """An output folder that cannot be used (not writable, or holding another run)."""


class TrainingDiverged(PyroVAEError):
    """A non-finite loss or gradient; the run folder keeps its last finished epoch."""


class NotRegisteredError(ConfigError):
    """A likelihood or network name that this process has not registered (yet)."""
