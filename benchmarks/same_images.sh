#!/usr/bin/env bash
# The sha256 of what a preset generates after a short seeded run: run it before and after a
# change that must not change training (a refactor, an option that stays off), and compare.
#   bash benchmarks/same_images.sh                 # the default preset, 300 steps
#   bash benchmarks/same_images.sh dcgan-64 100 --set data.uri=/tmp/gan-bench/emoji-twitter-64
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-dcgan}; steps=${2:-300}; shift $(( $# < 2 ? $# : 2 ))
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
python=${PYTHON:-.venv/bin/python}
"$python" -W ignore pipelines/train.py --in-process --preset "$preset" --steps "$steps" --no-tracking \
  --storage "$out/runs" --name same --set train.seed=0 --set eval.every_kimg=10 "$@" > "$out/train.log"
"$python" -W ignore pipelines/sample.py --checkpoint "$out/runs/same" --n 64 --seed 1 --out "$out/samples.npz" > /dev/null
"$python" -c "import hashlib, numpy; print(hashlib.sha256(numpy.load('$out/samples.npz')['images'].tobytes()).hexdigest())"
