#!/usr/bin/env bash
# A local MLflow tracking server. Clients only need its URL: artefacts are proxied
# (--artifacts-destination), so they need no bucket credentials.
#   BACKEND    store URI            (default sqlite:///mlflow.db)
#   ARTIFACTS  where artefacts live (default ./mlartifacts; or s3://bucket/prefix, with
#              AWS credentials and, for S3-compatible stores, MLFLOW_S3_ENDPOINT_URL)
#   HOST, PORT (default 127.0.0.1:5000)
set -euo pipefail
# The 3.17+ job runner starts extra worker processes (about 2 GB); training does not use it.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
exec mlflow server \
  --backend-store-uri "${BACKEND:-sqlite:///mlflow.db}" \
  --artifacts-destination "${ARTIFACTS:-./mlartifacts}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}" --workers "${WORKERS:-1}"
