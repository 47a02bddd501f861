"""Error types of the project (a leaf: imports nothing of ours).

Every bad input is one of these, with a message that names the file (and the line or
example) and what is wrong; the scripts' `cli` wrapper prints it and exits with code 2.
"""

from __future__ import annotations


class InputError(ValueError):
    """A bad input file or value; the message says which and what is wrong."""


class DataError(InputError):
    """A question file that does not follow the format; the message names file and example."""


class PassageFileError(InputError):
    """A passages file that cannot be used; the message names the file and line."""


class EmbeddingFileError(InputError):
    """An embedding shard that cannot be read; the message names the file."""


class RunDirectoryBusy(RuntimeError):
    """Another live process holds the run directory."""


class NonFiniteLoss(InputError):
    """Training diverged: the loss stayed inf/NaN (a setting to change, e.g. --precision bf16; not a bug)."""
