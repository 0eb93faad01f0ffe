#!/bin/bash
# after stage1.sh: the changed test files on the working tree, then 49b: the 224 px step (48c's command, rerun)
while pgrep -f stage1.sh >/dev/null; do sleep 10; done
cd /work/main
echo "=== tests $(date -u +%H:%M:%S)"
python -m pytest -q -p no:cacheprovider -n 2 --dist worksteal tests/test_train.py tests/test_validate.py \
  tests/test_hub.py tests/test_models.py 2>&1 | tail -15
echo "=== step 224 $(date -u +%H:%M:%S)"
while [ -e /work/s49/pause ]; do sleep 10; done
cd /work/wt_s49
export PYTHONPATH=/work/wt_s49
for r in 1 2; do
  python bench/step_cost.py --configs resnet18:224:32 --repeats 5 --out /work/s49/step/r18_224_b32_def_r$r 2>&1 | grep ratio
  python bench/step_cost.py --configs resnet18:224:32 --repeats 5 --dbp dbp_max_dim=2304 dbp_kron_max_dim=1152 \
    --out /work/s49/step/r18_224_b32_d2304k1152_r$r 2>&1 | grep ratio
done
echo "=== end $(date -u +%H:%M:%S)"
