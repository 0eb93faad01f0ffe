#!/bin/bash
# section 47a/b: the update's products with one bmm against batch_matmul's split (bench/matmul_dtype.py), then the
# step of resnet50 (blocks of 256) old (69a6ab8) against new (34b5d5e) alternated, and resnet18 at 224 px new
cd /work/s47
PYTHONPATH=/work/wt_s47new python /work/wt_s47new/bench/matmul_dtype.py --dims 128 256 512 --batches 1 2 3 4 5 \
    --repeats 11 --out /work/main/docs/bench_s47/update > stage2_update.log 2>&1
for r in 1 2; do
  for v in old new; do
    WT=/work/wt_s47; [ $v = new ] && WT=/work/wt_s47new
    PYTHONPATH=$WT python $WT/bench/step_cost.py --configs resnet50:64:64 --repeats 5 \
        --out /work/main/docs/bench_s47/step_r50_64_b64_${v}_r$r >> stage2.log 2>&1
  done
done
PYTHONPATH=/work/wt_s47new python /work/wt_s47new/bench/step_cost.py --configs resnet18:224:32 --repeats 5 \
    --out /work/main/docs/bench_s47/step_r18_224_b32_new >> stage2.log 2>&1
echo "rc $?" >> stage2.log
