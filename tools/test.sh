#!/usr/bin/env bash
# One command from a fresh clone: install (torch 2.13.0 CPU first, then the test extras) and run the
# test suite. Extra arguments go to pytest (e.g. -x -k cache).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
exec python -m pytest "$@"
