"""Convert a checkpoint of the original FiD code (docs/parity.md):

    python -m src.reader.convert convert-legacy pretrained_models/nq_reader_base nq_reader_base_ours --legacy_bias keep

`keep` writes our format with 3.0.2's cross-attention bias recorded in the config (the
original's answers, exactly); `drop` writes plain modern T5 weights without it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from src.errors import USER_PATH_ERRORS, InputError, ModelPathError
from src.files import atomic_directory
from src.reader import legacy
from src.reader.model import FiDT5

# Everything `save_pretrained` of a tokenizer may write; copied along by convert-legacy.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "added_tokens.json",
)


def convert_legacy(src: str | Path, dst: str | Path, legacy_bias: str, logger: logging.Logger | None = None) -> Path:
    """Convert an original FiD checkpoint directory to our format (`keep`: FiDT5 with
    the legacy bias recorded in its config) or to a plain modern T5 (`drop`). The
    destination appears complete or not at all; tokenizer files in `src` are copied."""
    log = logger or logging.getLogger("fid")
    src, dst = Path(src), Path(dst)
    if legacy_bias not in ("keep", "drop"):
        raise ValueError(f"--legacy_bias must be keep or drop, got {legacy_bias!r}")
    if not src.is_dir() or legacy.original_fid_state(src) is None:
        raise ModelPathError(f"{src}: not an original FiD checkpoint (pytorch_model.bin with encoder.encoder.* keys)")
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose a new directory")
    model = FiDT5.load(src, logger=log)
    with atomic_directory(dst) as tmp:
        if legacy_bias == "keep" or not model.has_legacy_xattn_bias:
            model.save_pretrained(tmp)
        else:
            model.save_plain_t5(tmp, warn=False)  # the warning below names the destination
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    if model.has_legacy_xattn_bias and legacy_bias == "keep":
        log.info("wrote %s: FiDT5 weights with the legacy cross-attention bias (load with FiDT5.load)", dst)
    elif model.has_legacy_xattn_bias:
        log.warning(
            "wrote %s: plain T5 without the legacy bias; it no longer reproduces the original's answers "
            "exactly (fine-tune it, or convert with --legacy_bias keep for the published numbers)",
            dst,
        )
    else:
        log.info("wrote %s: plain T5 (the checkpoint had no legacy bias)", dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.reader.convert", description="FiD reader checkpoint tools (no network needed)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert-legacy",
        help="convert a checkpoint saved by the original FiD code (e.g. nq_reader_base)",
        description="Convert a checkpoint saved by the original FiD code (transformers 3.0.2 layout).",
    )
    convert.add_argument("src", help="original checkpoint directory (config.json + pytorch_model.bin)")
    convert.add_argument("dst", help="new directory to write (must not exist)")
    convert.add_argument(
        "--legacy_bias",
        choices=("keep", "drop"),
        default="keep",
        help="keep: FiDT5 format with 3.0.2's cross-attention bias (reproduces the original's answers); "
        "drop: plain modern T5 weights without it (outputs change; default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        convert_legacy(args.src, args.dst, args.legacy_bias)
    except (InputError, *USER_PATH_ERRORS) as e:  # anything else is a bug: its traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
