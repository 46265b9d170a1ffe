#!/usr/bin/env bash
# Builds the Python package into a virtual environment with pinned versions and runs
# its tests, then generates the API reference from the docstrings.
#
#   APAR_PYENV   the environment (default ~/.cache/apar-pyenv): reused when present,
#                created with $APAR_PYTHON (default python3) and the pins of
#                requirements.txt / requirements-lock.txt when absent. torch is large;
#                keeping the environment outside the clone makes later runs fast.
#   APAR_DOCS    where the API reference goes (default target/python-docs).
set -euo pipefail
cd "$(dirname "$0")"
PYENV="${APAR_PYENV:-$HOME/.cache/apar-pyenv}"
if [ ! -x "$PYENV/bin/python" ]; then
    "${APAR_PYTHON:-python3}" -m venv "$PYENV"
fi
PY="$PYENV/bin/python"
# The build backend runs the environment's `maturin` executable.
export PATH="$PYENV/bin:$PATH"
"$PY" -m pip install -q -r requirements.txt -c requirements-lock.txt
# The pinned maturin builds the extension (no isolated build environment), in the
# dev profile unless APAR_PY_PROFILE says otherwise (the package's default is release).
MATURIN_PEP517_ARGS="--profile ${APAR_PY_PROFILE:-dev}" \
    "$PY" -m pip install -q --no-build-isolation --force-reinstall --no-deps .
# pytest exits 5 when it collects no test: that fails here like any other failure.
# Torch and transformers are required here: their absence fails instead of skipping.
(cd tests && APAR_REQUIRE_TORCH=1 "$PY" -m pytest -q -p no:cacheprovider -p no:logging .)
# From tests/, with -P: `import apar` is the installed package, not the source folder.
DOCS="$(cd .. && pwd)/target/python-docs"
(cd tests && "$PY" -P ../gen_docs.py "${APAR_DOCS:-$DOCS}")
