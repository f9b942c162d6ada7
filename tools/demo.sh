#!/usr/bin/env bash
# One command from a fresh clone: install (torch 2.13.0 CPU first), compile the bundled tiny model,
# and generate text from a prompt with the artifact.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
xllm-compile tools/tiny-llama out/tiny-llama --force
xllm-run out/tiny-llama --prompt "The cache of keys and values" --max-new-tokens 30
xllm-run out/tiny-llama --prompt-ids 1,65,230,77 --max-new-tokens 8
