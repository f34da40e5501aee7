"""`mode: sync` honours SIGTERM: it stops at the next step with exit 3 (it keeps no state, a rerun starts over).

Run: .venv/bin/python -m pytest tests/unit/test_sync_sigterm.py
"""

import os

from helpers import ROOT, ntdist

CONFIG = """mode: sync
model: {name: userpkg.models:sigterm_net, kwargs: {at: 30}}
train: {epochs: 6, lr: 0.05, schedule: none}
data: {batch_size: 8}
fusion: {k: 4}
sync: {methods: [none, avg, nt], every: 20, unit: step}
distributed: {threads_per_rank: 1}
"""


def test_sigterm_stops_sync_mode_with_exit_3(tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", ROOT)])}
    (tmp_path / "sync.yaml").write_text(CONFIG)
    proc = ntdist("run", str(tmp_path / "sync.yaml"), f"output.dir={tmp_path / 'run'}", env=env)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "sync mode (none) stopped at step" in proc.stderr and "starts the sync runs over" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()
    assert "epoch 2" not in proc.stdout          # stopped inside the first epoch, not after all of them


def test_repair_lstsq_is_refused_for_sync_mode_before_anything_runs(tmp_path):
    proc = ntdist("run", "configs/sync_sgd.yaml", "fusion.repair=lstsq", f"output.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "does not apply to mode sync" in proc.stderr
    assert not (tmp_path / "run").exists()
