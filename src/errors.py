"""Error types of the project (a leaf: imports nothing of ours).

Every bad input is one of these, with a message that names the file (and the line or
example) and what is wrong; the scripts' `cli` wrapper prints it and exits with code 2.
Nothing else is reported that way: any other exception is a bug and shows its traceback,
so code must not raise InputError for a broken invariant, nor ValueError for a user's
mistake.
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


class ModelPathError(InputError):
    """A model path (--model_path, --model_name_or_path, --tokenizer_name_or_path, a training
    checkpoint) that is missing, unreadable, or not the kind of model the flag needs; the
    message names the path."""


class RunDirectoryBusy(RuntimeError):
    """Another live process holds the run directory."""


# The OS errors of opening or creating a path the user named (a question file, an output
# directory): bad input too, and their message names the path. Other OSErrors (EIO, a full
# disk, a lost network file system) are not the user's mistake and keep their traceback.
USER_PATH_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


def is_bad_input(error: BaseException) -> bool:
    """Whether `error` is reported as bad input (one line, exit 2) rather than as a bug."""
    return isinstance(error, (InputError, RunDirectoryBusy, *USER_PATH_ERRORS))


class NonFiniteLoss(InputError):
    """Training diverged: the loss stayed inf/NaN (a setting to change, e.g. --precision bf16; not a bug)."""
