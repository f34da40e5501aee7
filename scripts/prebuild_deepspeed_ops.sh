#!/usr/bin/env bash
# Compile, once, the op DeepSpeed builds on its first deepspeed.initialize() (its shared-memory
# communication op, about 30 s with g++/ninja on 2 cores), so later runs and tests start at once.
#
# Usage:
#     scripts/prebuild_deepspeed_ops.sh [PYTHON]     # PYTHON defaults to .venv/bin/python, else python3
# The op is cached under $TORCH_EXTENSIONS_DIR (default: .torch_extensions/ in the repository, which
# git ignores); runs that set the same TORCH_EXTENSIONS_DIR reuse it. Does nothing, successfully, when
# deepspeed is not installed. Run it again any time: a cached op loads in about a second.
# The cache is reused by runs with the same TORCH_EXTENSIONS_DIR and the environment's bin/ first on
# PATH (an activated venv; the launcher tests do this).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${1:-}
if [[ -z $python ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then python=$repo/.venv/bin/python; else python=python3; fi
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$repo/.torch_extensions}
# Build with the environment's own tools first on PATH (its ninja), as runs in an activated
# environment do: torch rebuilds the op when the build commands differ from the cached ones.
python_bin=$(dirname "$(command -v "$python")")
export PATH=$python_bin:$PATH

if ! "$python" -c "import deepspeed" >/dev/null 2>&1; then
    echo "prebuild_deepspeed_ops: deepspeed is not installed for $python; nothing to build" >&2
    exit 0
fi
start=$SECONDS
"$python" - <<'PY' 2>&1 | grep -v -i "warn" || true
from deepspeed.accelerator import get_accelerator
import deepspeed.ops

builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
    print("prebuild_deepspeed_ops: this accelerator builds no shared-memory op")
else:
    builder.load()
    print(f"prebuild_deepspeed_ops: {builder.absolute_name()} ready")
PY
echo "prebuild_deepspeed_ops: done in $((SECONDS - start)) s (cache: $TORCH_EXTENSIONS_DIR)"
