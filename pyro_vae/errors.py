"""Exceptions for problems the user can fix.

Every error raised for bad input derives from :class:`PyroVAEError`. Its message is one
line that names the problem and the fix; the command-line tool prints it and exits with
status 2 instead of showing a traceback.
"""


class PyroVAEError(Exception):
    """Base class for errors caused by input the user can correct."""


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
