#!/usr/bin/env bash
# Acceptance on ONE GPU: every stage of `ntdist run` on CUDA, vectorised against one-after-another training,
# bf16/fp16, torch.compile, SIGTERM + --resume bit for bit, fusion on the GPU (ResNet-50, k=2 and 4) against a
# copy and the CPU, `ntdist fuse --device cuda`, two ranks on one GPU (gloo; NCCL must refuse in one line),
# `ntdist bench train`, and the dry run's memory against CUDA's. Synthetic data only; at most 8 minutes.
# Prints one table (PASS / FAIL / SKIP per check, with figures) and exits 1 on any FAIL. docs/PERFORMANCE.md,
# "On GPUs", says what each check asserts and where its table goes.
#
#   bash benchmarks/gpu_acceptance.sh               # from the repository root, on the GPU machine
#   bash benchmarks/gpu_acceptance.sh --cpu-smoke   # every check that can run on a CPU, tiny sizes (CI)
#   bash benchmarks/gpu_acceptance.sh --only vectorised sigterm_resume
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LIMIT=480
case " $* " in
    *" --cpu-smoke "*) export CUDA_VISIBLE_DEVICES=""; LIMIT=150 ;;
    *) command -v nvidia-smi >/dev/null && nvidia-smi -L ;;
esac
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's ntdist, also under torchrun
timeout --kill-after=20 "$LIMIT" "$PY" benchmarks/gpu_acceptance.py "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "overall: FAIL (the checks ran past ${LIMIT} s)"
fi
exit "$rc"
