#!/bin/bash
# one.sh METHOD SEED EPOCHS MULT : one TTA run (64 px protocol of BENCHMARKS 34a / 39a) from the worktree
m=$1; s=$2; e=$3; mult=$4
cd /work/wt40 && PYTHONPATH=/work/wt40 python bench/time_to_accuracy.py --model resnet18 --methods $m \
  --fixed-lr-mults $m=$mult --seeds $s --epochs $e --train-flags="--img-size 64" --runs-dir /work/s40/tta64 \
  --out /work/s40/out/${m}_e${e}_s${s} > /work/s40/log/${m}_e${e}_s${s}.log 2>&1
echo "$(date -u +%H:%M:%S) done $m s$s e$e rc=$?" >> /work/s40/progress.txt
