#!/usr/bin/env bash
# The whole suite: lint, then every test on SQLite, then the database tests again on PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  MILLM_TEST_POSTGRES=1 .venv/bin/python -m pytest -m "not slow" tests/catalog tests/api -q
else
  echo "PostgreSQL server not installed: skipping the PostgreSQL pass" >&2
fi
