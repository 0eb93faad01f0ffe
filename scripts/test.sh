#!/usr/bin/env bash
# Run timm-dbp's tests, then timm's own model and optimizer test-suites on the dbp_ models and dbp optimizers
# (from the timm sdist of the installed version, which ships tests/; fetched once into .cache/).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

python -m pytest tests -q -p no:cacheprovider

TIMM_VERSION="$(python -c 'import timm; print(timm.__version__)')"
SDIST="$ROOT/.cache/timm-sdist/timm-$TIMM_VERSION"
if [ ! -d "$SDIST/tests" ]; then
    mkdir -p "$ROOT/.cache/timm-sdist"
    python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
        -d "$ROOT/.cache/timm-sdist" "timm==$TIMM_VERSION"
    tar -xzf "$ROOT/.cache/timm-sdist/timm-$TIMM_VERSION.tar.gz" -C "$ROOT/.cache/timm-sdist"
fi

cd "$SDIST"
# Model contract on every dbp_ model. Deselected: the *_pretrained tests, which download weights from the
# Hugging Face Hub (no network in CI); pretrained loading is tested offline in tests/test_models.py.
python -m pytest tests/test_models.py -q -p no:cacheprovider -p timm_dbp -k "dbp_ and not pretrained"
# Optimizer suite on every registered dbp optimizer.
python -m pytest tests/test_optim.py -q -p no:cacheprovider -p timm_dbp -k "dbp"
