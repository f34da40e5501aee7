"""The report's paired comparisons, seed by seed, as a table and a plot.

Every fusion method is compared with the control (the best member fine-tuned for the
same extra epochs), and NT also with OT and Avg (`records.stats.comparisons`). The
numbers come from `records.stats.paired_block` (stored under "paired" in every
group's statistics, and so in sweep.json); this module only lays them out. The
checkpoints are right after fusion, after the fine-tuning epochs of
`records.stats.checkpoint_epochs` (the paper's 3 and the last) and the epoch chosen
by validation accuracy. `kept_gain_table` lays out the share of the ensemble's gain
over the best member that each method keeps (results.json's `kept_gain`).
"""

import random
from typing import Callable, List, Optional, Tuple


from ntdist.records.stats import checkpoint_epochs, comparisons, finetune_epochs, ordered_methods


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported when a plot is drawn (not at every start of
    the command line: it costs a third of a second)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt

NAMES = {"nt": "NT", "ot": "OT", "avg": "Avg", "control": "control"}
PAIRED_NOTE = ("Paired differences: for each seed, a method's test accuracy minus the control's (best member + "
               "extra epochs), and NT's minus OT's and Avg's, on the same members (in points); mean ± sample std "
               "over seeds, the two-sided paired t-test p-value, and on how many seeds the first is ahead (ties "
               "not counted). Right after fusion the control is the best member itself. \"p = —\" where a t-test "
               "says nothing: one seed, or the same difference on every seed (no spread).")


KEPT_GAIN_NOTE = ("Kept gain: (fused − best member) / (ensemble − best member), test accuracy, per seed; 1 keeps the "
                  "ensemble's whole gain over its best member, 0 none of it, below 0 falls behind the best member. "
                  "Mean ± sample std over seeds; a seed whose ensemble is not ahead of its best member has no kept "
                  "gain, and a cell counts its seeds in brackets when some are missing.")
NO_KEPT_GAIN = ("Kept gain: n/a, on every seed the ensemble is not ahead of its best member, so there is no gain "
                "to keep (members that barely differ, or one that is much better than the rest).")
STAGE_TITLES = {"post_fusion": "after fusion", "finetune": "after fine-tuning (last epoch)"}


def epoch_title(epoch: int) -> str:
    return f"after {epoch} epoch{'s' if epoch != 1 else ''}"


def checkpoints(block: dict, epochs: int) -> List[Tuple[str, str, Optional[dict]]]:
    """(key, column title, stat) for after fusion, after each of `checkpoint_epochs(epochs)`, and best."""
    curve = block["finetune"]
    out = [("post_fusion", "after fusion", block["post_fusion"])]
    out += [(f"finetune{e}", epoch_title(e), curve[e - 1] if len(curve) >= e else None)
            for e in checkpoint_epochs(epochs)]
    out.append(("best", "best", block["best"]))
    return out


def format_paired(stat: Optional[dict]) -> str:
    """'+1.23 ± 0.45 (p = 0.012, 7/10 ahead)' in points; 'p = — (no spread)' without a test; '—' without pairs."""
    if not stat:
        return "—"
    if stat["p"] is None:
        p = f"p = — ({stat.get('no_p') or 'no test'})"
    else:
        p = f"p = {stat['p']:.3f}" if stat["p"] >= 0.001 else "p < 0.001"
    return (f"{100 * stat['mean']:+.2f} ± {100 * stat['std']:.2f} ({p}, "
            f"{stat['wins']}/{stat['n']} ahead)")


def rows(stats: dict) -> List[Tuple[str, dict]]:
    """(row name, block) of each comparison that some run of the group holds, in the report's order."""
    held = stats.get("paired") or {}
    return [(f"{NAMES.get(m, m)} − {NAMES.get(b, b)}", held[m][b])
            for m, b in comparisons(list(held)) if b in held.get(m, {})]


def paired_table(stats: dict) -> Optional[str]:
    """Markdown table of every comparison at each checkpoint; None without pairs."""
    found, epochs = rows(stats), finetune_epochs(stats)
    if not found:
        return None
    titles = [title for _, title, _ in checkpoints(found[0][1], epochs)]
    lines = ["| | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for name, block in found:
        lines.append(f"| {name} | " + " | ".join(format_paired(s) for _, _, s in checkpoints(block, epochs)) + " |")
    return "\n".join(lines)


def plot_paired(stats: dict, label: str):
    """Per-seed differences (dots), their mean ± std (bar) and zero, one panel per checkpoint; None without pairs.

    Each panel has its own y-axis: right after fusion the gaps are tens of points, after
    fine-tuning a few, and one shared scale would flatten the later ones.
    """
    found, epochs = rows(stats), finetune_epochs(stats)
    if not found:
        return None
    panels = checkpoints(found[0][1], epochs)
    fig, axes = pyplot().subplots(1, len(panels), figsize=(1.2 + 1.1 * len(found) * len(panels), 4.6),
                                  squeeze=False)
    jitter = random.Random(0)   # the same picture every time
    for ax, (key, title, _) in zip(axes[0], panels):
        for x, (_, block) in enumerate(found):
            stat = {k: s for k, _, s in checkpoints(block, epochs)}.get(key)
            if not stat:
                continue
            diffs = [100 * d for d in stat["diffs"]]
            ax.scatter([x + jitter.uniform(-0.12, 0.12) for _ in diffs], diffs, s=18, alpha=0.6, color=f"C{x}")
            ax.errorbar([x + 0.25], [100 * stat["mean"]], yerr=[100 * stat["std"]], color="black",
                        marker="D", capsize=4)
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.set_xticks(range(len(found)))
        ax.set_xticklabels([name for name, _ in found], fontsize="small", rotation=30, ha="right")
        ax.set_xlim(-0.5, len(found) - 0.5)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("difference per seed (points); bar: mean ± std")
    fig.suptitle(f"Paired differences: {label} (each panel has its own y-axis)", fontsize="medium")
    fig.tight_layout()
    return fig


def kept_gain_table(stats: dict) -> Optional[str]:
    """Markdown table of each method's kept gain per stage (mean ± std over seeds); `NO_KEPT_GAIN` when no seed
    has one (its ensemble is not ahead of its best member), None when there is no fused method."""
    if not stats["methods"]:
        return None
    methods = [m for m in ordered_methods(list(stats["methods"])) if stats["methods"][m].get("kept_gain")]
    if not methods:
        return NO_KEPT_GAIN
    stages = list(dict.fromkeys(stage for m in methods for stage in stats["methods"][m]["kept_gain"]))
    runs = stats["runs"]

    def cell(stat: Optional[dict]) -> str:
        if not stat:
            return "—"
        count = f" ({stat['n']} of {runs} seeds)" if stat["n"] != runs else ""
        return f"{stat['mean']:+.2f} ± {stat['std']:.2f}{count}"

    lines = ["| kept gain | " + " | ".join(STAGE_TITLES.get(s, s) for s in stages) + " |",
             "|---" * (len(stages) + 1) + "|"]
    for m in methods:
        gains = stats["methods"][m]["kept_gain"]
        lines.append(f"| {NAMES.get(m, m)} | " + " | ".join(cell(gains.get(s)) for s in stages) + " |")
    return "\n".join(lines)


def paired_section(stats: dict, label: str, save: Callable) -> List[str]:
    """The report's lines for one group: the table, a note and the plot (saved by `save(fig)` -> file name)."""
    table = paired_table(stats)
    if not table:
        return []
    name = save(plot_paired(stats, label))
    return [table, "", PAIRED_NOTE, "", f"![paired differences per seed]({name})", ""]
