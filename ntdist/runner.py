"""`ntdist run`: load the config, join the world, run the pipeline (or every point of a sweep), report.

A config with top-level `seeds:` or `sweep:` keys expands into one run per
point; finished points are skipped, so a sweep can be restarted at any time.
"""

import os

from ntdist.config import load_config, read_yaml, yaml_load
from ntdist.dist.layout import MemberLayout
from ntdist.dist.world import init_world, shutdown
from ntdist.resume import install_sigterm_handler

SWEEP_KEYS = ("seeds", "sweep")


def run_command(config_path: str, overrides, resume: bool = False, overwrite: bool = False) -> int:
    raw = read_yaml(config_path)
    plain = [o for o in overrides if not o.startswith("seeds=")]   # the sweep runner handles a seed list
    cfg = load_config(config_path, plain, extra_keys=SWEEP_KEYS)
    install_sigterm_handler()
    world = init_world(cfg.distributed, check_size=lambda size: MemberLayout(cfg.fusion.k, size))
    if world.restart > 0 and not overwrite:
        world.print0(f"elastic restart {world.restart}: resuming from the checkpoints in {cfg.output.dir}")
        resume = True
    clean = False
    try:
        if any(key in raw for key in SWEEP_KEYS):
            _run_sweep(config_path, list(overrides), raw, cfg, world, resume, overwrite)
        else:
            _run_one(cfg, world, resume, overwrite)
        clean = True
    finally:
        shutdown(world, clean)
    return 0


def _run_one(cfg, world, resume, overwrite) -> dict:
    from ntdist.pipeline import run

    results = run(cfg, world, resume=resume, overwrite=overwrite)
    if world.is_main and cfg.mode == "fuse":
        _report([cfg.output.dir], cfg.output.dir, world)
    return results


def _run_sweep(config_path, overrides, raw, cfg, world, resume, overwrite) -> None:
    """Every point of the sweep as one run; finished points are skipped unless --overwrite."""
    from ntdist.dist.comm import all_gather_records
    from ntdist.pipeline import run
    from ntdist.sweep import expand, read_results, run_sweep

    def run_point(path, point_overrides):
        point_cfg = load_config(path, point_overrides, extra_keys=SWEEP_KEYS)
        # an unfinished point continues with --resume and starts again otherwise
        run(point_cfg, world, resume=resume, overwrite=not resume)
        world.barrier()   # rank 0 has written results.json before anyone checks for it

    def done(point_dir):   # rank 0 decides, so every rank skips (or runs) the same points
        return not overwrite and all_gather_records(world, [read_results(point_dir) is not None])[0]

    for item in overrides:   # a seed list given on the command line replaces the file's
        if item.startswith("seeds="):
            raw = dict(raw, seeds=yaml_load(item.split("=", 1)[1]))
    points = expand(raw)
    world.print0(f"sweep: {len(points)} runs under {cfg.output.dir}")
    run_sweep(config_path, overrides, run_point, done=done, summarise=world.is_main)
    if world.is_main and cfg.mode == "fuse":   # report on this sweep's points only, not on leftovers of an earlier grid
        _report([os.path.join(cfg.output.dir, p.subdir) for p in points], cfg.output.dir, world)


def _report(run_dirs, out, world) -> None:
    from ntdist.report import report_command

    path = report_command(run_dirs, out)
    world.print0(f"report: {os.path.abspath(path)}")
