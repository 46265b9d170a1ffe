#!/usr/bin/env bash
# Feeds apar's engine exports to the engines' own parsers, on CPU, and writes
# RESULTS.md beside this script. Not run by CI (it installs several GiB of Python
# packages). See README.md in this folder.
#
# Environment:
#   APAR_ENGINES_VENV     virtual environment to create or reuse (default /work/venv-engines)
#   APAR_PYTHON           Python for a new environment (default python3.12; Megatron-LM
#                         needs 3.12 or later)
#   APAR_MEGATRON_SRC     a Megatron-LM source tree at $MEGATRON_COMMIT, or
#   APAR_MEGATRON_GIT_DIR a Megatron-LM git directory to export that commit from
#   APAR_CHECK_OUT        folder for the intermediate files (default: a new temp folder)
#   APAR_CHECK_JOBS       parallel checks (default 2)
set -euo pipefail

MEGATRON_COMMIT=d98e8a64ddf34856e74b24714e3bedb2f5a39553
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENV=${APAR_ENGINES_VENV:-/work/venv-engines}
PYTHON=${APAR_PYTHON:-python3.12}
OUT=${APAR_CHECK_OUT:-$(mktemp -d)}
mkdir -p "$OUT"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q -r "$HERE/requirements.txt" -c "$HERE/requirements-lock.txt"

if [ -n "${APAR_MEGATRON_GIT_DIR:-}" ]; then
    MEGATRON_SRC="$OUT/megatron"
    rm -rf "$MEGATRON_SRC" && mkdir -p "$MEGATRON_SRC"
    git --git-dir="$APAR_MEGATRON_GIT_DIR" archive "$MEGATRON_COMMIT" | tar -x -C "$MEGATRON_SRC"
elif [ -n "${APAR_MEGATRON_SRC:-}" ]; then
    MEGATRON_SRC=$APAR_MEGATRON_SRC
    head=$(git -C "$MEGATRON_SRC" rev-parse HEAD 2>/dev/null || echo unknown)
    if [ "$head" != "$MEGATRON_COMMIT" ]; then
        echo "warning: $MEGATRON_SRC is at $head, not the pinned $MEGATRON_COMMIT" >&2
    fi
else
    echo "set APAR_MEGATRON_SRC or APAR_MEGATRON_GIT_DIR (Megatron-LM at $MEGATRON_COMMIT)" >&2
    exit 2
fi

(cd "$ROOT" && APAR_EXPORTS_OUT="$OUT/matrix.jsonl" \
    cargo test --test exports write_check_matrix -- --ignored --exact --quiet)

versions=$("$VENV/bin/python" - "$MEGATRON_COMMIT" <<'PY'
import sys
from importlib.metadata import version
pkgs = ["torch", "deepspeed", "torchtitan", "transformers", "accelerate"]
print("Versions: Megatron-LM " + sys.argv[1] + ", " + ", ".join(f"{p} {version(p)}" for p in pkgs)
      + f", Python {sys.version.split()[0]} (CPU only, no GPU).")
PY
)
cd "$OUT"
"$VENV/bin/python" "$HERE/check.py" "$OUT/matrix.jsonl" \
    --megatron-src "$MEGATRON_SRC" \
    --results "$HERE/RESULTS.md" \
    --versions "$versions" \
    --jobs "${APAR_CHECK_JOBS:-2}"
