"""Does NT work on every torchvision classification model? Writes docs/ZOO.md.

    .venv/bin/python benchmarks/zoo.py [--k 2] [--timeout 600] [--max-gib 8] [--models resnet18 ...]
                                       [--resume zoo.log] [--analyse-only]

For every builder in `torchvision.models.list_models(module=torchvision.models)`
(10 classes, random weights, random BatchNorm statistics, zero-initialised weight matrices
given small random values, eval mode, one
[2, 3, S, S] input with S = 64, or 75 for Inception v3, 224 for ViT, Swin and MaxViT, 256 for Swin v2):

* the channel analysis first runs on a copy on the meta device (no memory), so a
  refusal costs no real model and gives the reason at once;
* otherwise k members are built, `concat` is compared with the output average
  (relative error: max |wide - average| / max |average|), and `fuse(method="nt")`
  is timed (one call, analysis included), its result loaded with `strict=True`
  into a fresh instance and run; the peak extra memory of a second `fuse` call is
  sampled as in `ntdist bench fusion`.

With `--models`, the rows of those models replace theirs in the existing
`--out` file (others are kept) and its counts are recomputed. Each model runs
in its own process with a time limit; a model whose k members,
wide model and fused model would need more than `--max-gib` is analysed but not
measured. Every row is printed as a JSON line; `--resume LOG` reuses the rows of
such a log and runs only the models it lacks, and `--analyse-only` runs only the
(meta-device) analysis for them. Re-run whenever torchvision is upgraded; the k = 3 table is
`--k 3 --out docs/ZOO_k3.md`.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch
import torchvision

from ntdist.commands.bench import peak_extra_memory
from ntdist.errors import UserError
from ntdist.fusion import Ensemble, analyze, concat, fuse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"inception_v3": 75, "maxvit_t": 224, "vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224, "vit_l_32": 224,
         "vit_h_14": 224, "swin_t": 224, "swin_s": 224, "swin_b": 224, "swin_v2_t": 256, "swin_v2_s": 256,
         "swin_v2_b": 256}


def build(name: str) -> torch.nn.Module:
    kwargs = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
    return torchvision.models.get_model(name, **kwargs)


def _random_bn(model):
    with torch.no_grad():      # zero-initialised weight matrices (ViT's head) would make every output zero
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.02)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def _reason(err: Exception) -> str:
    return str(err).split("; supported:")[0].splitlines()[0]


def measure(name: str, k: int, max_bytes: float, analyse_only: bool = False) -> dict:
    size = SIZES.get(name, 64)
    try:
        with torch.device("meta"):
            meta = build(name).eval()
    except Exception:  # noqa: BLE001 - builders that compute their widths with tensors (RegNet) need real ones
        meta = build(name).eval()
    device = next(meta.parameters()).device
    params = sum(p.numel() for p in meta.parameters())
    row = {"model": name, "params": params, "concat_error": None, "nt_seconds": None, "nt_extra_mib": None,
           "refused": ""}
    try:
        plan = analyze(meta, torch.zeros(2, 3, size, size, device=device))
    except UserError as err:
        row["refused"] = _reason(err)
        return row
    need = params * 4 * (3 * k + 2)
    if analyse_only:
        row["refused"] = "accepted by the analysis; not measured (no time left in this run)"
        return row
    if need > max_bytes:
        row["refused"] = f"accepted by the analysis; not measured here (needs about {need / 2**30:.0f} GiB)"
        return row
    torch.manual_seed(0)
    models = [_random_bn(meta if device.type == "cpu" and i == 0 else build(name)) for i in range(k)]
    del meta
    x = torch.randn(2, 3, size, size)
    if plan.inexact:
        row["refused"] = "concat: " + plan.inexact.split(": ", 1)[1].split(";")[0]
    else:
        wide = concat(models, example_inputs=x)
        with torch.no_grad():
            ref, out = Ensemble(models)(x), wide(x)
        row["concat_error"] = float((out - ref).abs().max() / ref.abs().max())
        del wide, out
    start = time.perf_counter()
    fused = fuse(models, schedule="flat", example_inputs=x)
    row["nt_seconds"] = time.perf_counter() - start
    fresh = build(name).eval()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        if not torch.isfinite(fresh(x)).all():
            row["refused"] = "NT result is not finite"
    del fused, fresh
    row["nt_extra_mib"] = peak_extra_memory(lambda: fuse(models, schedule="flat", example_inputs=x)) / 2**20
    return row


def _cell(v, fmt):
    return "" if v is None else format(v, fmt)


COLUMNS = ("model", "params", "concat_error", "nt_seconds", "nt_extra_mib", "refused")


def read_rows(path: str) -> list:
    """The rows of an existing ZOO.md table (so `--models` updates those rows and keeps the others)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("| ") or len(cells) != len(COLUMNS) or cells[0] == "model":
                continue
            model, params, error, seconds, mib, note = cells
            rows.append({"model": model, "params": float(params.rstrip("M")) * 1e6,
                         "concat_error": float(error) if error else None,
                         "nt_seconds": float(seconds) if seconds else None,
                         "nt_extra_mib": float(mib) if mib else None, "refused": note})
    return rows


def _old_text(path: str):
    """The first paragraph (how the table was made) and the bullet lines of an existing ZOO.md."""
    if not os.path.exists(path):
        return None, []
    with open(path) as f:
        lines = f.read().splitlines()
    return (lines[2] if len(lines) > 2 else None), [line for line in lines if line.startswith("- ")]


def totals(rows) -> list:
    """(key, bullet) of every count the table sums up; the key is how the bullet starts."""
    exact = [r for r in rows if r["concat_error"] is not None and r["concat_error"] < 1e-5]
    fused = [r for r in rows if r["nt_seconds"] is not None and not r["refused"].startswith("NT")]
    accepted = [r for r in rows if r["refused"].startswith("accepted by the analysis")]
    refused = [r for r in rows if r["nt_seconds"] is None and r["refused"].startswith("cannot fuse")]
    return [("- concat equals", f"- concat equals the output average (relative error < 1e-5): "
                                f"**{len(exact)} of {len(rows)}**"),
            ("- NT fuses", f"- NT fuses to the original architecture (strict load, forward runs): "
                           f"**{len(fused)} of {len(rows)}**"),
            ("- accepted by the analysis", f"- accepted by the analysis but not measured: **{len(accepted)}**"),
            ("- refused", f"- refused by the analysis: **{len(refused)}**")]


def _merge_bullets(new, old):
    """The new counts, written into the old bullets where they exist (keeping their notes), then other old notes."""
    out, used = [], set()
    for key, bullet in new:
        match = next((line for line in old if line.startswith(key)), None)
        if match is None:
            out.append(bullet)
            continue
        used.add(match)
        out.append(re.sub(r"\*\*[^*]*\*\*", lambda _: re.search(r"\*\*[^*]*\*\*", bullet).group(0), match, count=1))
    return out + [line for line in old if line not in used]


def write_markdown(rows, k: int, path: str, seconds: float, merge: bool = False):
    """Write ZOO.md; with `merge`, `rows` replace or join the rows already there and the counts are redone."""
    run = (f"`benchmarks/zoo.py --k {k}` on {platform.machine()} with {torch.get_num_threads()} torch threads "
           f"(torch {torch.__version__}, torchvision {torchvision.__version__})"
           + (f", {seconds / 60:.0f} min in all" if seconds >= 60 else ""))    # rows from --resume take no time
    intro, old_bullets = _old_text(path) if merge else (None, [])
    if merge:
        new = {r["model"]: r for r in rows}
        rows = sorted([r for r in read_rows(path) if r["model"] not in new] + list(new.values()),
                      key=lambda r: r["model"])
        intro = (intro + " " if intro else "") + (f"Rows of {', '.join(sorted(new))} written by {run}.")
    else:
        intro = (f"Written by {run}, on a shared 2-core machine: times are indicative. Random weights, random "
                 "BatchNorm statistics, 10 classes, eval mode, input [2, 3, 64, 64] (Inception v3 75, ViT, Swin "
                 "and MaxViT 224, Swin v2 256).")
    lines = ["# NT on the torchvision classification zoo", "", intro, ""]
    lines += _merge_bullets(totals(rows), old_bullets)
    lines += [
        "",
        "Relative error: max |wide - average| / max |average|. NT seconds: one `fuse` call, tracing included. "
        "Peak extra MiB: resident memory above the start of a second call, sampled every 0.2 ms.",
        "",
        "| model | parameters | concat rel. error | NT fuse s | peak extra MiB | refused / note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {_cell(r['concat_error'], '.1e')} | "
                     f"{_cell(r['nt_seconds'], '.2f')} | {_cell(r['nt_extra_mib'], '.0f')} | "
                     f"{r['refused'].replace('|', '/')} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model")
    parser.add_argument("--max-gib", type=float, default=8.0, help="memory a measured model may need")
    parser.add_argument("--models", nargs="*", help="default: every classification model")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "ZOO.md"))
    parser.add_argument("--resume", help="a log of JSON rows from an earlier run: reuse them")
    parser.add_argument("--analyse-only", action="store_true", help="only analyse the models not yet measured")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.k, args.max_gib * 2**30, args.analyse_only)))
        return
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    done_rows = {}
    if args.resume:
        with open(args.resume) as f:
            done_rows = {r["model"]: r for r in (json.loads(line) for line in f if line.startswith("{"))}
    rows, start = [], time.perf_counter()
    for name in names:
        if name in done_rows:
            rows.append(done_rows[name])
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--k", str(args.k),
               "--max-gib", str(args.max_gib)] + (["--analyse-only"] if args.analyse_only else [])
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
            lines = done.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                "model": name, "params": 0, "concat_error": None, "nt_seconds": None, "nt_extra_mib": None,
                "refused": "failed: " + (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "params": 0, "concat_error": None, "nt_seconds": None, "nt_extra_mib": None,
                   "refused": f"not measured: over the {args.timeout} s limit"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    write_markdown(rows, args.k, args.out, time.perf_counter() - start, merge=bool(args.models))


if __name__ == "__main__":
    main()
