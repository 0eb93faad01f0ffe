""" 49a: three seeds of BP-SGD (6 epochs), every-layer DBP and both options (4 epochs) at 64 px, read from the runs'
summary.csv files (docs/bench_s48/runs and docs/bench_s49/runs): final top-1, training time and time to BP-SGD's
median final top-1 (epoch granularity, as bench/time_to_accuracy.py) over BP-SGD's median time; writes summary.json and
summary.png next to this file. Usage: python docs/bench_s49/summary.py """
import csv
import glob
import json
import os
import statistics

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = ('bp_sgd-lr0.2-s{}-e6', 'dbp_kron_dlr3e-3-lr0.4-s{}-e4', 'dbp_kron_dlr3e-3_d2304_k1152-lr0.4-s{}-e4')
LABELS = ('BP-SGD, 6 epochs', 'DBP every layer (kron), 4 epochs', 'DBP both options (default), 4 epochs')


def curve(run):
    paths = [p for d in ('bench_s48', 'bench_s49')
             for p in glob.glob(os.path.join(HERE, '..', d, 'runs', f'{run}-n10000-b128_img-size_64.summary.csv'))]
    path = sorted(paths)[-1]  # a rerun in bench_s49 replaces a disturbed one of bench_s48
    with open(path) as f:
        return [(float(r['train_time']), float(r['eval_top1'])) for r in csv.DictReader(f)], os.path.relpath(path, HERE)


runs = {label: [curve(run.format(seed)) for seed in range(3)] for run, label in zip(RUNS, LABELS)}
bp = runs[LABELS[0]]
target = statistics.median(c[-1][1] for c, _ in bp)
bp_time = statistics.median(c[-1][0] for c, _ in bp)
table = {}
print(f'target (BP-SGD median final) {target:.2f} %, BP-SGD median time {bp_time:.1f} s')
for label, seeds in runs.items():
    reach = [next((t / bp_time for t, a in c if a >= target), None) for c, _ in seeds]
    table[label] = dict(final=[c[-1][1] for c, _ in seeds], time=[c[-1][0] for c, _ in seeds], to_target=reach,
                        files=[p for _, p in seeds])
    shown = ' / '.join('-' if r is None else f'{r:.2f}' for r in reach)
    print(f'{label:40s} final {" / ".join(f"{c[-1][1]:.2f}" for c, _ in seeds)} (median '
          f'{statistics.median(c[-1][1] for c, _ in seeds):.2f}); time {" / ".join(f"{c[-1][0]:.1f}" for c, _ in seeds)}'
          f'; to target {shown}')
with open(os.path.join(HERE, 'summary.json'), 'w') as f:
    json.dump(dict(target=target, bp_sgd_time=bp_time, runs=table), f, indent=1)
fig, ax = plt.subplots(figsize=(7, 4.5))
for (label, seeds), color in zip(runs.items(), ('C0', 'C1', 'C2')):
    for i, (c, _) in enumerate(seeds):
        ax.plot([t for t, _ in c], [a for _, a in c], 'o-', color=color, alpha=0.8, label=label if i == 0 else None)
ax.axhline(target, color='k', ls='--', lw=1, label=f'target: BP-SGD median final {target:.2f}%')
ax.set_xlabel('training wall-clock (s), evaluation excluded')
ax.set_ylabel('top-1 (%)')
ax.set_title('resnet18, Fashion-MNIST 64 px, AVX2 CPU, 3 seeds')
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(HERE, 'summary.png'), dpi=100)
