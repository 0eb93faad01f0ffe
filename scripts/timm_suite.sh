#!/usr/bin/env bash
# timm's own test-suites (tests/test_models.py, tests/test_optim.py of the timm sdist of the installed version, fetched
# once into .cache/) on the dbp_ models and the dbp optimizers.
#   bash scripts/timm_suite.sh ci    the CI subset: every family's smallest twins (a few minutes on 2 cores)
#   bash scripts/timm_suite.sh all   every registered dbp_ model (about 9 minutes on 2 idle cores)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
SUITE="${1:-ci}"
case "$SUITE" in
    ci) MODELS="dbp_test_* dbp_resnet18 dbp_resnet18d dbp_resnet50d dbp_resnext50_32x4d dbp_seresnet50
                dbp_convnext_atto dbp_efficientnet_b0 dbp_mobilenetv3_small_100 dbp_regnety_002
                dbp_vit_tiny_patch16_224 dbp_deit_tiny_patch16_224" ;;
    all) MODELS="dbp_*" ;;
    *) echo "usage: bash scripts/timm_suite.sh [ci|all] (got '$SUITE')" >&2; exit 2 ;;
esac

TIMM_VERSION="$(python -c 'import timm; print(timm.__version__)')"
SDIST="$ROOT/.cache/timm-sdist/timm-$TIMM_VERSION"
if [ ! -d "$SDIST/tests" ]; then
    mkdir -p "$ROOT/.cache/timm-sdist"
    python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
        -d "$ROOT/.cache/timm-sdist" "timm==$TIMM_VERSION"
    tar -xzf "$ROOT/.cache/timm-sdist/timm-$TIMM_VERSION.tar.gz" -C "$ROOT/.cache/timm-sdist"
fi

# pytest -k expression selecting the models: "dbp_a or dbp_b ..." (a trailing * is a prefix, as -k matches substrings)
SELECT="$(python -c 'import sys; print(" or ".join(m.rstrip("*") for m in sys.argv[1:]))' $MODELS)"
cd "$SDIST"
# Model contract. Deselected: the *_pretrained tests, which download weights from the Hugging Face Hub (no network in
# CI; pretrained loading is tested offline in tests/test_models.py), and timm's standard cfg test on the twins of
# models timm itself tests as non-standard (it picks them by name: 'vit_*', 'deit*'); those run timm's non-standard
# test instead, through tests/upstream/timm_non_std.py.
python -m pytest tests/test_models.py -q -p no:cacheprovider -p timm_dbp \
    -k "($SELECT) and not pretrained and not (test_model_default_cfgs and (_vit or _deit))"
DBP_MODELS="$MODELS" python -m pytest "$ROOT/tests/upstream/timm_non_std.py" -q -p no:cacheprovider
# Optimizer suite on every registered dbp optimizer.
python -m pytest tests/test_optim.py -q -p no:cacheprovider -p timm_dbp -k "dbp"
