"""The report's paired comparisons: NT minus each baseline, seed by seed, as a table and a plot.

The numbers come from `records.stats.paired_block` (stored under "paired" in every
group's statistics, and so in sweep.json); this module only lays them out. The
checkpoints are right after fusion, after 3 fine-tuning epochs (or after the last
one when a run fine-tunes for fewer) and the epoch chosen by validation accuracy.
"""

import random
from typing import Callable, List, Optional, Tuple

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ntdist.records.stats import BASELINES  # noqa: E402

BASELINE_NAMES = {"control": "control (best member + extra epochs)", "ot": "OT", "avg": "Avg"}
PAIRED_NOTE = ("Paired differences: for each seed, NT's test accuracy minus the baseline's on the same members "
               "(in points); mean ± sample std over seeds, the two-sided paired t-test p-value, and on how many "
               "seeds NT is ahead (ties not counted). Right after fusion the control is the best member itself. "
               "\"p = —\" where a t-test says nothing: one seed, or the same difference on every seed (no spread).")
FINETUNE_EPOCHS = 3   # the middle checkpoint of the table, as in the paper's tables


def checkpoints(block: dict) -> List[Tuple[str, str, Optional[dict]]]:
    """(key, column title, stat) for after fusion, after min(3, epochs) epochs and best, of one baseline."""
    curve = block["finetune"]
    out = [("post_fusion", "after fusion", block["post_fusion"])]
    if curve:
        epoch = min(FINETUNE_EPOCHS, len(curve))
        out.append(("finetune", f"after {epoch} epoch{'s' if epoch > 1 else ''}", curve[epoch - 1]))
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


def paired_table(stats: dict, method: str = "nt") -> Optional[str]:
    """Markdown table of `method` minus each baseline at each checkpoint; None without pairs."""
    blocks = (stats.get("paired") or {}).get(method) or {}
    rows = [(b, blocks[b]) for b in BASELINES if b in blocks]
    if not rows:
        return None
    titles = [title for _, title, _ in checkpoints(rows[0][1])]
    name = method.upper() if method in ("nt", "ot") else method
    lines = ["| | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for baseline, block in rows:
        cells = [format_paired(stat) for _, _, stat in checkpoints(block)]
        lines.append(f"| {name} − {BASELINE_NAMES.get(baseline, baseline)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_paired(stats: dict, label: str, method: str = "nt"):
    """Per-seed differences (dots), their mean ± std (bar) and zero, one panel per checkpoint; None without pairs."""
    blocks = (stats.get("paired") or {}).get(method) or {}
    rows = [(b, blocks[b]) for b in BASELINES if b in blocks]
    if not rows:
        return None
    panels = checkpoints(rows[0][1])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2), squeeze=False, sharey=True)
    jitter = random.Random(0)   # the same picture every time
    for ax, (key, title, _) in zip(axes[0], panels):
        for x, (baseline, block) in enumerate(rows):
            stat = dict((k, s) for k, _, s in checkpoints(block)).get(key)
            if not stat:
                continue
            diffs = [100 * d for d in stat["diffs"]]
            ax.scatter([x + jitter.uniform(-0.12, 0.12) for _ in diffs], diffs, s=18, alpha=0.6, color=f"C{x}")
            ax.errorbar([x + 0.25], [100 * stat["mean"]], yerr=[100 * stat["std"]], color="black",
                        marker="D", capsize=4)
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{method.upper()} − {b if b == 'control' else b.upper()}" for b, _ in rows],
                           fontsize="small")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("difference per seed (points); bar: mean ± std")
    fig.suptitle(f"Paired differences: {label}", fontsize="medium")
    fig.tight_layout()
    return fig


def paired_section(stats: dict, label: str, save: Callable) -> List[str]:
    """The report's lines for one group: the table, a note and the plot (saved by `save(fig)` -> file name)."""
    table = paired_table(stats)
    if not table:
        return []
    name = save(plot_paired(stats, label))
    return [table, "", PAIRED_NOTE, "", f"![paired differences per seed]({name})", ""]
