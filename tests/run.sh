#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install into .venv, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash pipelines/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
