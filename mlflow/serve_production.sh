#!/usr/bin/env bash
# The production MLflow tracking server: PostgreSQL backend, artefacts proxied to S3,
# basic-auth on. Every setting comes from the environment (a Kubernetes Secret, say);
# nothing secret is written to a committed file.
#   MLFLOW_BACKEND_URI           postgresql+psycopg2://user:password@host:5432/mlflow (pip install ".[server]")
#   MLFLOW_ARTIFACTS_DESTINATION s3://bucket/mlflow (server-side AWS credentials or IAM role)
#   MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD   the first admin account
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF secret, the same on every server replica
#   MLFLOW_AUTH_DATABASE_URI     where users and permissions live: a database of its own
#                                (its migrations would clash with the tracking store's)
set -euo pipefail
: "${MLFLOW_BACKEND_URI:?set MLFLOW_BACKEND_URI=postgresql+psycopg2://user:password@host:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/prefix}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME (authentication is required)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (authentication is required)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (a random string, the same on every replica)}"
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI=postgresql+psycopg2://user:password@host:5432/mlflow_auth}"
config=$(mktemp -t mlflow-auth-XXXXXX.ini)
chmod 600 "$config"
trap 'rm -f "$config"' EXIT
# MLflow reads this file with configparser, where % starts an interpolation: a URL-encoded
# password (p%40ss) would stop the server, so every % is doubled.
cat > "$config" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = ${MLFLOW_AUTH_DATABASE_URI//\%/%%}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME//\%/%%}
admin_password = ${MLFLOW_AUTH_ADMIN_PASSWORD//\%/%%}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
# The server is exec'd (below), so no trap can remove the file afterwards: it is removed
# now and read through a descriptor this process (the server, once exec'd) keeps open, so
# nothing secret is left on disk, even after a kill -9. Server workers, restarted ones too,
# open it by the server's pid.
exec 3<"$config"
rm -f "$config"
export MLFLOW_AUTH_CONFIG_PATH=/proc/$$/fd/3
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
# The backend URI holds the database password: through the environment (mlflow server reads
# MLFLOW_BACKEND_STORE_URI), never the command line, where every user sees it in ps.
export MLFLOW_BACKEND_STORE_URI=$MLFLOW_BACKEND_URI
# exec: the server takes this pid, so a SIGTERM to it (Kubernetes, systemd) stops the server.
exec mlflow server --app-name basic-auth \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --host "${HOST:-0.0.0.0}" --port "${PORT:-5000}" --workers "${WORKERS:-4}"
