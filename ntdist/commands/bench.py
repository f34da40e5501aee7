"""Fusion cost benchmark (paper Table 8): time and peak extra memory of avg, NT and OT.

Setting: two untrained MLPs 3072 -> W -> W -> 10 without bias, example input
[256, 3, 32, 32]. Time is the median wall time of `repeats` calls after one
warm-up call. Memory is the peak *extra* resident memory of one further call:
torch's CPU allocations bypass tracemalloc, so a background thread samples the
process RSS from /proc/self/statm every 0.2 ms while the call runs, and the
RSS right before the call (after garbage collection and returning freed heap
pages to the OS with malloc_trim) is subtracted. Sampling can miss a spike
shorter than the interval, so the figure is a (tight) lower bound. OT is
skipped, with a message, where its predicted memory exceeds the available memory.
Each measured case prints one progress line; the end prints a table and where
the CSV went. `QUICK` is the same measurement on fewer widths and repeats.
"""

import csv
import ctypes
import gc
import io
import os
import statistics
import threading
import time
from typing import Dict, List, Optional, Sequence

import torch

from ntdist.errors import UserError
from ntdist.fusion.baselines import average
from ntdist.fusion.nt import fuse
from ntdist.models import build_model
from ntdist.records.files import atomic_write_text

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
WIDTHS, REPEATS = (256, 512, 1024, 2048, 4096), 5    # `ntdist bench fusion`: about 1.5 minutes on 2 cores
QUICK = {"widths": (256, 512), "repeats": 2}         # `--quick`: seconds


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_extra_memory(fn) -> int:
    """Peak RSS above the pre-call RSS while `fn()` runs, sampled every 0.2 ms (bytes)."""
    _trim()
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
        peak[0] = max(peak[0], _rss())
    finally:
        done.set()
        thread.join()
    del result
    return max(0, peak[0] - base)


def peak_tensor_bytes(fn) -> int:
    """The most CPU memory that tensors allocated inside `fn` held at once: torch's profiler records every
    allocation and free (the legacy profiler: Kineto's first start takes seconds probing for GPUs)."""
    with torch.autograd.profiler.profile(profile_memory=True, use_kineto=False) as prof:
        fn()
    held = peak = 0
    for event in sorted(prof.function_events, key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def median_time(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn` after one warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        del out
    return statistics.median(times)


def predicted_ot_bytes(width: int, model_bytes: int) -> int:
    """Rough OT peak: one aligned copy and the average, plus per-space n x n cost/transport arrays."""
    return 2 * model_bytes + width * width * (4 + 8 + 8 + 48)


def bench_fusion(widths: Sequence[int] = WIDTHS, repeats: int = REPEATS,
                 out_csv: str = "bench_fusion.csv", methods: Sequence[str] = ("avg", "nt", "ot"),
                 seed: int = 0, threads: Optional[int] = None) -> List[Dict]:
    """Time and memory of each method per width; writes `out_csv`, prints a table, returns the rows.

    `threads` sets torch's intra-op thread count for the run (default: leave it as is).
    """
    check_bench_args(widths, repeats, out_csv)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bench(widths, repeats, out_csv, methods, seed)
    finally:
        torch.set_num_threads(before)


def check_bench_args(widths: Sequence[int], repeats: int, out_csv: Optional[str]) -> None:
    """Every argument checked before any work, so a typo never costs a whole benchmark."""
    if not widths or any(w < 1 for w in widths):
        raise UserError(f"--widths must be positive numbers of units, e.g. --widths 256 512; got {list(widths)}")
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    check_out_csv(out_csv)


def write_csv(path: str, rows: List[Dict], fields: Sequence[str]) -> None:
    """The rows as CSV, written atomically (an interrupted write keeps the previous file)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(fields))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in fields})
    atomic_write_text(path, text.getvalue())


def check_out_csv(out_csv: Optional[str]) -> None:
    """A benchmark's --out: a file in a writable folder (checked before the benchmark runs)."""
    if out_csv:
        folder = os.path.dirname(os.path.abspath(out_csv))
        if os.path.isdir(out_csv):
            raise UserError(f"--out '{out_csv}' is a folder; give a CSV file name such as {out_csv}/bench.csv")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UserError(f"cannot write --out '{out_csv}': folder '{folder}' is missing or not writable")
        if os.path.exists(out_csv):
            print(f"note: replacing the existing {out_csv}")


def progress(index: int, total: int, text: str) -> None:
    """One line per measured case ('[3/6] ...'), flushed so that a pipe or a log shows it at once."""
    print(f"[{index}/{total}] {text}", flush=True)


def wrote(out_csv: Optional[str]) -> None:
    if out_csv:
        print(f"wrote CSV to {os.path.abspath(out_csv)}")


def _bench(widths, repeats, out_csv, methods, seed) -> List[Dict]:
    x = torch.randn(256, 3, 32, 32)
    rows = []
    total = len(widths) * len(methods)
    for width in widths:
        torch.manual_seed(seed)
        models = [build_model("mlp", {"input_dim": 3072, "width": width, "depth": 2, "bias": False})
                  for _ in range(2)]
        model_bytes = sum(t.numel() * t.element_size() for m in models for t in m.state_dict().values())
        calls = {"avg": lambda: average(models),
                 "nt": lambda: fuse(models, method="nt", example_inputs=x),
                 "ot": lambda: fuse(models, method="ot", example_inputs=x)}
        for method in methods:
            row = {"width": width, "method": method, "models_mib": round(model_bytes / MIB, 1)}
            if method == "ot" and predicted_ot_bytes(width, model_bytes) > _available():
                print(f"skipping ot at width {width}: predicted {predicted_ot_bytes(width, model_bytes) / MIB:.0f} MiB "
                      f"exceeds the {_available() / MIB:.0f} MiB available")
                row.update(seconds=None, peak_extra_mib=None, skipped="predicted memory exceeds available")
                rows.append(row)
                progress(len(rows), total, f"width {width} {method}: skipped")
                continue
            seconds = median_time(calls[method], 1 if method == "ot" and width >= 2048 else repeats)
            extra = peak_extra_memory(calls[method])
            row.update(seconds=round(seconds, 4), peak_extra_mib=round(extra / MIB, 1), skipped="")
            rows.append(row)
            progress(len(rows), total, f"width {width} {method}: {seconds:.4f} s, {extra / MIB:.1f} MiB extra")
        for row in rows[-len(methods):]:
            avg = next((r for r in rows if r["width"] == width and r["method"] == "avg"), None)
            if avg and avg["seconds"] and row["seconds"]:
                row["time_vs_avg"] = round(row["seconds"] / avg["seconds"], 2)
            if row["peak_extra_mib"] is not None:
                row["memory_vs_models"] = round(row["peak_extra_mib"] / row["models_mib"], 2)
        del models, calls
        _trim()
    fields = ["width", "method", "seconds", "time_vs_avg", "peak_extra_mib", "models_mib", "memory_vs_models",
              "skipped"]
    if out_csv:
        write_csv(out_csv, rows, fields)
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"{'width':>6} {'method':>6} {'median s':>9} {'x avg':>6} {'peak extra MiB':>15} {'x models':>9}")
    for r in rows:
        secs = "skipped" if r["seconds"] is None else f"{r['seconds']:.4f}"
        mem = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        print(f"{r['width']:>6} {r['method']:>6} {secs:>9} {r.get('time_vs_avg', '-')!s:>6} {mem:>15} "
              f"{r.get('memory_vs_models', '-')!s:>9}")
    wrote(out_csv)
    return rows
