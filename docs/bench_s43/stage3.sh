#!/bin/bash
# section 43g, after the CI run: a channel R instead of kron in the widest 3x3 convs of the wide twins
# (dbp_kron_max_dim=1152, section 37's option), step only; then the README main job from the CI clone
while ! grep -q "^rc " /work/ci43b.log; do sleep 15; done
touch /work/s43/RUNNING3
WT=/work/wt_s43
OUT=/work/main/docs/bench_s43
for r in 1 2; do
  for model in wide_resnet50_2 resnet50; do
    PYTHONPATH=$WT python $WT/bench/step_cost.py --configs $model:64:32 --repeats 7 \
        --out $OUT/step_${model}_64_b32_default_k$r >> /work/s43/step3.log 2>&1
    PYTHONPATH=$WT python $WT/bench/step_cost.py --configs $model:64:32 --repeats 7 --dbp dbp_kron_max_dim=1152 \
        --out $OUT/step_${model}_64_b32_kmax1152_k$r >> /work/s43/step3.log 2>&1
  done
done
cd /work/ci43b && (time bash -c "bash scripts/install.sh && python examples/fashion_mnist_bp_vs_dbp.py") > /work/s43/readme1.log 2>&1
echo "rc $?" >> /work/s43/readme1.log
cd /work/main && python -m pip install -q --no-deps -e . > /dev/null 2>&1
rm -f /work/s43/RUNNING3
