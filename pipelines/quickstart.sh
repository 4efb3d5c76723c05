#!/usr/bin/env bash
# Quickstart: install into .venv, then train the default preset on the embedded digits
# for 5 minutes. Extra arguments go to pipelines/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash pipelines/bootstrap.sh
exec .venv/bin/python -W ignore::UserWarning pipelines/train.py --time-budget-s 300 "$@"
