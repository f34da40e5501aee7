"""Many `ntdist` command lines for the price of one interpreter start: imports `ntdist.cli` once, then runs each
command line in a forked child, as `python -m ntdist ARGS` would (its own environment, stdout and stderr to files,
its exit code), two at a time. Used by tests that check how dozens of bad inputs end.

    python tests/cli_batch.py CASES.json RESULTS.json

CASES.json: a list of {"args": [...], "env": {...}}; RESULTS.json: a list of {"returncode", "stdout", "stderr"}
in the same order. A child that runs past 120 s is killed (returncode -9).
"""

import importlib
import json
import os
import signal
import sys
import tempfile
import time
import traceback

TIMEOUT_S = 120


def _child(args, env, out_path, err_path) -> None:
    """In the forked child: what `python -m ntdist ARGS` does, with the case's environment and output files."""
    os.environ.update(env)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    code = 1
    try:
        from ntdist.cli import main
        code = main(list(args))
    except SystemExit as stop:        # argparse's errors and help
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:            # noqa: BLE001 - what the interpreter would print for an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def run_all(cases, workers: int = 2):
    importlib.import_module("ntdist.cli")   # once here, so that every child starts with it loaded
    tmp = tempfile.mkdtemp(prefix="cli_batch_")
    results, running, todo = [None] * len(cases), {}, list(enumerate(cases))
    while todo or running:
        while todo and len(running) < workers:
            i, case = todo.pop(0)
            out, err = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
            pid = os.fork()
            if pid == 0:
                _child(case["args"], case.get("env") or {}, out, err)
            running[pid] = (i, out, err, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for other, (_, _, _, start) in list(running.items()):
                if time.monotonic() - start > TIMEOUT_S:
                    os.kill(other, signal.SIGKILL)
            time.sleep(0.01)
            continue
        i, out, err, _ = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        with open(out) as f_out, open(err) as f_err:
            results[i] = {"returncode": code, "stdout": f_out.read(), "stderr": f_err.read()}
    return results


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        batch = json.load(f)
    with open(sys.argv[2], "w") as f:
        json.dump(run_all(batch), f)
