"""bench/gpu_check.py in its CPU mode, so the GPU check cannot rot between GPU sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # ~1 min: one interpreter, tiny models, three in-process training runs
def test_gpu_check_quick_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["part"]: r for r in json.loads((tmp_path / "table.json").read_text())["rows"]}
    assert set(rows) == {
        "masked_row", "packed_step", "wo_fp16", "wo_bf16", "collectives", "run_loop", "resume_fp16", "bench_packing",
    }  # fmt: skip
    assert rows["run_loop"]["status"] == "skip" and "CUDA only" in rows["run_loop"]["note"]
    assert all(r["status"] == "ok" for name, r in rows.items() if name != "run_loop"), rows
    assert "math" in rows["masked_row"]["note"] and "gloo" in rows["collectives"]["note"]
    assert "max weight diff 0.0e+00" in rows["resume_fp16"]["note"]  # exact on CPU
    assert "train step" in rows["bench_packing"]["note"]
    assert (
        "| masked_row | ok |" in proc.stdout and (tmp_path / "table.md").read_text().count("\n| ") == 1 + 8
    )  # header + parts
    for name in rows:
        assert (tmp_path / f"{name}.log").exists()
    assert (tmp_path / "packed_step_profile.txt").stat().st_size > 0
