"""argparse pieces every script's flags use (a leaf): value types with one-line errors, the
help formatter that states each default once, and the flags several groups share."""

from __future__ import annotations

import argparse
from typing import Any


def positive_int(text: str) -> int:
    """argparse type of counts and sizes (batch size, passages, tokens, steps): an integer >= 1.
    A bad value is an argparse error: one line naming the flag, exit code 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type of durations: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


# Flags that several groups take, declared once; a group adds one by name, in its own words
# where its meaning there differs (`help=`).
SHARED_FLAGS: dict[str, dict[str, Any]] = {
    "train_data": dict(type=str, default="none", help="question file (.json or .jsonl)"),
    "eval_data": dict(type=str, default="none", help="question file (.json or .jsonl)"),
    "no_title": dict(action="store_true", help="leave passage titles out of the input"),
    "n_context": dict(type=positive_int, default=1, help="passages per question"),
    "passage_maxlength": dict(type=positive_int, default=200, help="max passage tokens"),
    "question_maxlength": dict(type=positive_int, default=40, help="max question tokens"),
    "passages": dict(type=str, default=None, help="passages .tsv (id, text, title)"),
    "extract_cls": dict(action="store_true", help="the original's spelling of --pooling cls"),
}


def shared(group, name: str, **changes: Any) -> None:
    """Add the shared flag `name` (SHARED_FLAGS) to `group`, with `changes` to its settings."""
    group.add_argument(f"--{name}", **{**SHARED_FLAGS[name], **changes})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help states each default once. "(default: X)" is appended to a flag with a value; a flag
    whose default is None says in its own words what happens when it is unset, and a switch
    (store_true) is off unless given, so neither gets "(default: None)" / "(default: False)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def first_paragraph(doc: str | None) -> str:
    """A registry entry's docstring as one line of --help: its first paragraph, without the final period."""
    paragraph = (doc or "").strip().split("\n\n")[0]
    return " ".join(paragraph.split()).rstrip(".")
