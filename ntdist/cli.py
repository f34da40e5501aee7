"""The `ntdist` command line: run, fuse, bench, report.

Every user mistake ends with one line on stderr and a non-zero exit code (see
`ntdist.errors`); `--debug` shows the full traceback instead.
"""

import argparse
import sys
import traceback

from ntdist.preempt import default_sigterm, exit_on_sigterm

exit_on_sigterm()   # before the slow imports below, so a SIGTERM during start-up exits 3 and not 143

import torch  # noqa: E402

from ntdist import __version__  # noqa: E402
from ntdist.commands.bench import bench_fusion  # noqa: E402
from ntdist.commands.bench_train import WORKLOADS as TRAIN_WORKLOADS, bench_train  # noqa: E402
from ntdist.commands.dryrun import dry_run_command  # noqa: E402
from ntdist.commands.fuse import fuse_command  # noqa: E402
from ntdist.commands.report import report_command  # noqa: E402
from ntdist.commands.run import run_command  # noqa: E402
from ntdist.config import describe_keys  # noqa: E402
from ntdist.errors import EXIT_FAILURE, NtdistError, UserError  # noqa: E402
from ntdist.fusion import (DEFAULT_IMPORTANCE, DEFAULT_PRUNER, IMPORTANCES, METHODS, ORDERS, PRUNERS,  # noqa: E402
                           SCHEDULES)
from ntdist.fusion.dedup.merge import DEDUP_THRESHOLD  # noqa: E402
from ntdist.fusion.dedup.choice import OVERFLOWS  # noqa: E402
from ntdist.fusion.dedup.activations import CRITERIA  # noqa: E402

RUN_EPILOG = """Overrides are dotted keys, e.g.:
  ntdist run configs/quickstart.yaml train.epochs=5 fusion.methods=[nt,avg] model.kwargs.width=64

Config keys (YAML files hold only what differs from these defaults):
"""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's parser must not reset a --debug given before the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    parser = argparse.ArgumentParser(prog="ntdist", parents=[common],
                                     description="Train ensembles in parallel, fuse them by Neuron Transplantation, "
                                                 "fine-tune the fused model.")
    parser.add_argument("--version", action="version", version=f"ntdist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="train members, fuse, fine-tune (the whole workflow)",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=RUN_EPILOG + "\n".join(describe_keys()))
    run.add_argument("config", help="YAML experiment file, e.g. configs/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    run.add_argument("--resume", action="store_true", help="continue the run in output.dir")
    run.add_argument("--overwrite", action="store_true", help="start again in a non-empty output.dir")
    run.add_argument("--dry-run", action="store_true", help="check the run for --world-size ranks and print its layout, "
                     "fusion rounds, memory and checkpoint sizes, without joining ranks or training")
    run.add_argument("--world-size", type=int, default=None, help="--dry-run: the ranks to plan for (default 1)")
    run.add_argument("--gpus-per-node", type=int, default=None, help="--dry-run: ranks per node (shows what crosses nodes)")

    fuse = sub.add_parser("fuse", parents=[common], help="fuse checkpoints into one model of the same architecture")
    fuse.add_argument("checkpoints", nargs="+",
                      help="member checkpoints: ntdist's .safetensors, or plain state dicts (.safetensors or "
                           "weights-only torch files) together with --model")
    fuse.add_argument("-o", "--output", required=True, help="where to write the fused checkpoint (.safetensors)")
    fuse.add_argument("--model", default=None,
                      help="architecture of plain state dicts: a registry name (mlp, resnet18), torchvision:<name> "
                           "or package.module:callable; default: the spec stored in ntdist's checkpoints")
    fuse.add_argument("--model-kwargs", default=None, metavar="JSON",
                      help="constructor arguments for --model as a JSON object, e.g. '{\"num_classes\": 10}'")
    fuse.add_argument("--device", default="cpu", help="where fusion runs: cpu (default), cuda, cuda:1")
    fuse.add_argument("--method", default="nt", choices=METHODS,
                      help="nt (Neuron Transplantation, default), avg (weight averaging), ot (optimal transport)")
    fuse.add_argument("--schedule", default="recursive", choices=SCHEDULES,
                      help="how k models are combined: flat (all at once), iterative (one after another), "
                           "recursive (pairwise tree, default)")
    fuse.add_argument("--importance", default=DEFAULT_IMPORTANCE, choices=list(IMPORTANCES),
                      help=f"NT: the score by which units are kept (default {DEFAULT_IMPORTANCE})")
    fuse.add_argument("--pruner", default=DEFAULT_PRUNER, choices=PRUNERS,
                      help="NT: ntdist (default; never builds the wide model) or torch_pruning (the authors' "
                           "pipeline: the wide model pruned by Torch-Pruning; needs the torch-pruning package)")
    fuse.add_argument("--order", default="merge_prune", choices=ORDERS,
                      help="NT: concat then prune (merge_prune, default), or prune each member then concat")
    fuse.add_argument("--width", type=int, default=None, help="NT: target width of the first hidden layer (mlp)")
    fuse.add_argument("--keep-ratio", type=float, default=None,
                      help="NT: kept units relative to one member (mlp; default 1: the members' width)")
    fuse.add_argument("--dedup", action="store_true",
                      help="NT: merge a unit that nearly duplicates a kept one into it (outgoing weights added) "
                           "instead of keeping both; fusing copies of one model then returns that model")
    fuse.add_argument("--dedup-threshold", type=float, default=None,
                      help=f"NT --dedup: cosine similarity in (0, 1) above which two units count as duplicates "
                           f"(default {DEDUP_THRESHOLD})")
    fuse.add_argument("--dedup-overflow", default=None, choices=OVERFLOWS,
                      help="NT --dedup: units that duplicate no kept unit once the slots are full are dropped "
                           "(drop, default), merged into their most similar kept unit (merge), or joined with "
                           "units of other members, most similar pair first, until they fit (match)")
    fuse.add_argument("--dedup-criterion", default=None, choices=CRITERIA,
                      help="NT --dedup: compare units by their incoming weights (weights, default) or by the "
                           "correlation of their outputs on --dedup-inputs (activations)")
    fuse.add_argument("--dedup-inputs", default=None, metavar="FILE",
                      help="NT --dedup-criterion activations: a batch of training inputs, one tensor saved with "
                           "torch.save (a few hundred rows)")

    fuse.add_argument("--force", action="store_true", help="replace the output file if it exists")

    bench = sub.add_parser("bench", parents=[common], help="benchmarks")
    bench.add_argument("what", choices=["fusion", "train"],
                       help="fusion: time and memory of avg, nt, ot (paper Table 8); "
                            "train: member training samples/s against a tight loop")
    bench.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096],
                       help="fusion: hidden widths W of the two MLPs 3072-W-W-10 (default 256 ... 4096)")
    bench.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median; "
                                                                  "default 5 for fusion, 3 for train)")
    bench.add_argument("--workloads", nargs="+", default=list(TRAIN_WORKLOADS), choices=list(TRAIN_WORKLOADS),
                       help="train: model and data")
    bench.add_argument("--ks", type=int, nargs="+", default=[1, 2, 8], help="train: members on the one rank")
    bench.add_argument("--batches", type=int, nargs="+", default=[32, 256], help="train: batch sizes")
    bench.add_argument("--epochs", type=int, default=3, help="train: timed epochs per measurement")
    bench.add_argument("--threads", type=int, default=1, help="train: torch CPU threads (default 1)")
    bench.add_argument("--out", default=None, help="CSV file to write (default bench_fusion.csv / bench_train.csv)")

    report = sub.add_parser("report", parents=[common], help="write report.md and plots for run directories")
    report.add_argument("run_dirs", nargs="+", help="run directories (or folders containing them)")
    report.add_argument("--out", default=None, help="where to write the report (default: the first directory)")
    return parser


def cmd_run(args) -> int:
    if args.dry_run:
        return dry_run_command(args.config, args.overrides, args.world_size or 1, args.gpus_per_node)
    if args.world_size is not None or args.gpus_per_node is not None:
        raise UserError("--world-size and --gpus-per-node plan a run with --dry-run; a real run's ranks come from "
                        "its launcher (torchrun, srun, mpirun)")
    return run_command(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite)


def cmd_fuse(args) -> int:
    fuse_command(args.checkpoints, args.output, method=args.method, schedule=args.schedule,
                  importance=args.importance, pruner=args.pruner, order=args.order, width=args.width,
                  keep_ratio=args.keep_ratio, force=args.force, model=args.model, model_kwargs=args.model_kwargs,
                  device=args.device, dedup=args.dedup, dedup_threshold=args.dedup_threshold,
                  dedup_overflow=args.dedup_overflow, dedup_criterion=args.dedup_criterion,
                  dedup_inputs=args.dedup_inputs)
    return 0


def cmd_bench(args) -> int:
    if args.what == "fusion":
        bench_fusion(widths=tuple(args.widths), repeats=5 if args.repeats is None else args.repeats,
                     out_csv=args.out or "bench_fusion.csv")
        return 0
    torch.set_num_threads(args.threads)
    bench_train(args.workloads, args.ks, args.batches, args.epochs, 3 if args.repeats is None else args.repeats,
                args.out or "bench_train.csv")
    return 0


def cmd_report(args) -> int:
    path = report_command(args.run_dirs, args.out)
    print(f"report: {path}")
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting overrides at the first flag (`run c.yaml --resume a=1`); gather the rest here.
    if args.command == "run":
        args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if x not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.debug = getattr(args, "debug", False)   # absent unless given (see the SUPPRESS above)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {"run": cmd_run, "fuse": cmd_fuse, "bench": cmd_bench, "report": cmd_report}[args.command]
    if args.command != "run":
        default_sigterm()   # only runs are preempted and resumed; other commands end as usual
    try:
        return handler(args)
    except NtdistError as err:
        if args.debug:
            traceback.print_exc()
        print(f"ntdist: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("ntdist: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - last line of defence: one line, no traceback unless asked
        if args.debug:
            traceback.print_exc()
        else:
            print(f"ntdist: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
                  file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
