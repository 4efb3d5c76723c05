#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install into .venv, then pytest.
#   bash tests/run.sh            everything (CI's command)
#   bash tests/run.sh --fast     the library and every refused input, in a few minutes: no Ray,
#                                no server of any kind, no heavy end-to-end run
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
fast=false
args=()
for arg in "$@"; do
  if [ "$arg" = --fast ]; then fast=true; else args+=("$arg"); fi
done
bash pipelines/bootstrap.sh
if $fast; then
  exec .venv/bin/python -m pytest -n 2 -m "not integration and not slow" ${args[@]+"${args[@]}"}
fi
# The MLflow server tests run a private PostgreSQL: Debian's server binaries.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null; then
  echo "installing Debian's postgresql for the tracking-server tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
# The MLflow UI test drives Debian's Chromium (Playwright's own browser download is not used).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium for the MLflow UI test"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# Two lanes (conftest.py makes them): the modules that start a local Ray in one, one test
# at a time, everything else in the other. Much of a Ray test is one process starting
# after another, which leaves a core idle for the other lane.
exec .venv/bin/python -m pytest -n 2 --no-loadscope-reorder ${args[@]+"${args[@]}"}
