"""What only a GPU can show, checked in a few minutes (README "Distributed training"):

    python bench/gpu_check.py --device cuda --out gpu_check      # one GPU, at most ~8 minutes
    python bench/gpu_check.py --device cpu --quick --out /tmp/gc  # the test suite: the same code on CPU

Parts (each skips with a note when its device or backend is missing):
  masked_row     the retriever with a missing passage (a fully masked row) under each SDPA
                 backend: finite embeddings and gradients; and what raw SDPA gives such a row
  packed_step    a packed FiD train step under the profiler: attention kernels that ran, pad copies
  wo_fp16/bf16   T5 with feed-forward outputs beyond fp16's range: finite loss and gradients
  collectives    a single-rank NCCL (gloo on CPU) group through every collective helper + a checkpoint save
  run_loop       run_loop.py --quick in bf16 and fp16 (CUDA only; tests/test_run_loop.py covers the CPU)
  resume_fp16    train_reader.py in fp16, SIGTERM mid-run, resumed: same weights as a straight run
  bench_packing  bench/bench_packing.py at t5-base widths, 100 passages (time, memory, MFU)
Prints one table and writes it (table.md, table.json) with one log per part under --out.
Needs nothing beyond the project's requirements and downloads nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench_packing  # noqa: E402

import train_reader  # noqa: E402
from src import distributed as dist  # noqa: E402
from src.reader import precision  # noqa: E402
from src.reader.model import FiDT5  # noqa: E402
from src.retriever.model import Retriever, RetrieverConfig  # noqa: E402
from src.toy.tiny_models import save_tiny_t5, tiny_bert_config, tiny_t5_config  # noqa: E402
from src.train import checkpoint, trainer  # noqa: E402
from src.train.strategy import DataParallel  # noqa: E402


class Skip(Exception):
    """A part that cannot run here (no GPU, backend missing): a note, not a failure."""


def finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def masked_row(args, log) -> str:
    """Retriever forward + backward with a missing passage under each SDPA backend."""
    torch.manual_seed(0)
    config = RetrieverConfig(encoder=tiny_bert_config(60, hidden=64, layers=2), indexing_dimension=32)
    model = Retriever(config).to(args.device)
    q = torch.randint(5, 60, (2, 6), device=args.device)
    p = torch.randint(5, 60, (2, 3, 8), device=args.device)
    p_mask = torch.ones_like(p)
    p_mask[0, 2] = 0  # a missing passage
    results = []
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ):
        for dtype in [None] + ([torch.bfloat16, torch.float16] if args.device.startswith("cuda") else []):
            name = backend.name.lower() + ("" if dtype is None else f"/{str(dtype)[6:]}")
            model.zero_grad()
            try:
                with (
                    sdpa_kernel(backend),
                    torch.autocast(args.device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None),
                ):
                    scores, _ = model(q, torch.ones_like(q), p, p_mask)
                    raw = torch.nn.functional.scaled_dot_product_attention(
                        *(torch.randn(1, 2, 4, 16, device=args.device) for _ in range(3)),
                        attn_mask=torch.zeros(1, 1, 4, 4, dtype=torch.bool, device=args.device),
                    )
                torch.log_softmax(scores, -1)[torch.isfinite(scores)].sum().backward()
            except RuntimeError as e:
                log(f"{name}: backend refused ({str(e).splitlines()[0]})")
                continue
            grads = [t.grad for t in model.parameters()]
            ok = finite(scores[torch.isfinite(scores)], *grads)
            log(f"{name}: scores+grads finite={ok}; raw SDPA on a fully masked row finite={finite(raw)}")
            if not ok:
                raise AssertionError(f"{name}: NaN/inf in the retriever's scores or gradients")
            results.append(f"{name}{'' if finite(raw) else '(raw NaN)'}")
    if not results:
        raise Skip("no SDPA backend accepted the inputs")
    return "finite under " + ", ".join(results)


def tiny_reader(args, d_model: int, layers: int, gated: bool = False) -> FiDT5:
    torch.manual_seed(0)
    ff = "gated-gelu" if gated else "relu"
    config = tiny_t5_config(512, d_model=d_model, layers=layers, heads=max(1, d_model // 64), feed_forward_proj=ff)
    return FiDT5(config).to(args.device)


def fid_batch(args, B: int, N: int, L: int):
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(L // 2, L + 1, (B, N), generator=g)
    mask = (torch.arange(L) < lengths[..., None]).long()
    ids = torch.randint(3, 512, (B, N, L), generator=g) * mask
    labels = torch.randint(3, 512, (B, 8), generator=g)
    return ids.to(args.device), mask.to(args.device), labels.to(args.device)


def packed_step(args, log) -> str:
    model = tiny_reader(args, 64 if args.quick else 512, 2 if args.quick else 6).train()
    ids, mask, labels = fid_batch(args, 1, 10 if args.quick else 100, 64 if args.quick else 250)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof, torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
    events = prof.key_averages()
    (args.out / "packed_step_profile.txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=60))
    words = ("flash", "efficient", "cudnn", "fmha", "attention", "sdpa", "softmax")
    kernels = sorted({e.key for e in events if any(w in e.key.lower() for w in words)})
    pads = sum(e.count for e in events if e.key in ("aten::constant_pad_nd", "aten::pad"))
    log("attention ops/kernels: " + "; ".join(kernels))
    log(f"pad copies (aten::constant_pad_nd): {pads}; loss {loss.item():.4f}")
    if not finite(loss):
        raise AssertionError("packed train step: loss not finite")
    forward = [k for k in kernels if "Backward" not in k and ("scaled_dot" in k or not k.startswith("aten::"))]
    short = forward[:3] or kernels[:3]
    return f"pads {pads}; kernels: {', '.join(short)}"


def wo_dtype(dtype: torch.dtype):
    def part(args, log) -> str:
        model = tiny_reader(args, 64, 2, gated=True).train()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, precision.FEED_FORWARD):
                    m.wo.weight.mul_(3e4)  # outputs beyond fp16's 65504, as t5-large / Flan-T5's
        ids, mask, labels = fid_batch(args, 2, 4, 16)
        with torch.autocast(args.device.split(":")[0], dtype=dtype):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        ok = finite(loss, *(p.grad for p in model.parameters()))
        log(f"{dtype}: loss {loss.item()}, gradients finite {ok}")
        if not ok:
            raise AssertionError(f"{dtype}: loss or gradients not finite with large wo")
        return f"loss {loss.item():.3f}, grads finite"

    return part


def collectives(args, log) -> str:
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    if backend == "nccl" and not torch.distributed.is_nccl_available():
        raise Skip("NCCL not available in this torch")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        dist.barrier()
        checks = {
            "sum_over_ranks": dist.sum_over_ranks([1.0, 2.0]) == [1.0, 2.0],
            "weighted_average": dist.weighted_average(2.0, 3) == (2.0, 3),
            "any_over_ranks": dist.any_over_ranks(True) and not dist.any_over_ranks(False),
            "gather_objects": dist.gather_objects({"a": 1}) == [{"a": 1}],
            "broadcast_from_main": dist.broadcast_from_main("x") == "x",
            "gather_to_main": dist.gather_to_main(3) == [3],
            "object_group": dist.broadcast_from_main("y", dist.object_group()) == "y",
        }
        t = torch.arange(6.0, device=device).view(3, 2).requires_grad_()
        gathered = dist.gather_with_local_grad(t)
        gathered.sum().backward()
        checks["gather_with_local_grad"] = torch.equal(gathered.detach(), t.detach()) and bool((t.grad == 1).all())
        model = torch.nn.Linear(4, 4).to(device)
        model.save_pretrained = lambda d: torch.save(model.state_dict(), Path(d) / "weights.pt")
        runtime = dist.Runtime(device=device)
        opt = torch.optim.Adam(model.parameters())
        saved = checkpoint.save(
            args.out / "ckpt", "latest", DataParallel(runtime), model, None, opt, None, {}, {"step": 3}
        )
        checks["checkpoint.save"] = checkpoint.load_training_state(saved, opt)["step"] == 3
    finally:
        dist.destroy()
    for name, ok in checks.items():
        log(f"{backend} {name}: {'ok' if ok else 'WRONG'}")
    if not all(checks.values()):
        raise AssertionError("wrong: " + ", ".join(n for n, ok in checks.items() if not ok))
    return f"{backend}: {len(checks)} helpers + checkpoint ok"


def run_loop(args, log) -> str:
    if not args.device.startswith("cuda"):
        raise Skip("CUDA only (tests/test_run_loop.py runs --quick on CPU)")
    notes = []
    for prec in ("bf16", "fp16"):
        out = args.out / f"run_loop_{prec}"
        cmd = [
            sys.executable,
            "run_loop.py",
            "--quick",
            "--device",
            args.device,
            "--precision",
            prec,
            "--output_dir",
            str(out),
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.part_timeout)
        log(f"$ {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        if proc.returncode != 0:
            raise AssertionError(f"run_loop.py --quick --precision {prec} exited {proc.returncode}")
        notes.append(f"{prec} ok")
    return ", ".join(notes)


def reader_examples(n: int) -> list[dict]:
    names, colors = ["anna", "boris", "clara", "dmitri"], ["red", "blue", "green", "yellow"]
    out = []
    for i in range(n):
        name, color = names[i % 4], colors[(i * 3) % 4]
        ctxs = [{"title": name, "text": f"{name} likes {color} ."}, {"title": "x", "text": f"{names[(i + 1) % 4]} ."}]
        out.append(
            {"id": f"q{i}", "question": f"what color does {name} like ?", "answers": [color], "ctxs": ctxs[: 1 + i % 2]}
        )
    return out


def resume_fp16(args, log) -> str:
    root = args.out / "resume"
    words = "anna boris clara dmitri red blue green yellow what color does like the ? . x question: title: context:"
    model_dir = save_tiny_t5(root / "t5", [words], d_model=32, layers=2, dropout_rate=0.1)
    (root / "train.json").write_text(json.dumps(reader_examples(24)))
    base = [
        "--train_data", str(root / "train.json"), "--model_name_or_path", str(model_dir), "--checkpoint_dir", str(root),
        "--n_context", "2", "--text_maxlength", "16", "--per_gpu_batch_size", "2", "--device", args.device,
        "--precision", "fp16", "--total_steps", "8", "--eval_freq", "100", "--save_freq", "100", "--lr", "1e-3",
    ]  # fmt: skip
    original = trainer.Trainer._train_step

    def step_then_sigterm(self, batch):
        original(self, batch)
        if self.step == 3 and os.environ.get("GPU_CHECK_SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.Trainer._train_step = step_then_sigterm
    try:
        train_reader.main([*base, "--name", "straight"])
        os.environ["GPU_CHECK_SIGTERM"] = "1"
        try:
            train_reader.main([*base, "--name", "resumed"])
            raise AssertionError("SIGTERM did not stop the run")
        except SystemExit as e:
            if e.code != dist.EXIT_INTERRUPTED:
                raise AssertionError(f"exit code {e.code}, not {dist.EXIT_INTERRUPTED}") from None
        del os.environ["GPU_CHECK_SIGTERM"]
        stopped = checkpoint.load_training_state(checkpoint.latest(root / "resumed"))["step"]
        train_reader.main([*base, "--name", "resumed"])
    finally:
        trainer.Trainer._train_step = original
        os.environ.pop("GPU_CHECK_SIGTERM", None)
    a, b = (load_file(checkpoint.latest(root / n) / "model.safetensors") for n in ("straight", "resumed"))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    log(f"stopped at step {stopped}, resumed to 8; max |straight - resumed| weight difference {diff:.2e}")
    if not math.isfinite(diff) or diff > 1e-3:
        raise AssertionError(f"resumed fp16 run differs from the straight one by {diff:.2e}")
    return f"SIGTERM at step {stopped}, resumed; max weight diff {diff:.1e}"


def packing_bench(args, log) -> str:
    if args.quick:
        argv = [
            "--layers",
            "1",
            "--d_model",
            "64",
            "--d_ff",
            "128",
            "--heads",
            "4",
            "--vocab",
            "1000",
            "--passages",
            "10",
            "--repeats",
            "1",
        ]
    else:
        argv = [
            "--precision",
            "bf16",
            "--layers",
            "12",
            "--d_model",
            "768",
            "--d_ff",
            "3072",
            "--heads",
            "12",
            "--passages",
            "100",
            "--repeats",
            "5",
        ]
    argv += ["--device", args.device, "--profiles", "dpr", "--skip", "generate", "overhead"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        bench_packing.main(argv)
    text = buffer.getvalue()
    log(f"bench_packing.py {' '.join(argv)}\n{text}")
    lines = [
        line.strip()
        for line in text.splitlines()
        if "train step" in line or "MFU" in line or "saved activations" in line
    ]
    return " | ".join(lines)


PARTS = {
    "masked_row": masked_row,
    "packed_step": packed_step,
    "wo_fp16": wo_dtype(torch.float16),
    "wo_bf16": wo_dtype(torch.bfloat16),
    "collectives": collectives,
    "run_loop": run_loop,
    "resume_fp16": resume_fp16,
    "bench_packing": packing_bench,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes (the test suite's CPU run)")
    p.add_argument("--out", type=Path, default=None, help="directory for table.md, table.json and the logs")
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    p.add_argument("--part_timeout", type=int, default=240, help="seconds for each subprocess")
    args = p.parse_args(argv)
    args.out = (args.out or Path(tempfile.mkdtemp(prefix="gpu_check-"))).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: every part skipped; run with --device cpu for the CPU mode")
    name = (
        torch.cuda.get_device_name(args.device)
        if torch.cuda.is_available() and args.device.startswith("cuda")
        else "CPU"
    )
    rows = []
    for part in args.parts.split(","):
        lines: list[str] = []
        t0 = time.time()
        try:
            if args.device.startswith("cuda") and not torch.cuda.is_available():
                raise Skip("no CUDA device")
            with contextlib.redirect_stdout(io.StringIO()) as printed:  # the scripts' own logs go to the part's log
                try:
                    status, note = "ok", PARTS[part](args, lines.append)
                finally:
                    lines.append(printed.getvalue())
        except Skip as e:
            status, note = "skip", str(e)
        except Exception as e:  # a failed part is reported, the others still run
            status, note = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            lines.append(traceback.format_exc())
        finally:
            with contextlib.suppress(Exception):
                dist.destroy()
        rows.append({"part": part, "status": status, "seconds": round(time.time() - t0, 1), "note": note})
        (args.out / f"{part}.log").write_text("\n".join(lines) + "\n")
    header = f"gpu_check on {args.device} ({name}), torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    table = [header, "", "| part | status | s | note |", "|---|---|---|---|"]
    table += [f"| {r['part']} | {r['status']} | {r['seconds']} | {r['note']} |" for r in rows]
    (args.out / "table.md").write_text("\n".join(table) + "\n")
    (args.out / "table.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    print("\n".join(table))
    print(f"logs in {args.out}")
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
