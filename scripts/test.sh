#!/usr/bin/env bash
# The test suite on a fresh machine: creates/reuses ./.venv with the pinned packages, then runs pytest.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
python -m pytest -q tests "$@"
