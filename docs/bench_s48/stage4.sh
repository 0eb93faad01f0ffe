#!/bin/bash
# pause between 48b's runs: the branch's targeted tests, README table, R sizes; then the 224 px step
cd /work/main
echo "=== table $(date -u +%H:%M:%S)"
python - <<'PY'
import importlib.util
spec = importlib.util.spec_from_file_location('mt', 'scripts/model_table.py'); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
readme = open('README.md').read()
start, end = '<!-- dbp-models-table -->\n', '<!-- /dbp-models-table -->'
i, j = readme.index(start) + len(start), readme.index(end)
open('README.md', 'w').write(readme[:i] + m.model_table() + readme[j:])
import timm, timm_dbp
from timm_dbp import decor_layers
for kw in ({}, dict(dbp_max_dim=0, dbp_kron_max_dim=0)):
    for s in ('full', 'channel', 'kron'):
        model = timm.create_model('dbp_resnet18', device='meta', dbp_structure=s, **kw)
        print(s, kw, round(sum(l.decor_state_bytes for _, l in decor_layers(model)) / 2**20, 2), 'MiB')
PY
echo "=== tests $(date -u +%H:%M:%S)"
python -m pytest -q -p no:cacheprovider -n 2 --dist worksteal tests/test_models.py tests/test_structured.py tests/test_readme_table.py tests/test_hub.py tests/test_train.py 2>&1 | tail -15
echo "=== step 224 $(date -u +%H:%M:%S)"
cd /work/wt_s48
export PYTHONPATH=/work/wt_s48
for r in 1 2; do
  python bench/step_cost.py --configs resnet18:224:32 --repeats 5 --out /work/s48/step/r18_224_b32_def_r$r 2>&1 | grep ratio
  python bench/step_cost.py --configs resnet18:224:32 --repeats 5 --dbp dbp_max_dim=2304 dbp_kron_max_dim=1152 --out /work/s48/step/r18_224_b32_d2304k1152_r$r 2>&1 | grep ratio
done
echo "=== end $(date -u +%H:%M:%S)"
