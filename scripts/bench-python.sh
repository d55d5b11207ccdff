#!/usr/bin/env bash
# The Python peer of the end-to-end benchmark: a virtual environment in
# .cache/bench-venv with pinned NumPy and ONNX Runtime from PyPI. Idempotent;
# prints the interpreter's path. Used by `cargo bench -p outpost-tests
# --bench pipeline`, which calls it when the environment is missing.
#
#   scripts/bench-python.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=.cache/bench-venv
want="numpy==2.1.3 onnxruntime==1.20.1"
if [[ ! -x "$venv/bin/python" ]] || [[ "$(cat "$venv/.pins" 2>/dev/null)" != "$want" ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $want >&2
    echo "$want" >"$venv/.pins"
fi
echo "$PWD/$venv/bin/python"
