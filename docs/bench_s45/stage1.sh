#!/bin/bash
# section 45a: one model per process, 64 px batch 64: resnet18 + SGD, dbp_resnet18 + dbpsgd with the old code (sampling
# in the forward, OLD) and the new (sampling in the optimizer step, NEW), eager and compiled (inductor), 5 rounds
OLD=/work/wt_s45old
NEW=/work/wt_s45new
OUT=/work/main/docs/bench_s45/one_model.jsonl
cd /work/main/docs/bench_s45
for r in 1 2 3 4 5; do
  for mode in eager compiled; do
    PYTHONPATH=$NEW python one_model.py resnet18 $mode >> $OUT 2>> stage1.err
    PYTHONPATH=$OLD python one_model.py dbp_resnet18 $mode >> $OUT 2>> stage1.err
    PYTHONPATH=$NEW python one_model.py dbp_resnet18 $mode >> $OUT 2>> stage1.err
  done
done
echo "rc $?" >> stage1.err
