"""The errors whose messages we write: each names the file, field or value at fault and, where there is one, the fix.

The CLI prints an `OpenFlamingoError` on one line and exits with status 2; any other exception is a bug (ours or a
library's) and keeps its traceback. Each class is also the built-in error it stands for, so `except ValueError`
and `except FileNotFoundError` keep catching them.
"""

from __future__ import annotations


class OpenFlamingoError(Exception):
    """A problem with the user's input, files or environment, diagnosed by openflamingo."""


class InputError(OpenFlamingoError, ValueError):
    """A config value, argument, tensor or data record that cannot be used as given."""


class MissingFileError(OpenFlamingoError, FileNotFoundError):
    """A file or directory the user named (or a run needs) is not there."""


class ExistingFileError(OpenFlamingoError, FileExistsError):
    """An output that would overwrite something already there."""


class MissingDependencyError(OpenFlamingoError, ImportError):
    """An optional package that this feature needs is not installed (the message says which extra installs it)."""
