"""Error classes raised for bad user input.

Every problem a user can cause (a corrupt TIFF, a wrong option, an unwritable folder)
is raised as a :class:`VarEmitterError` subclass whose message is one line naming the
file and what is wrong. The command line prints it as ``error: <message>`` and exits 2;
the napari widgets show it as a notification.
"""

from __future__ import annotations

import os


class VarEmitterError(Exception):
    """Base class of every error caused by the user's input or options."""


class InputFileError(VarEmitterError):
    """An input file is missing, unreadable, corrupt or of the wrong kind or shape."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        msg = problem if path is None else f"{self.path}: {problem}"
        super().__init__(msg)


class ConfigError(VarEmitterError):
    """A configuration (config.json or options) is invalid."""


class CheckpointError(InputFileError):
    """A checkpoint cannot be loaded safely or does not match the model."""


class OutputError(VarEmitterError):
    """An output cannot be written (unwritable folder, disk full, ...)."""


class Cancelled(VarEmitterError):
    """The user cancelled a running job (Cancel button, Ctrl-C)."""
