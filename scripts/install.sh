#!/usr/bin/env bash
# The one install step behind `make test` and `make repro` (and so behind .ci/run):
# creates .venv if absent, installs the exact lock (torch first in the same command, so no
# other torch build is pulled in), the vlkit package itself (editable), and fetches the
# assets that do not come as wheels (the vaderSentiment sdist with the movie-review data).
# Idempotent: a stamp holding the hash of the lock and pyproject skips a second install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
want=$(cat requirements/lock.txt pyproject.toml | sha256sum | cut -c1-16)
stamp=.venv/.vlkit-install-stamp
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[install] installing requirements/lock.txt into .venv (first time: ~2 minutes)"
  .venv/bin/python -m pip install -q pip==26.3 wheel==0.48.0 setuptools==84.2.1
  .venv/bin/python -m pip install -q -r requirements/lock.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  .venv/bin/python -m pip check
  echo "$want" > "$stamp"
else
  echo "[install] .venv is up to date with requirements/lock.txt"
fi
bash scripts/fetch_assets.sh
