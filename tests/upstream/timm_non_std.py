""" timm's own non-standard model contract (test_model_default_cfgs_non_std) on the dbp_ twins of timm's non-standard
models (ViT, DeiT, ...). timm picks that test by model name (NON_STD_FILTERS: 'vit_*', 'deit*', ...), which a dbp_
name never matches, so scripts/timm_suite.sh runs it through this file from the timm sdist's root (not collected by
`pytest tests`: the file name has no test_ prefix).
"""
import os
import sys
from fnmatch import fnmatch

import pytest
import timm

import timm_dbp  # noqa: F401  (registers the dbp_ models)

sys.path.insert(0, os.path.join(os.getcwd(), 'tests'))
import test_models as timm_tests  # noqa: E402  (timm's tests/test_models.py)

PATTERNS = os.environ.get('DBP_MODELS', 'dbp_*').split()
NON_STD_TWINS = [
    name for name in timm.list_models(PATTERNS, include_tags=True)
    if any(fnmatch(name[len('dbp_'):], f) for f in timm_tests.NON_STD_FILTERS)
    and not any(fnmatch(name[len('dbp_'):], f) for f in timm_tests.NON_STD_EXCLUDE_FILTERS)]


@pytest.mark.parametrize('model_name', NON_STD_TWINS)
def test_twin_default_cfgs_non_std(model_name):
    timm_tests.test_model_default_cfgs_non_std(model_name, 1, 'cpu')
