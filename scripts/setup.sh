#!/usr/bin/env bash
# Create .venv in the repository root and install the pinned dependencies and spikelib (editable).
# Needs Python 3.11 and pip; set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ "$version" != "3.11" ]; then
    echo "setup.sh: Python 3.11 is required (the pinned torch wheel is built for it), found $version at $python." >&2
    echo "Set PYTHON to a Python 3.11 interpreter and run again." >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
echo "setup.sh: environment ready in .venv"
