#!/usr/bin/env bash
# Run timm-dbp's tests, then timm's own model and optimizer test-suites on the dbp optimizers and a subset of the dbp_
# models (scripts/timm_suite.sh ci; `bash scripts/timm_suite.sh all` runs every dbp_ model, slower). Twins over 25M
# parameters are left out for time: `python -m pytest tests -m large` tests them. Tests run in TEST_WORKERS (default 2)
# pytest-xdist processes of one thread each (most tests are small and single-threaded anyway).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pytest tests -q -p no:cacheprovider -m "not large" -n "${TEST_WORKERS:-2}" --dist worksteal

bash scripts/timm_suite.sh ci
