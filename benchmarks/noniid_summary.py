"""Tables of `configs/paper/noniid_mnist1d.yaml`: NT (with repair), averaging, OT and plain NT on members that
saw different data, one-shot and fine-tuned, against the members, their ensemble and the control, per sweep
point, with paired differences over seeds.

Plain NT (no repair) comes from a second set of runs on the very same members (`fusion.members` naming the
sweep's member files, `fusion.repair=none`, `fusion.methods=[nt]`): the same seeds, control and fine-tuning.
    PYTHONPATH=. .venv/bin/python benchmarks/noniid_summary.py SWEEP_DIR [PLAIN_DIR]
PLAIN_DIR holds one folder per sweep point (the point's name with ',' and '=' written as '_'), each with
`seed<s>/results.json`.
"""

import json
import os
import statistics
import sys

from scipy import stats

from ntdist.records.stats import paired


def best(finetune, finetune_val):
    """Test accuracy at the fine-tuning epoch with the highest validation accuracy (the earliest on ties)."""
    return finetune[max(range(len(finetune_val)), key=lambda i: (finetune_val[i], -i))]


def rows_of(point_dir, plain_dir):
    rows = []
    for seed_dir in sorted(os.listdir(point_dir)):
        path = os.path.join(point_dir, seed_dir, "results.json")
        if not os.path.exists(path):
            continue
        r = json.load(open(path))
        row = {"best member": r["best_member"], "ensemble": r["ensemble"],
               "control + ft": best(r["control"]["finetune"], r["control"]["finetune_val"])}
        for method, label in (("nt", "NT + repair"), ("avg", "Avg"), ("ot", "OT")):
            m = r["fusion"][method]
            row[label] = m["post_fusion"]
            row[label + " + ft"] = best(m["finetune"], m["finetune_val"])
        plain = os.path.join(plain_dir or "", seed_dir.replace("=", ""), "results.json")
        if plain_dir and os.path.exists(plain):
            p = json.load(open(plain))
            assert p["members"] == r["members"] and p["control"] == r["control"], plain
            row["NT"] = p["fusion"]["nt"]["post_fusion"]
            row["NT + ft"] = best(p["fusion"]["nt"]["finetune"], p["fusion"]["nt"]["finetune_val"])
        rows.append(row)
    return rows


def pct(values):
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def diff(rows, a, b):
    x, y = [r[a] for r in rows], [r[b] for r in rows]
    d = paired(x, y)
    p = stats.ttest_rel(x, y).pvalue if d["std"] > 0 else float("nan")
    return f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f}, p = {p:.2g}, {d['wins']}/{d['losses']}"


def main():
    sweep, plain = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    for point in sorted(os.listdir(sweep)):
        point_dir = os.path.join(sweep, point)
        if not os.path.isdir(point_dir):
            continue
        rows = rows_of(point_dir, plain and os.path.join(plain, point.replace(",", "_").replace("=", "_")))
        if not rows:
            continue
        have_plain = all("NT" in r for r in rows)
        print(f"\n### {point} ({len(rows)} seeds{'' if have_plain else ', no plain NT'})\n")
        print("| | one-shot | + 10 epochs (best on val) |\n|---|---|---|")
        print(f"| best member | {pct([r['best member'] for r in rows])} | {pct([r['control + ft'] for r in rows])} "
              "(control) |")
        print(f"| ensemble | {pct([r['ensemble'] for r in rows])} | |")
        for label in ("NT", "NT + repair", "Avg", "OT"):
            if all(label in r for r in rows):
                print(f"| {label} | {pct([r[label] for r in rows])} | {pct([r[label + ' + ft'] for r in rows])} |")
        print("\n| paired difference (points) | mean ± std, p, ahead/behind |\n|---|---|")
        for a, b in (("NT + repair", "best member"), ("NT + repair", "NT"), ("NT + repair", "OT"),
                     ("NT + repair", "Avg"), ("NT + repair + ft", "control + ft"), ("NT + repair + ft", "NT + ft"),
                     ("NT + repair + ft", "OT + ft"), ("ensemble", "control + ft")):
            if all(a in r and b in r for r in rows):
                print(f"| {a} − {b} | {diff(rows, a, b)} |")


if __name__ == "__main__":
    main()
