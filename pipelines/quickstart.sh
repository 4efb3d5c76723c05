#!/usr/bin/env bash
# Quickstart: install into .venv, then run the local sweep on the embedded digits (about
# 10 minutes on a 2-core laptop): Ray Tune over Ray Train trials, ASHA on FID, tracked in
# ./mlflow.db, the best generator registered as gan-generator, its samples written to
# runs/<sweep>/best_samples.png. Extra arguments go to pipelines/tune.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash pipelines/bootstrap.sh
# A new sweep each time; `pipelines/tune.py --name NAME --resume` continues an interrupted one.
exec .venv/bin/python -W ignore::UserWarning pipelines/tune.py --name "quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
