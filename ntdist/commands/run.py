"""`ntdist run`: load the config, join the world, run the pipeline (or every point of a sweep), report.

A config with top-level `seeds:` or `sweep:` keys expands into one run per
point; finished points are skipped, so a sweep can be restarted at any time.
An unfinished point follows the rules of a single run: it continues with
--resume, starts again with --overwrite, and is refused otherwise.
"""

import os

from ntdist.config import load_config, read_yaml
from ntdist.distributed.comm import all_gather_records
from ntdist.distributed.layout import MemberLayout
from ntdist.distributed.world import init_world, is_peer_failure, peer_lost, shutdown
from ntdist.errors import Preempted, UserError
from ntdist.pipeline import run
from ntdist.preempt import install_sigterm_handler, keep_exit_code
from ntdist.commands.report import report_command
from ntdist.records.results import read_results
from ntdist.records.rundir import RunDir
from ntdist.stages.given import check_not_overwritten
from ntdist.sweep import SWEEP_KEYS, load_sweep, run_sweep
from ntdist.training.engines import check_engine


def run_command(config_path: str, overrides, resume: bool = False, overwrite: bool = False) -> int:
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass --resume to continue the run "
                        "or --overwrite to start it again")
    raw = read_yaml(config_path)
    plain = [o for o in overrides if not o.startswith("seeds=")]   # the sweep runner handles a seed list
    cfg = load_config(config_path, plain, extra_keys=SWEEP_KEYS)
    install_sigterm_handler()
    world = init_world(cfg.distributed, check_size=lambda size: MemberLayout(cfg.fusion.k, size))
    if world.restart > 0 and not overwrite:
        world.print0(f"elastic restart {world.restart}: resuming from the checkpoints in {cfg.output.dir}")
        resume = True
    outcome = "failed"
    try:
        if cfg.mode != "sync":
            check_engine(cfg.finetune, world)   # before training: the engine sees the job's ranks
        if any(key in raw for key in SWEEP_KEYS) or len(plain) < len(overrides):   # a file's or a given seed list
            _run_sweep(config_path, list(overrides), cfg, world, resume, overwrite)
        else:
            run(cfg, world, resume=resume, overwrite=overwrite)
            if cfg.mode == "fuse":
                _report([cfg.output.dir], cfg.output.dir, world)
        outcome = "clean"
    except Preempted:
        outcome = "preempted"   # the state is on disk: the peers stop at their next epoch boundary too
        raise
    except RuntimeError as err:   # e.g. DDP's all-reduce in backward when a peer died: exit 4, not 1
        if world.size > 1 and is_peer_failure(err):
            raise peer_lost(err) from err
        raise
    finally:
        shutdown(world, clean=outcome == "clean", failed=outcome == "failed")
        if world.size > 1:   # the outcome is decided: the launcher's SIGTERM to the survivors must not change it
            keep_exit_code()
    return 0


def _run_sweep(config_path, overrides, cfg, world, resume, overwrite) -> None:
    """Every point of the sweep as one run; finished points are skipped unless --overwrite."""
    def run_point(path, point_overrides):
        point_cfg = load_config(path, point_overrides, extra_keys=SWEEP_KEYS)
        run(point_cfg, world, resume=resume, overwrite=overwrite)
        world.wait_for("writing results.json on rank 0")   # before anyone checks for it

    def done(point_dir):   # rank 0 decides, so every rank skips (or runs) the same points
        return not overwrite and all_gather_records(world, [read_results(point_dir) is not None])[0]

    sweep = load_sweep(config_path, overrides)
    for point, point_dir in zip(sweep.points, sweep.dirs):   # every point's config and folder, before any training
        point_cfg = load_config(config_path, sweep.overrides + point.overrides + [f"output.dir={point_dir}"],
                                extra_keys=SWEEP_KEYS)
        MemberLayout(point_cfg.fusion.k, world.size)
        for other in sweep.dirs if overwrite else ():   # no point's --overwrite removes a member of another
            check_not_overwritten(point_cfg.fusion.members, other)
        if overwrite or read_results(point_dir) is None:
            RunDir(point_dir, writer=False).check(resume, overwrite)
    world.print0(f"sweep: {len(sweep.points)} runs under {cfg.output.dir}")
    run_sweep(config_path, overrides, run_point, done=done, summarise=world.is_main)
    if cfg.mode == "fuse":   # report on this sweep's points only, not on leftovers of an earlier grid
        _report(sweep.dirs, cfg.output.dir, world)


def _report(run_dirs, out, world) -> None:
    if world.is_main:
        world.print0(f"report: {os.path.abspath(report_command(run_dirs, out))}")
