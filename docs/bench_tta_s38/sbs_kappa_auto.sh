#!/bin/bash
# side by side, same hour: default DBP (kappa 0) and kappa auto, 4-epoch seed 0, alternated, BP-SGD 6-epoch seed 0 between
cd /work/wt_s38b
COMMON="--dataset fashion_mnist --img-size 32 -b 128 --train-num-samples 10000 --weight-decay 5e-4 --sched cosine --warmup-epochs 0 --smoothing 0.1 --scale 0.35 1 --color-jitter 0 --seed 0 -j 1 --log-interval 50 --checkpoint-hist 1 --output /work/s38/sbs"
DBP="--epochs 4 --lr 0.4 --model dbp_resnet18 --opt dbpsgd --model-kwargs dbp_structure=kron --decor-lr 3e-3 --decor-matmul-dtype bfloat16"
run() { name=$1; shift; echo "=== $name $(date -u +%H:%M:%S)"; PYTHONPATH=/work/wt_s38b python train.py $COMMON "$@" --experiment $name > /work/s38/sbs_$name.log 2>&1; echo "rc=$? $(tail -1 /work/s38/sbs/train/$name/summary.csv | cut -d, -f1,9)"; }
run k0_a $DBP --img-size 64
run auto_a $DBP --kappa auto --img-size 64
run bp_sgd --epochs 6 --lr 0.2 --model resnet18 --opt sgd --img-size 64
run k0_b $DBP --img-size 64
run auto_b $DBP --kappa auto --img-size 64
