#!/usr/bin/env bash
# Run the test suite on CPU (sets the machine up first when .venv is missing). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/freelm" ] || bash scripts/setup.sh
exec "$VENV/bin/python" -m pytest tests "$@"
