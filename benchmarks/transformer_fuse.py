"""What fusing transformer-sized Hugging Face models costs on a CPU, against copying their weights.

For k = 2 random-initialised members (seeds 0 and 1, nothing downloaded) of

- `bert`: a BertForSequenceClassification of BERT-base's widths (hidden 768, 12 heads, intermediate
  3072, vocab 30522) with 2 layers;
- `gpt2`: a GPT2ForSequenceClassification of GPT-2 small's size (n_embd 768, 12 layers, 12 heads,
  vocab 50257, pad_token_id set), classifying each row's last non-padding token;

each wrapped to return its logits, with example inputs of 2 rows x 32 token ids (the second row
padded at the end), the benchmark measures in one process:

- the floors: `clone`, `{k: v.clone()}` of both members' state dicts; `clone+files`, the same clones
  also written to safetensors files in a temporary folder and read back;
- `analyze`: `ntdist.fusion.analyze` of member 0 (torch.export and the channel walk);
- `nt`, `avg`: `fuse(members, method=...)`, NT's time split into its call of `analyze` (timed
  inside the call) and the rest (concatenation, importance, selection);
- `concat`: the wide model that computes the members' average logits;
- `analyze, export kept`: `analyze` again with the last export kept (`analysis.export` keeps one).

Every other call starts without a kept export (`drop_kept_export` before the call, outside the timing),
as a first `fuse` in a process does. Each is called once under `ntdist bench fusion`'s RSS sampler
(its peak RSS above the RSS before the call), then `--runs` times without it, unless that first call
took over a minute; the median wall time of those is reported, and the process's peak RSS at the
end. Run with one thread, in the background:

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/transformer_fuse.py [--models bert gpt2]
        [--runs 3] [--out transformer_fuse.json] > transformer_fuse.log 2>&1 &

It prints one line per measured call and a table, and writes the rows as JSON to `--out`. Figures
and the machine: docs/PERFORMANCE.md, "Transformers".
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import tempfile
import time

import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file, save_file

from ntdist.commands.bench import MIB, peak_extra_memory
from ntdist.fusion import analyze, concat, fuse, nt
from ntdist.fusion.analysis.export import drop_kept_export

K, BATCH, TOKENS, LABELS = 2, 2, 32, 2
SLOW_S = 60.0       # a call slower than this is not repeated
MODELS = {
    "bert": lambda t: t.BertForSequenceClassification(t.BertConfig(
        hidden_size=768, num_attention_heads=12, intermediate_size=3072, vocab_size=30522, num_hidden_layers=2,
        num_labels=LABELS, pad_token_id=0)),
    "gpt2": lambda t: t.GPT2ForSequenceClassification(t.GPT2Config(
        n_embd=768, n_layer=12, n_head=12, vocab_size=50257, num_labels=LABELS, pad_token_id=0)),
}


class Logits(nn.Module):
    """A `transformers` classifier returning its logits as one tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(ids, attention_mask=mask).logits


def members(name: str):
    out = []
    for seed in range(K):
        torch.manual_seed(seed)
        out.append(Logits(MODELS[name](transformers)).eval())
    torch.manual_seed(100)
    ids = torch.randint(1, out[0].model.config.vocab_size, (BATCH, TOKENS))
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    ids[1, TOKENS // 2:], mask[1, TOKENS // 2:] = 0, 0
    return out, (ids, mask)


def clone(models):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]


def clone_files(models, folder: str):
    """Every member's tensors cloned, written as safetensors and read back."""
    copies = clone(models)
    paths = []
    for i, tensors in enumerate(copies):
        paths.append(os.path.join(folder, f"member{i}.safetensors"))
        save_file(tensors, paths[-1])
    return [load_file(p) for p in paths]


@contextlib.contextmanager
def analysis_timed(spent: list):
    """`fuse`'s calls of `analyze` timed: their seconds are appended to `spent`."""
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    original, nt.analyze = nt.analyze, timed
    try:
        yield
    finally:
        nt.analyze = original


def measure(label: str, fn, runs: int, cold: bool = True) -> dict:
    """The peak extra RSS of one call of `fn` under the sampler, then the median wall time of `runs` calls
    without it (the first call's time alone if it exceeded SLOW_S), with the median time of the `analyze`
    calls inside. `cold` drops the kept export before each call; garbage is collected outside the timing."""
    times, analysis = [], []

    def timed():
        if cold:
            drop_kept_export()
        spent = []
        with analysis_timed(spent):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        analysis.append(sum(spent))
        return out

    peak = peak_extra_memory(timed) / MIB
    print(f"  {label}: {times[-1]:.2f} s with the sampler, peak +{peak:.0f} MiB", flush=True)
    if times[0] <= SLOW_S:
        times.clear(), analysis.clear()
        for _ in range(runs):
            gc.collect()
            timed()
            print(f"  {label}: {times[-1]:.2f} s (analyze inside {analysis[-1]:.2f} s)", flush=True)
    return {"seconds": statistics.median(times), "analyze_inside": statistics.median(analysis),
            "calls": len(times), "peak_extra_mib": peak}


def check(models, x) -> str:
    """The wide model's logits against the members' average, and NT's class: the figures are of working fusions."""
    drop_kept_export()
    average = sum(m(*x) for m in models) / len(models)
    error = ((concat(models, example_inputs=x)(*x) - average).abs().max() / average.abs().max()).item()
    fused = fuse(models, method="nt", example_inputs=x)
    assert error < 1e-4 and type(fused) is type(models[0]) and fused(*x).shape == average.shape, error
    return f"concat's logits against the average: relative error {error:.1e}; nt returns {type(fused).__name__}"


def bench(name: str, runs: int) -> list:
    models, x = members(name)
    params = sum(p.numel() for p in models[0].parameters())
    print(f"{name}: {params / 1e6:.1f} M parameters per member, k = {K}", flush=True)
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        print(f"  {check(models, x)}", flush=True)
        calls = {
            "clone": lambda: clone(models),
            "clone+files": lambda: clone_files(models, folder),
            "analyze": lambda: analyze(models[0], x),
            "nt": lambda: fuse(models, method="nt", example_inputs=x),
            "avg": lambda: fuse(models, method="avg", example_inputs=x),
            "concat": lambda: concat(models, example_inputs=x),
            "analyze, export kept": lambda: analyze(models[0], x),
        }
        rows = [{"model": name, "what": what, "params_m": params / 1e6,
                 **measure(f"{name} {what}", fn, runs, cold="kept" not in what)} for what, fn in calls.items()]
    return rows


def table(rows: list) -> str:
    lines = ["| model | call | median | calls | x clone | x clone+files | peak RSS above start |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        floors = [next(r["seconds"] for r in rows if r["model"] == row["model"] and r["what"] == what)
                  for what in ("clone", "clone+files")]
        parts = [(row["what"], row["seconds"], f"{row['calls']}", f"{row['peak_extra_mib']:.0f} MiB")]
        if row["what"] == "nt":
            inside = row["analyze_inside"]
            parts += [("nt: analyze", inside, "", ""), ("nt: the rest", row["seconds"] - inside, "", "")]
        for what, seconds, calls, peak in parts:
            lines.append(f"| {row['model']} | {what} | {seconds:.2f} s | {calls} | {seconds / floors[0]:.1f}x | "
                         f"{seconds / floors[1]:.2f}x | {peak} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="transformer_fuse.json")
    args = parser.parse_args()
    rows = [row for name in args.models for row in bench(name, args.runs)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(table(rows))
    print(f"process peak RSS {peak:.0f} MiB; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()}")
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "peak_rss_mib": peak}, f, indent=1)


if __name__ == "__main__":
    main()
