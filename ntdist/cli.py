"""The `ntdist` command line: run, fuse, eval, bench, report.

Every user mistake ends with one line on stderr and a non-zero exit code (see
`ntdist.errors`); `--debug` shows the full traceback instead.
"""

import argparse
import os
import sys
import traceback

from ntdist.preempt import default_sigterm, exit_on_sigterm

exit_on_sigterm()   # before the slow imports below, so a SIGTERM during start-up exits 3 and not 143

import torch  # noqa: E402

from ntdist import __version__  # noqa: E402
from ntdist.commands import bench as fusion_bench, bench_train as train_bench  # noqa: E402
from ntdist.commands.checkpoints import ModelSource  # noqa: E402
from ntdist.commands.dryrun import dry_run_command  # noqa: E402
from ntdist.commands.eval import SPLITS as EVAL_SPLITS, eval_command  # noqa: E402
from ntdist.commands.fuse import KEYS as FUSE_KEYS, flag as fuse_flag, fuse_command, fusion_config  # noqa: E402
from ntdist.commands.lazyfuse import lazy_fuse  # noqa: E402
from ntdist.commands.report import report_command  # noqa: E402
from ntdist.commands.run import run_command  # noqa: E402
from ntdist.config import describe_keys  # noqa: E402
from ntdist.errors import EXIT_FAILURE, NtdistError, UserError  # noqa: E402
from ntdist.sweep import SWEEP_KEYS  # noqa: E402

RUN_EPILOG = """Overrides are dotted keys, e.g.:
  ntdist run configs/quickstart.yaml train.epochs=5 fusion.methods=[nt,avg] model.kwargs.width=64

Config keys (YAML files hold only what differs from these defaults):
"""
SWEEP_HELP = {   # the top-level keys of sweep.SWEEP_KEYS, which the run command expands into several runs
    "seeds": "(list of int, default none): run the config once per seed (train.seed), each in "
             "output.dir/seed=<s>/, then write sweep.json (mean ± std) and one report; e.g. 'seeds=[0,1,2]'",
    "sweep": "(mapping of dotted key to a list of values, default none; YAML only): a grid: every combination "
             "(seeds innermost) runs in its own sub-directory of output.dir; finished points are skipped",
}
SWEEP_EPILOG = "\n\nSeeds and sweeps (top-level keys):\n" + "\n".join(f"  {key} {SWEEP_HELP[key]}" for key in SWEEP_KEYS)
FUSE_EPILOG = """Fusion keys are those of ntdist run, with the same defaults and checks (fusion.methods holds the
one method to fuse with, fusion.k is the number of checkpoints); each also has a flag, e.g.:
  ntdist fuse a.safetensors b.safetensors -o f.safetensors fusion.importance=l1 fusion.dedup=on
  ntdist fuse a.safetensors b.safetensors -o f.safetensors --method avg --schedule flat

Keys:
"""


def _add_run(sub, common) -> None:
    run = sub.add_parser("run", parents=[common], help="train members, fuse, fine-tune (the whole workflow)",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=RUN_EPILOG + "\n".join(describe_keys()) + SWEEP_EPILOG)
    run.add_argument("config", help="YAML experiment file, e.g. configs/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    run.add_argument("--resume", action="store_true", help="continue the run in output.dir")
    run.add_argument("--overwrite", action="store_true", help="start again in a non-empty output.dir")
    run.add_argument("--dry-run", action="store_true", help="check the run for --world-size ranks and print its layout, "
                     "fusion rounds, memory and checkpoint sizes, without joining ranks or training")
    run.add_argument("--world-size", type=int, default=None, help="--dry-run: the ranks to plan for (default 1)")
    run.add_argument("--gpus-per-node", type=int, default=None, help="--dry-run: ranks per node (shows what crosses nodes)")


def _add_fuse(sub, common) -> None:
    fuse = sub.add_parser("fuse", parents=[common], help="fuse checkpoints into one model of the same architecture",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog=FUSE_EPILOG + "\n".join(describe_keys(only=[f"fusion.{key}" for key in FUSE_KEYS])))
    fuse.add_argument("inputs", nargs="*", metavar="CHECKPOINT|KEY=VALUE",
                      help="member checkpoints: ntdist's .safetensors, or plain state dicts (.safetensors or "
                           "weights-only torch files) together with --model; and fusion.* key=value overrides")
    fuse.add_argument("-o", "--output", required=True,
                      help="where to write the fused checkpoint (.safetensors); a folder (or a path ending with /) "
                           "receives fused.safetensors; Hugging Face members (hf:DIR) fuse into a save_pretrained "
                           "folder unless -o ends with .safetensors")
    _add_model_source(fuse, "fusion runs")
    fuse.add_argument("--input-shape", default=None, metavar="SHAPE",
                      help="one input's shape without the batch dimension, e.g. 1,40 or 3,32,32, for tracing the "
                           "model; default: from --data, else stored in ntdist run's checkpoints, else the model's "
                           "kwargs, else an image batch 3,32,32")
    for key in FUSE_KEYS:       # aliases of the keys, without a default of their own: the config's applies
        if key == "dedup":
            fuse.add_argument(fuse_flag(key), dest=key, action="store_const", const="on",
                              help="same as fusion.dedup=on")
        elif key == "methods":
            fuse.add_argument(fuse_flag(key), dest=key, metavar="METHOD", help="same as fusion.methods=[METHOD]")
        else:
            fuse.add_argument(fuse_flag(key), dest=key, metavar=key.upper(),
                              help=f"same as fusion.{key}={key.upper()}")
    fuse.add_argument("--dedup-inputs", default=None, metavar="FILE",
                      help="fusion.dedup_criterion=activations: a batch of training inputs, one tensor saved with "
                           "torch.save (a few hundred rows)")
    fuse.add_argument("--calibration", default=None, metavar="FILE|package.module:callable",
                      help="training inputs the repair fits the fused model on (NT: fusion.repair auto or lstsq; avg, "
                           "ot: lstsq): a "
                           "tensor saved with torch.save, or a callable returning such a tensor, a dataset of "
                           "(input, label) pairs or a DataLoader; fusion.calibration_samples of them are used; "
                           "default: the training inputs of --data")
    fuse.add_argument("--force", action="store_true", help="replace the output file if it exists")
    fuse.add_argument("--lazy", action="store_true",
                      help="members larger than memory: read and write one tensor at a time (avg, or nt without "
                           "repair or dedup; safetensors files and Hugging Face folders); the same result")


def _add_model_source(parser, runs: str) -> None:
    """The flags that say how checkpoints become models (`commands.checkpoints.ModelSource`), and --device."""
    parser.add_argument("--model", default=None,
                        help="architecture of plain state dicts: a registry name (mlp, resnet18), torchvision:<name> "
                             "or package.module:callable; default: the spec stored in ntdist's checkpoints (whose "
                             "kwargs a --model of the same name keeps)")
    parser.add_argument("--model-kwargs", default=None, metavar="JSON",
                        help="constructor arguments for --model as a JSON object, e.g. '{\"num_classes\": 10}'")
    parser.add_argument("--data", nargs="+", default=[], metavar="CONFIG.yaml|data.KEY=VALUE",
                        help="the data, as ntdist run takes them: a YAML config (its data: section; a run's "
                             "config.yaml) and/or data.key=value overrides; they fill in the model's classes and "
                             "input shape")
    parser.add_argument("--device", default="cpu", help=f"where {runs}: cpu (default), cuda, cuda:1")


def _add_eval(sub, common) -> None:
    ev = sub.add_parser("eval", parents=[common], help="accuracy and loss of checkpoints and their ensemble on a split",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="e.g.:\n  ntdist eval runs/quickstart/checkpoints/*.safetensors   "
                               "(the data: the run's config.yaml)\n"
                               "  ntdist eval a.pt b.pt --model torchvision:resnet18 data.name=cifar10 data.root=data "
                               "--json -\n  ntdist eval fused.safetensors --data my_run.yaml --split val")
    ev.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT|data.KEY=VALUE",
                    help="ntdist's .safetensors, or plain state dicts (.safetensors, weights-only torch files, "
                         "Lightning .ckpt) together with --model; and data.* key=value overrides (as --data)")
    _add_model_source(ev, "evaluation runs")
    ev.add_argument("--split", default="test", choices=EVAL_SPLITS, help="which split (default test)")
    ev.add_argument("--json", default=None, metavar="PATH|-",
                    help="also write the results as JSON to PATH; - prints only the JSON, on stdout")


def _add_bench(sub, common) -> None:
    bench = sub.add_parser("bench", parents=[common], help="benchmarks")
    bench.add_argument("what", choices=["fusion", "train"],
                       help="fusion: time and memory of avg, nt, ot (paper Table 8); "
                            "train: member training samples/s against a tight loop")
    fb, tb = fusion_bench, train_bench
    bench.add_argument("--quick", action="store_true",
                       help=f"fewer cases, same code (seconds): fusion {fb.QUICK}, train {tb.QUICK}; flags given "
                            "as well win")
    bench.add_argument("--widths", type=int, nargs="+", default=None,
                       help=f"fusion: hidden widths W of the two MLPs 3072-W-W-10 (default {list(fb.WIDTHS)})")
    bench.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median; "
                                                                  f"default {fb.REPEATS} for fusion, "
                                                                  f"{tb.REPEATS} for train)")
    bench.add_argument("--workloads", nargs="+", default=None, choices=list(tb.WORKLOADS),
                       help="train: model and data (default all)")
    bench.add_argument("--ks", type=int, nargs="+", default=None,
                       help=f"train: members on the one rank (default {list(tb.KS)})")
    bench.add_argument("--batches", type=int, nargs="+", default=None,
                       help=f"train: batch sizes (default {list(tb.BATCHES)})")
    bench.add_argument("--epochs", type=int, default=None,
                       help=f"train: timed epochs per measurement (default {tb.EPOCHS})")
    bench.add_argument("--threads", type=int, default=1, help="train: torch CPU threads (default 1)")
    bench.add_argument("--out", default=None, help="CSV file to write (default bench_fusion.csv / bench_train.csv)")


def _add_report(sub, common) -> None:
    report = sub.add_parser("report", parents=[common], help="write report.md and plots for run directories")
    report.add_argument("run_dirs", nargs="+", help="run directories (or folders containing them)")
    report.add_argument("--out", default=None, help="where to write the report (default: the first directory)")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's parser must not reset a --debug given before the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    parser = argparse.ArgumentParser(prog="ntdist", parents=[common],
                                     description="Train ensembles in parallel, fuse them by Neuron Transplantation, "
                                                 "fine-tune the fused model.")
    parser.add_argument("--version", action="version", version=f"ntdist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_run, _add_fuse, _add_eval, _add_bench, _add_report):
        add(sub, common)
    for command in sub.choices.values():   # an argument it does not know shows that command's usage
        command.set_defaults(command_parser=command)
    return parser


def cmd_run(args) -> int:
    if args.dry_run:
        return dry_run_command(args.config, args.overrides, args.world_size or 1, args.gpus_per_node)
    if args.world_size is not None or args.gpus_per_node is not None:
        raise UserError("--world-size and --gpus-per-node plan a run with --dry-run; a real run's ranks come from "
                        "its launcher (torchrun, srun, mpirun)")
    return run_command(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite)


def cmd_fuse(args) -> int:
    flags = [f"fusion.{key}=[{value}]" if key == "methods" else f"fusion.{key}={value}"
             for key in FUSE_KEYS if (value := getattr(args, key)) is not None]
    fusion = fusion_config(args.checkpoints, flags + args.overrides)
    if args.lazy:
        lazy_fuse(args.checkpoints, args.output, fusion, _model_source(args), args.force, args.dedup_inputs,
                  args.calibration)
        return 0
    fuse_command(args.checkpoints, args.output, fusion, _model_source(args), args.device, args.dedup_inputs,
                 args.force, args.calibration)
    return 0


def _model_source(args) -> ModelSource:
    return ModelSource(args.model, args.model_kwargs, tuple(args.data), getattr(args, "input_shape", None))


def cmd_eval(args) -> int:
    eval_command(args.checkpoints, _model_source(args), args.split, args.json, args.device)
    return 0


def _bench_setting(args, module, name: str):
    """A benchmark's setting: the flag if given, else `module.QUICK`'s with --quick, else the module's default."""
    given = getattr(args, name)
    if given is not None:
        return given
    if args.quick and name in module.QUICK:
        return module.QUICK[name]
    return getattr(module, name.upper(), None)


def cmd_bench(args) -> int:
    if args.what == "fusion":
        fusion_bench.bench_fusion(widths=tuple(_bench_setting(args, fusion_bench, "widths")),
                                  repeats=_bench_setting(args, fusion_bench, "repeats"),
                                  out_csv=args.out or "bench_fusion.csv")
        return 0
    torch.set_num_threads(args.threads)
    tb = train_bench
    train_bench.bench_train(tuple(_bench_setting(args, tb, "workloads")),
                            _bench_setting(args, tb, "ks"), _bench_setting(args, tb, "batches"),
                            _bench_setting(args, tb, "epochs"), _bench_setting(args, tb, "repeats"),
                            args.out or "bench_train.csv")
    return 0


def cmd_report(args) -> int:
    path = report_command(args.run_dirs, args.out)
    print(f"report: {path}")
    return 0


def _gather_overrides(args, extra) -> list:
    """Put the key=value overrides in `args.overrides` (and fuse's and eval's checkpoints in `args.checkpoints`,
    their data settings in `args.data`); return the rest of `extra`, the unrecognised arguments.

    argparse stops collecting positionals at the first flag (`run c.yaml --resume a=1`, `fuse a --method avg
    b`); fuse's and eval's positionals are checkpoints and overrides mixed (a key=value item that is no file).
    data.* overrides are data settings wherever they stand; of what `--data` swallowed only the YAML configs
    stay there (checkpoints and fusion.* overrides after it are positionals). eval takes no other overrides."""
    if args.command == "run":
        args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        return [x for x in extra if x not in args.overrides]
    if args.command in ("fuse", "eval"):
        given = args.inputs if args.command == "fuse" else args.checkpoints
        data = [x for x in args.data if x.endswith((".yaml", ".yml"))]
        items = [x for x in given + args.data + extra if not x.startswith("-") and x not in data]
        args.data = data + [x for x in items if x.startswith("data.") and "=" in x]
        args.overrides = [x for x in items if x not in args.data and "=" in x and not os.path.exists(x)]
        args.checkpoints = [x for x in items if x not in args.data and x not in args.overrides]
        flags = [x for x in extra if x.startswith("-")]
        return flags + args.overrides if args.command == "eval" else flags
    return extra


def main(argv=None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    extra = _gather_overrides(args, extra)
    if extra:
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    args.debug = getattr(args, "debug", False)   # absent unless given (see the SUPPRESS above)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {"run": cmd_run, "fuse": cmd_fuse, "eval": cmd_eval, "bench": cmd_bench,
               "report": cmd_report}[args.command]
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
