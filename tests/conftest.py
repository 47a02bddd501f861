import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PARITY = ROOT / "tests" / "data" / "parity"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return PARITY


# Tiny models gain nothing from intra-op threads, and on a 2-core machine that also runs
# torchrun subprocesses, oversubscription makes them many times slower.
import torch  # noqa: E402

torch.set_num_threads(1)
