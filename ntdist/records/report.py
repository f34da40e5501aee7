"""A Markdown report with tables and PNG plots for one or many finished runs.

    ntdist report runs/sweep            # every sub-directory holding a results.json

The runs are grouped by `records.groups` (equal configs apart from the seed form
one group, a sweep point). Each group
gets a table in the layout of the NT paper (mean ± std over seeds, in percent), a
plot of accuracy against fine-tuning epoch and the paired differences per seed
(`records.paired`); when the groups differ in fusion.k or in sparsity, accuracy
is also plotted against them. The report's "Groups" section lists the folders of
each group and the keys that tell the groups apart.
"""

import os
from typing import List, Optional

from ntdist.errors import UserError
from ntdist.options import format_value
from ntdist.records.files import atomic_write_text, replacing
from ntdist.records.groups import NON_SEMANTIC_KEYS, SEED_KEY, Group, differing_keys, group_runs
from ntdist.records.manifest import add_to_manifest
from ntdist.records.paired import KEPT_GAIN_NOTE, epoch_title, kept_gain_table, paired_section, pyplot
from ntdist.records.stats import checkpoint_epochs, finetune_epochs, mean_std, merged_summary

REPORT_FILE, PLOTS = "report.md", ("accuracy_vs_k.png", "accuracy_vs_sparsity.png")
METHOD_NAMES = {"avg": "Avg", "ot": "OT", "nt": "NT"}
COLORS = {"avg": "C0", "ot": "C1", "nt": "C2", "control": "C3"}
BEST_NOTE = ("\"best\" is the test accuracy at the fine-tuning epoch with the highest validation accuracy "
             "(ties: the earliest). The NT authors' code reported the maximum test accuracy over epochs, "
             "which selects on the test set and flatters every method.")


def _seeds_text(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def groups_section(groups: List[Group]) -> List[str]:
    """The report's "Groups" section: which runs were pooled, which were left out, and what tells groups apart."""
    ignored = ", ".join(f"`{k}`" for k in NON_SEMANTIC_KEYS if k != SEED_KEY)
    text = ["## Groups", "", f"Runs are pooled as seeds of one group when their config.yaml files differ only in "
            f"`{SEED_KEY}` (and in {ignored}, which do not change the results); a second run of a seed "
            "is the same sample again and is left out.", ""]
    differing = differing_keys(groups)
    if len(groups) > 1:
        text += ["Keys that differ between groups: " + ", ".join(f"`{k}`" for k in differing) + ".", ""]
    for g in groups:
        seeds = ", ".join(format_value(s) for s in g.seeds)
        text.append(f"- {g.label} ({_seeds_text(len(g.seeds))}: {seeds}): " + ", ".join(f"`{d}`" for d in g.dirs))
        for left_out, seed, kept in g.duplicates:
            text.append(f"  - left out: `{left_out}`, seed {format_value(seed)} again (kept `{kept}`)")
    return text + [""]


def _pct(stat: Optional[dict]) -> str:
    return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}" if stat else "—"


def _methods(stats: dict) -> List[str]:
    known = [m for m in METHOD_NAMES if m in stats["methods"]]
    return known + sorted(m for m in stats["methods"] if m not in METHOD_NAMES)


def table_rows(stats: dict) -> List[List[str]]:
    """The paper-style table of one group, title row first: after fusion, after the checkpoint epochs, best."""
    epochs = checkpoint_epochs(finetune_epochs(stats))
    blank = ["—"] * (len(epochs) + 1)

    def at(curve):
        return [_pct(curve[e - 1] if len(curve) >= e else None) for e in epochs]

    rows = [["", "after fusion"] + [epoch_title(e) for e in epochs] + ["best"],
            ["Ensemble", _pct(stats["ensemble"])] + blank,
            ["Members (mean)", _pct(stats["members_mean"])] + blank,
            ["Best member", _pct(stats["best_member"])] + blank]
    if stats["control"]:
        c = stats["control"]
        rows.append(["Best member + extra epochs", "—"] + at(c["finetune"]) + [_pct(c["best"])])
    for m in _methods(stats):
        b = stats["methods"][m]
        rows.append([METHOD_NAMES.get(m, m), _pct(b["post_fusion"])] + at(b["finetune"]) + [_pct(b["best"])])
    return rows


def markdown_table(rows: List[List[str]]) -> str:
    lines = ["|" + "|".join(f" {c} " if c else " " for c in r) + "|" for r in rows]
    return "\n".join(lines[:1] + ["|---" * len(rows[0]) + "|"] + lines[1:])


def plain_table(rows: List[List[str]]) -> str:
    """The same table for a terminal: columns padded, the first left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in rows)


def table(group: Group) -> str:
    """The paper-style table of one group as Markdown."""
    return markdown_table(table_rows(group.stats))


def text_tables(run_dirs: List[str]) -> str:
    """Every group's table as plain text, each under its label, for the terminal."""
    blocks = []
    for group in group_runs(run_dirs):
        head = f"{group.label} ({_seeds_text(len(group.seeds))}), test accuracy (%), mean ± std over seeds"
        blocks.append(head + "\n" + plain_table(table_rows(group.stats)))
    return "\n\n".join(blocks)


def diversity_text(group: Group) -> Optional[str]:
    """One line of mean ± std diversity numbers (and warnings) when the runs recorded them."""
    divs, stats = [r.diversity for r in group.results if isinstance(r.diversity, dict)], {}
    if not divs:
        return None
    for key in ("disagreement_mean", "duplicate_fraction_mean"):
        values = [d[key] for d in divs if d.get(key) is not None]
        stats[key] = dict(zip(("mean", "std"), mean_std(values))) if values else None
    text = (f"Diversity over {_seeds_text(len(divs))}: prediction disagreement {_pct(stats['disagreement_mean'])} %, "
            f"units with a near-copy in another member {_pct(stats['duplicate_fraction_mean'])} %.")
    warnings = [d["warning"] for d in divs if d.get("warning")]
    if warnings:
        text += f"\n\n**Warning ({len(warnings)} of {len(divs)} seeds):** {warnings[0]}"
    return text


def plot_curves(group: Group):
    """Accuracy against fine-tuning epoch per method (epoch 0 = right after fusion), ±std bands."""
    s = group.stats
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    series = [(m, METHOD_NAMES.get(m, m), s["methods"][m]["post_fusion"], s["methods"][m]["finetune"])
              for m in _methods(s)]
    if s["control"]:
        series.append(("control", "Best member + extra epochs", s["best_member"], s["control"]["finetune"]))
    for i, (key, name, first, curve) in enumerate(series):
        points = [(i, st) for i, st in enumerate([first] + list(curve)) if st]
        xs = [i for i, _ in points]
        mean = [100 * st["mean"] for _, st in points]
        std = [100 * st["std"] for _, st in points]
        line, = ax.plot(xs, mean, marker="o", label=name, color=COLORS.get(key, f"C{4 + i}"))
        ax.fill_between(xs, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                        color=line.get_color(), alpha=0.2)
    for name, stat, style in (("Ensemble", s["ensemble"], "--"), ("Best member", s["best_member"], ":")):
        if stat:
            ax.axhline(100 * stat["mean"], color="black", linestyle=style, label=name)
    ax.set_xlabel("fine-tuning epoch (0 = right after fusion)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(f"Fine-tuning after fusion: {group.label} ({_seeds_text(s['runs'])})")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig


def _sparsity(group: Group) -> Optional[float]:
    stat = group.stats["methods"].get("nt", {}).get("sparsity")
    if stat:
        return round(stat["mean"], 6)
    ratio = group.config.get("fusion.keep_ratio")
    return None if ratio is None else round(1 - float(ratio), 6)


def plot_against(groups: List[Group], x_of, x_keys, xlabel: str, title: str, nt_only: bool = False):
    """Accuracy against a swept quantity, one panel per setting of the other differing keys.

    Fused methods are shown after fine-tuning ("best"); with `nt_only`, only NT, both
    after fine-tuning and right after fusion. None unless a panel has two x values.
    """
    panels: dict = {}
    for g in groups:
        rest = ", ".join(f"{k}={v}" for k, v in g.settings.items() if k not in x_keys) or "all runs"
        if x_of(g) is not None:
            panels.setdefault(rest, []).append(g)
    panels = {k: sorted(v, key=x_of) for k, v in panels.items() if len({x_of(g) for g in v}) > 1}
    if not panels:
        return None
    fig, axes = pyplot().subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (rest, members) in zip(axes[0], panels.items()):
        xs = [x_of(g) for g in members]
        lines = [("Ensemble", lambda s: s["ensemble"], "black", "-"),
                 ("Best member", lambda s: s["best_member"], "grey", "-")]
        for i, m in enumerate(_methods(members[0].stats)):
            if nt_only and m != "nt":
                continue
            color = COLORS.get(m, f"C{4 + i}")
            name = METHOD_NAMES.get(m, m)
            lines.append((f"{name} (best)", lambda s, m=m: s["methods"].get(m, {}).get("best"), color, "-"))
            if nt_only:
                lines.append((f"{name} (after fusion)", lambda s, m=m: s["methods"].get(m, {}).get("post_fusion"),
                              color, "--"))
        for name, get, color, style in lines:
            stats = [get(g.stats) for g in members]
            pts = [(x, st) for x, st in zip(xs, stats) if st]
            if pts:
                ax.errorbar([x for x, _ in pts], [100 * st["mean"] for _, st in pts],
                            yerr=[100 * st["std"] for _, st in pts], color=color, linestyle=style,
                            marker="o", capsize=3, label=name)
        ax.set_xticks(xs)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title if rest == "all runs" else f"{title}\n{rest}", fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    return fig


def _save(fig, out_dir: str, name: str) -> str:
    with replacing(os.path.join(out_dir, name)) as tmp:   # atomic: a full disk never cuts an old plot short
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return name


def write_report(run_dirs: List[str], out_dir: str) -> str:
    """Write report.md and its PNG plots into out_dir; return the path of report.md."""
    if not run_dirs:
        raise UserError("no run directories given; pass at least one directory written by 'ntdist run'")
    groups = group_runs(run_dirs)
    os.makedirs(out_dir, exist_ok=True)
    figures = [f"{kind}_{i}.png" for i in range(1, len(groups) + 1) for kind in ("curves", "paired")]
    add_to_manifest(out_dir, [REPORT_FILE, *PLOTS, *figures])
    runs = sum(len(g.dirs) for g in groups)
    left_out = sum(len(g.duplicates) for g in groups)
    text = ["# ntdist report", "", f"{runs} run{'s' if runs != 1 else ''} in {len(groups)} group(s)"
            + (f" ({left_out} more left out as repeats of a seed)" if left_out else "")
            + "; accuracies are test accuracy in percent, mean ± sample std over seeds.", "", BEST_NOTE, ""]
    text += groups_section(groups)
    for i, group in enumerate(groups, 1):
        text += [f"## {group.label} ({_seeds_text(len(group.seeds))})", "", table(group), ""]
        kept = kept_gain_table(group.stats)
        text += [kept, "", KEPT_GAIN_NOTE, ""] if kept else []
        for extra in (diversity_text(group), merged_summary(group.results)):
            text += [extra, ""] if extra else []
        name = _save(plot_curves(group), out_dir, f"curves_{i}.png")
        text += [f"![accuracy against fine-tuning epoch]({name})", ""]
        text += paired_section(group.stats, group.label, lambda fig, i=i: _save(fig, out_dir, f"paired_{i}.png"))
    extra = [(lambda g: g.config.get("fusion.k") or g.results[0].k, ("fusion.k",), "number of members k",
              "Accuracy against ensemble size", False, PLOTS[0]),
             (_sparsity, ("fusion.keep_ratio",), "sparsity of the NT fusion (1 - kept width / (k × width))",
              "Accuracy against sparsity", True, PLOTS[1])]
    for x_of, keys, xlabel, title, after, fname in extra:
        fig = plot_against(groups, x_of, keys, xlabel, title, after)
        if fig is not None:
            text += [f"## {title}", "", f"![{title.lower()}]({_save(fig, out_dir, fname)})", ""]
    path = os.path.join(out_dir, REPORT_FILE)
    atomic_write_text(path, "\n".join(text) + "\n")
    return path
