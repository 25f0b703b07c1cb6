"""Named, user-extensible parts (likelihoods, networks) and where each one comes from.

A :class:`Registry` maps names to parts. Each part remembers the module that registered
it, so a run can record it (``ModelConfig.likelihood_module``) and a fresh process can
say what to load when the name is unknown there. Loading is always the user's act --
``import mymodule`` in Python, ``--import mymodule`` on the command line -- or that of an
installed package, through the entry-point group ``pyro_vae.<kind>s``::

    # pyproject.toml of a package that ships likelihoods
    [project.entry-points."pyro_vae.likelihoods"]
    laplace = "mypackage.likelihoods"

A run folder never makes pyro-vae import code on its own: its ``config.json`` names the
module, it does not run it (as checkpoints load without executing code).

Registering the same function twice (a notebook cell run again, a module re-imported) is
allowed and replaces the entry; a *different* function under a taken name needs
``overwrite=True``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Generic, TypeVar

from .errors import ConfigError, NotRegisteredError, PyroVAEError, get_logger

log = get_logger(__name__)

T = TypeVar("T")

MAIN = "__main__"  # a part defined in a script or notebook cell: no other process has it


def import_modules(names: list[str]) -> None:
    """Import each module named (the current folder searched too, as ``python -m`` does):
    what ``--import`` does. A module that is missing or fails is one :class:`ConfigError`."""
    if names and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise ConfigError(f"{{import={name}}}: no module named {e.name!r} (put {name}.py "
                              "in the current folder or on PYTHONPATH)") from None
        except PyroVAEError:
            raise
        except SystemExit as e:  # the module ended the process: not a module to import
            raise ConfigError(f"{{import={name}}} called sys.exit({e.code}) while being "
                              "imported; a module to import defines and registers parts, "
                              "and returns") from None
        except Exception as e:  # noqa: BLE001 - the user's module failed: say how, in one line
            text = " ".join(str(e).split())[:200]
            raise ConfigError(f"{{import={name}}} failed: {type(e).__name__}: {text}") from None


def origin(func: Callable) -> tuple[str, str]:
    """``(module, qualified name)`` of a function: what identifies it across re-runs."""
    return getattr(func, "__module__", None) or MAIN, getattr(func, "__qualname__", repr(func))


class Registry(Generic[T]):
    """Parts of one kind by name, with the module that registered each.

    ``kind`` names the part in messages (``likelihood``); ``field`` is the setting that
    chooses it (``"model.likelihood"``).
    """

    def __init__(self, kind: str, field: str):
        self.kind, self.field = kind, field
        self.group = f"pyro_vae.{kind}s"
        self._items: dict[str, T] = {}
        self._origins: dict[str, tuple[str, str]] = {}
        self._entry_points_loaded = False

    def add(self, name: str, item: T, func: Callable, overwrite: bool = False) -> None:
        """Register ``item`` (built from ``func``) under ``name``."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} needs a non-empty name, got {name!r}")
        here = origin(func)
        if name in self._items and not overwrite and self._origins[name] != here:
            module, qualname = self._origins[name]
            raise ConfigError(f"a {self.kind} named '{name}' is registered already (by "
                              f"{module}.{qualname}); pass overwrite=True to replace it")
        self._items[name] = item
        self._origins[name] = here

    def names(self) -> list[str]:
        """Every registered name (those of installed packages' entry points included)."""
        self._load_entry_points()
        return sorted(self._items)

    def module_of(self, name: str) -> str | None:
        """The module that registered ``name``: ``None`` for pyro-vae's own parts."""
        module = self._origins[name][0]
        return None if module == "pyro_vae" or module.startswith("pyro_vae.") else module

    def get(self, name: str, module: str | None = None) -> T:
        """The part named ``name``; ``module`` (as a run recorded it) shapes the message
        when the name is unknown in this process."""
        if name not in self._items:
            self._load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            pass
        if module == MAIN:
            raise NotRegisteredError(
                f"{self.kind} '{name}' was defined in {MAIN} (a script or notebook) of the "
                f"process that trained this run, so no other process has it; move it into a "
                f"module, then {{import=it}}") from None
        if module:
            raise NotRegisteredError(f"{self.kind} '{name}' is registered by module "
                                     f"'{module}'; {{import={module}}}") from None
        raise NotRegisteredError(
            f"unknown {self.kind} '{name}'; {{{self.field}}} must be one of: "
            f"{', '.join(self.names())} (or register your own {self.kind} in a module and "
            "{import=it})") from None

    def _load_entry_points(self) -> None:
        """Import the modules that installed packages declare for this kind, once."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for entry in metadata.entry_points(group=self.group):
            try:
                entry.load()
            except Exception as e:  # noqa: BLE001 - a broken plugin must not break the rest
                log.warning("could not load %s '%s' from %s (%s: %s)", self.kind, entry.name,
                            entry.value, type(e).__name__, e)
