"""Small shared pieces: logging, seeding, atomic file writes, optimizer and schedule."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger("fid")


def init_logger(run_dir: str | Path | None = None, is_main: bool = True) -> logging.Logger:
    """Log to stdout and, on the main process, to `run_dir/run.log` (appending on resume)."""
    logger.handlers.clear()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", datefmt="%m/%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if run_dir is not None and is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(run_dir) / "run.log")
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temporary file beside `path`, then rename over it: readers see the old
    file or the complete new one, never a half-written file (also after kill -9)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------
# Optimisation (SPEC §8)
# ---------------------------------------------------------------------------


def lr_lambda(opt) -> Any:
    """Multiplier of the lr at a given optimizer step.

    fixed: constant. linear: 0 → 1 over `warmup_steps`, then linear decay to 0 at
    `scheduler_steps` (default `total_steps`), or flat after warmup with `--fixed_lr`.
    """
    warmup = max(0, opt.warmup_steps)
    total = opt.scheduler_steps if opt.scheduler_steps is not None else opt.total_steps

    def linear(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if opt.fixed_lr:
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return linear if opt.scheduler == "linear" else (lambda step: 1.0)


def set_optim(opt, model):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if opt.optim == "adam":
        optimizer = torch.optim.Adam(params, lr=opt.lr)
    elif opt.optim == "adamw":
        optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {opt.optim!r} (adam or adamw)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opt))
    return optimizer, scheduler


def autocast(opt) -> contextlib.AbstractContextManager:
    """Mixed precision from `--precision` on the run's device; fp32 is a no-op."""
    import torch

    precision = getattr(opt, "precision", "fp32")
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(getattr(opt, "device", "cpu")).type
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


def check_model_path(path: str | Path, what: str = "model") -> None:
    """A path that is clearly local (./x, ../x, /x, a/b/c) must exist; hub names (t5-base,
    org/name) go to transformers. Without this a typo reads as a failed hub download."""
    text = str(path)
    local = (
        text.startswith((".", "/", "~"))
        or text.count("/") > 1  # hub names are "name" or "org/name"
        or ("/" in text and os.path.isdir(text.split("/")[0]))  # an existing local parent
    )
    if local and not os.path.exists(os.path.expanduser(text)):
        raise FileNotFoundError(f"{what} {text}: no such directory")


# Config fields that hold a dropout probability, across the encoders we load (T5, BERT-likes).
DROPOUT_CONFIG_KEYS = (
    "dropout_rate",  # T5: hidden, feed-forward and attention probabilities
    "hidden_dropout_prob",  # BERT: embeddings, hidden and feed-forward
    "attention_probs_dropout_prob",  # BERT: attention probabilities
    "attention_dropout",  # DistilBERT, BART-likes
    "dropout",  # DistilBERT, BART-likes
)
# Module attributes that hold the attention-probability dropout as a float, not as an
# nn.Dropout (transformers 5's T5Attention reads `config.dropout_rate` once, at build time).
DROPOUT_FLOAT_ATTRIBUTES = ("dropout", "attention_dropout", "dropout_p")


def set_dropout(model, p: float) -> None:
    """--dropout p for every dropout of the model: each nn.Dropout, each attention module's
    float dropout probability, and the config (so that a saved and reloaded or resumed
    model has exactly the same dropout)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
            continue
        for name in DROPOUT_FLOAT_ATTRIBUTES:
            value = getattr(module, name, None)
            if isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, p)
    for config in (model.config, getattr(model.config, "encoder", None)):
        for key in DROPOUT_CONFIG_KEYS:
            value = getattr(config, key, None) if config is not None else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(config, key, p)


def dropout_rates(model) -> set[float]:
    """Every dropout probability the model applies in training (nn.Dropout and float attributes)."""
    import torch

    rates = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            rates.add(module.p)
            continue
        for name in DROPOUT_FLOAT_ATTRIBUTES:
            value = getattr(module, name, None)
            if isinstance(value, float) and not isinstance(value, bool):
                rates.add(value)
    return rates


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def cli(main) -> None:
    """Run a script's main. A bad input (file, model path, option value) ends with one line
    naming what is wrong and exit code 2, not a traceback; FID_DEBUG=1 shows the traceback."""
    from .data import DataError
    from .runlock import RunDirectoryBusy, release

    try:
        main()
    except (DataError, OSError, UnicodeDecodeError, ValueError, RunDirectoryBusy) as e:
        if os.environ.get("FID_DEBUG"):
            raise
        logger.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        release()
