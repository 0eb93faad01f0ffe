""" 50a: BP-SGD's 6-epoch schedule against the DBP default's 4-epoch one at 64 px, the two runs of each seed trained
epoch by epoch in step (bench/time_to_accuracy.py --interleave-epochs), read from runs/*.summary.csv: final top-1,
training time, time to BP-SGD's median final top-1 over BP-SGD's median time (the bench's ratio) and over the same
seed's BP-SGD time (paired: the two runs spanned the same minutes); each epoch's top-1 against 49a's runs of the same
seeds, trained without stops (docs/bench_s48/runs, docs/bench_s49/runs). Writes summary.json and summary.png next to
this file. Usage: python docs/bench_s50/summary.py """
import csv
import glob
import json
import os
import statistics

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = {'BP-SGD, 6 epochs': 'bp_sgd-lr0.2-s{}-e6', 'DBP default, 4 epochs': 'dbp_kron_dlr3e-3_d2304_k1152-lr0.4-s{}-e4'}
NAME = '{}-n10000-b128_img-size_64.summary.csv'
SEEDS = (0, 1, 2)


def rows(path):
    with open(path) as f:
        return [(float(r['train_time']), float(r['eval_top1'])) for r in csv.DictReader(f)]


def earlier_run(run):
    """49a's run of the same method and seed (a rerun in bench_s49 replaces a disturbed one of bench_s48)."""
    paths = sorted(p for d in ('bench_s48', 'bench_s49')
                   for p in glob.glob(os.path.join(HERE, '..', d, 'runs', NAME.format(run))))
    return rows(paths[-1]) if paths else None


def here(run):
    return os.path.join(HERE, 'runs', NAME.format(run))


runs = {label: {s: rows(here(run.format(s))) for s in SEEDS if os.path.exists(here(run.format(s)))}
        for label, run in RUNS.items()}
bp_label, dbp_label = RUNS
seeds = sorted(set(runs[bp_label]) & set(runs[dbp_label]))
target = statistics.median(runs[bp_label][s][-1][1] for s in seeds)
bp_time = statistics.median(runs[bp_label][s][-1][0] for s in seeds)
out = dict(target=target, bp_sgd_median_time=bp_time, seeds=seeds, runs={})
print(f'seeds {seeds}; target (BP-SGD median final) {target:.2f} %, BP-SGD median time {bp_time:.1f} s')
for label, run in RUNS.items():
    entry = out['runs'][label] = {}
    for s in seeds:
        curve, bp_curve = runs[label][s], runs[bp_label][s]
        reach = next((t for t, a in curve if a >= target), None)
        epoch_times = [b[0] - a[0] for a, b in zip([(0.0, 0.0)] + curve, curve)]
        before = earlier_run(run.format(s))
        entry[s] = dict(
            top1=[a for _, a in curve], final=curve[-1][1], time=curve[-1][0], epoch_times=epoch_times,
            to_target_over_median=None if reach is None else reach / bp_time,
            to_target_over_same_seed=None if reach is None else reach / bp_curve[-1][0],
            top1_as_49a=None if before is None else [a for _, a in before] == [a for _, a in curve],
            time_49a=None if before is None else before[-1][0])
        e = entry[s]
        fmt = lambda x: '-' if x is None else f'{x:.2f}'
        print(f'{label:22s} s{s}: top-1 {" / ".join(f"{a:.2f}" for a in e["top1"])}; time {e["time"]:.1f} s '
              f'(epochs {" ".join(f"{t:.1f}" for t in epoch_times)}); to target / median '
              f'{fmt(e["to_target_over_median"])}, / same seed {fmt(e["to_target_over_same_seed"])}; '
              f'top-1 as 49a: {e["top1_as_49a"]} (49a time {e["time_49a"]})')
    for key in ('to_target_over_median', 'to_target_over_same_seed'):
        values = [entry[s][key] if entry[s][key] is not None else float('inf') for s in seeds]
        entry[f'{key}_median'] = statistics.median(values)
    entry['final_median'] = statistics.median(entry[s]['final'] for s in seeds)
    print(f'{label:22s} median final {entry["final_median"]:.2f}; median to target / median '
          f'{entry["to_target_over_median_median"]:.2f}, / same seed {entry["to_target_over_same_seed_median"]:.2f}')
with open(os.path.join(HERE, 'summary.json'), 'w') as f:
    json.dump(out, f, indent=1)
fig, ax = plt.subplots(figsize=(7, 4.5))
for (label, by_seed), color in zip(runs.items(), ('C0', 'C2')):
    for i, s in enumerate(seeds):
        c = by_seed[s]
        ax.plot([t for t, _ in c], [a for _, a in c], 'o-', color=color, alpha=0.8, label=label if i == 0 else None)
ax.axhline(target, color='k', ls='--', lw=1, label=f'target: BP-SGD median final {target:.2f}%')
ax.set_xlabel('training wall-clock (s), evaluation excluded')
ax.set_ylabel('top-1 (%)')
ax.set_title('resnet18, Fashion-MNIST 64 px, AVX2 CPU, runs of a seed in step')
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(HERE, 'summary.png'), dpi=100)
