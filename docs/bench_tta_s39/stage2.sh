#!/bin/bash
# Stage 2 of section 39 (after stage 1's DBP 6-epoch seed 0): BP-SGD 12-epoch seeds 1-2, DBP 8-epoch and 12-epoch
while pgrep -f "bench/time_to_accuracy.py" > /dev/null; do sleep 5; done
cd /work/wt_s39
export PYTHONPATH=/work/wt_s39
D=dbp_kron_dlr3e-3_bf16
one() { python bench/time_to_accuracy.py --model resnet18 --train-flags="--img-size 64" --runs-dir /work/s39/tta64 --methods $1 --fixed-lr-mults $1=$2 --seeds $3 --epochs $4 --out /work/s39/st2_$1_e$4_s$3; }
one bp_sgd 4 1 12
one $D 8 0 8
one bp_sgd 4 2 12
one $D 8 1 8
one $D 8 2 8
one $D 8 0 12
one $D 8 1 12
one $D 8 2 12
echo STAGE2 DONE
