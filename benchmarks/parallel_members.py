"""Wall time of training k=2 members on 2 ranks against one process training them in turn.

    .venv/bin/python benchmarks/parallel_members.py [--repeats 3] [--epochs 200] [--width 256]

Both sides use 1 torch thread per rank and time only the member-training stage
(`train_seconds` in results.json, taken between barriers), so process start-up and
rendezvous are not counted. Prints the median of each and their ratio.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from ntdist.records.results import read_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(nproc: int, epochs: int, width: int, out: str) -> float:
    args = ["configs/quickstart.yaml", f"train.epochs={epochs}", f"model.kwargs.width={width}", "finetune.epochs=0", "fusion.methods=[nt]",
            "output.diversity=false", "distributed.threads_per_rank=1", f"output.dir={out}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "ntdist", "run", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "ntdist", "run", *args]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return read_results(out).train_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--width", type=int, default=256, help="MLP width (digits steps are tiny at width 32)")
    args = parser.parse_args()
    times = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for nproc in (1, 2):   # interleaved, so both sides see the same background load
                times[nproc].append(one_run(nproc, args.epochs, args.width, os.path.join(tmp, f"{nproc}-{r}")))
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"member training, k=2, width {args.width}, {args.epochs} epochs, median of {args.repeats}:")
    print(f"  1 process : {one:.2f} s  {[round(t, 2) for t in times[1]]}")
    print(f"  2 ranks   : {two:.2f} s  {[round(t, 2) for t in times[2]]}")
    print(f"  ratio     : {two / one:.2f}")


if __name__ == "__main__":
    main()
