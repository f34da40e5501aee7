"""Test tiers: every test under tests/unit, tests/multiproc and tests/launchers gets that marker.

    make test          # all three tiers (installs launchers and system packages first)
    make test-unit     # unit tier only: pure Python, one process, no system packages
    .venv/bin/python -m pytest -m multiproc tests

unit: one process, no network (config, data, fusion math, reports, the CLI in one process);
multiproc: several local gloo processes on free ports with hard time-outs (torchrun, DDP, resume), and
  end-to-end runs that train several models through the CLI (minutes each);
launchers: the real launch/ wrappers under torchrun, accelerate, mpirun and a local SLURM cluster.
"""

import os

import pytest

TIERS = ("unit", "multiproc", "launchers")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = os.path.relpath(str(item.fspath), os.path.dirname(__file__)).split(os.sep)
        if parts[0] not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: every test belongs in one of tests/{{{','.join(TIERS)}}}/")
        item.add_marker(getattr(pytest.mark, parts[0]))
