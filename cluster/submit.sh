#!/usr/bin/env bash
# `ray job submit` of this checkout with cluster/runtime_env.yaml, recording the commit:
# Ray uploads the working dir without .git, so without this the runs could not say which
# code they ran (they would be tagged "unknown").
#
#   bash cluster/submit.sh -- python pipelines/tune.py --storage s3://bucket/sweeps
#   RUNTIME_ENV=my_env.yaml bash cluster/submit.sh --no-wait -- python pipelines/train.py
#
# Options before `--` go to `ray job submit`; RAY_ADDRESS says which cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME_ENV=${RUNTIME_ENV:-cluster/runtime_env.yaml}
[ -x .venv/bin/ray ] && export PATH="$PWD/.venv/bin:$PATH"
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
runtime_env=$(python - "$RUNTIME_ENV" "$commit" <<'PY'
import json, sys, yaml
with open(sys.argv[1]) as f:
    env = yaml.safe_load(f) or {}
env.setdefault("env_vars", {})["GAN_SOURCE_COMMIT"] = sys.argv[2]
print(json.dumps(env))
PY
)
exec ray job submit --runtime-env-json "$runtime_env" "$@"
