#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): bash benchmarks/gpu_check.sh [--cpu] [--out FILE.json]
# Runs from the repository root with the project's venv when there is one, else python3 (a GPU machine's own torch);
# wheels carried in .whl/ (packages that machine lacks) are installed into a temporary folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d /tmp/wsss-site.XXXXXX)
  trap 'rm -rf "$site"' EXIT
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" benchmarks/gpu_check.py "$@"
