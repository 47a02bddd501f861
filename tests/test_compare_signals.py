"""`run_loop.py --quick --compare_signals` end to end: one reader, one retriever per signal,
one table (src/toy/compare.py). Its own module, so that pytest-xdist runs it beside the
whole loop of tests/test_run_loop.py instead of after it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compare_signals_quick(tmp_path):
    """One reader, one retriever per signal (kl for xattn, emdr for answer_logprob), one table."""
    run_dir = tmp_path / "compare"
    proc = subprocess.run(
        [sys.executable, "run_loop.py", "--quick", "--output_dir", str(run_dir),
         "--compare_signals", "xattn", "answer_logprob"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["signal"]: row for row in json.loads((run_dir / "compare.json").read_text())}
    assert list(rows) == ["xattn", "answer_logprob", "(before distillation)", "(first stage)"]
    assert rows["xattn"]["loss"] == "kl" and rows["answer_logprob"]["loss"] == "emdr"
    for signal in ("xattn", "answer_logprob"):
        opts = json.loads((run_dir / "compare" / signal / "score_train" / "options.json").read_text())
        assert opts["score_kind"] == signal
        retr = json.loads((run_dir / "compare" / signal / "retriever" / "options.json").read_text())
        assert retr["retriever_loss"] == rows[signal]["loss"] and retr["seed"] == 0
        assert rows[signal]["export_seconds"] > 0
        topk = [rows[signal]["topk"][k] for k in ("1", "5", "20")]
        assert 0.0 <= topk[0] <= topk[1] <= topk[2] <= 1.0
    # Distilled from cross-attention, the retriever beats its random start by far. EMDR from
    # answer log-probabilities learns slowly at this size (its dev loss is best after 100 of
    # the 300 steps; test top-20 0.20 in fp32, 0.30 in bf16, vs 0.15 at the start on the
    # 2-core VM), so only the full-size table in docs/results.md shows what it reaches.
    before = rows["(before distillation)"]["topk"]
    assert rows["xattn"]["topk"]["20"] > before["20"] + 0.3 and rows["xattn"]["topk"]["5"] > before["5"] + 0.3
    md = (run_dir / "compare.md").read_text()
    assert "| xattn | kl |" in md and "| answer_logprob | emdr |" in md
