""" Decoupled pipeline training (train.py --decoupled) vs ordinary BP: throughput and accuracy vs time, Fashion-MNIST

One architecture, one recipe (examples/fashion_mnist_bp_vs_dbp.py: 32 px, cosine, label smoothing), several seeds;
the methods differ only in how the 2 CPU cores are used:

    bp_2threads   K = 1: ordinary training, one process, 2 threads (the whole machine)
    bp_1thread    K = 1: ordinary training, one process, 1 thread (what one pipeline stage gets)
    ddp_2proc     the usual way to use 2 devices: data parallel, 2 processes of 1 thread, half the batch each
    locked_k2     K = 2, delay 0: the model split over 2 processes, locked backprop (the same maths as BP)
    fdg_k2        K = 2, delay 1: FDG, both stages busy every tick on delayed gradients
    adl_k2        K = 2, delay 1, accumulation 2: ADL (the first stage's gradients at most 1 step stale; the
                  effective batch doubles and timm's linear rule doubles the LR)
    fdg_k2_shrink05  fdg_k2 with FDG's gradient shrinking, beta = 0.5 (not in the default set)

Runs are interleaved (every method once per seed, then the next seed). Per method: training images per second
(train.py's train_time: training epochs only, the pipeline's per-epoch fill and flush included), final and best
top-1, and time to reach bp_2threads' final accuracy. Writes <out>.json (raw rows) and <out>.png.

    python bench/decoupled.py --out docs/bench_decoupled          # defaults below
    python bench/decoupled.py --methods bp_2threads fdg_k2 --seeds 0 --epochs 1 --train-num-samples 512 \\
        --val-num-samples 256 --out /tmp/decoupled_smoke            # seconds-long smoke run
"""
import argparse
import json
import os
import statistics
import sys
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'examples'))
from fashion_mnist_bp_vs_dbp import read_curve, recipe_args, time_to_reach, train_unless_done  # noqa: E402

# name: (processes, threads per process, extra train.py flags); 2 processes without --decoupled: DDP
METHODS = {
    'bp_2threads': (1, 2, []),
    'bp_1thread': (1, 1, []),
    'ddp_2proc': (2, 1, []),
    'locked_k2': (2, 1, ['--decoupled', '2', '--decoupled-delay', '0']),
    'fdg_k2': (2, 1, ['--decoupled', '2']),
    'adl_k2': (2, 1, ['--decoupled', '2', '--grad-accum-steps', '2']),
    'fdg_k2_shrink05': (2, 1, ['--decoupled', '2', '--decoupled-shrink', '0.5']),
}
DEFAULT_METHODS = ['bp_2threads', 'bp_1thread', 'ddp_2proc', 'locked_k2', 'fdg_k2', 'adl_k2']

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--methods', nargs='+', default=DEFAULT_METHODS, choices=list(METHODS))
parser.add_argument('--model', default='dbp_resnet18')
parser.add_argument('--opt', default='dbpsgd')
parser.add_argument('--lr', type=float, default=0.05, help='LR at batch size 128 (scaled linearly with the batch)')
parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
parser.add_argument('--epochs', type=int, default=3)
parser.add_argument('--train-num-samples', type=int, default=10000)
parser.add_argument('--val-num-samples', type=int, default=None)
parser.add_argument('-b', '--batch-size', type=int, default=64)
parser.add_argument('--runs-dir', default=os.path.join(ROOT, 'output', 'decoupled'), help='train.py output root')
parser.add_argument('--out', required=True, help='output prefix: writes <out>.json and <out>.png')


def run_one(args, method, seed):
    """Train one (method, seed) with train.py unless done already; returns its result row."""
    procs, threads, extra = METHODS[method]
    accum = int(extra[extra.index('--grad-accum-steps') + 1]) if '--grad-accum-steps' in extra else 1
    lr = args.lr * args.batch_size * accum / 128
    batch = args.batch_size // procs if procs > 1 and '--decoupled' not in extra else args.batch_size  # DDP: global
    experiment = f'{method}-{args.model}-s{seed}-e{args.epochs}-n{args.train_num_samples}-b{args.batch_size}'
    summary = os.path.join(args.runs_dir, 'train', experiment, 'summary.csv')
    launcher = [sys.executable] if procs == 1 else [
        sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}']
    train_args = [*recipe_args(args.epochs, batch, args.train_num_samples, lr, args.runs_dir, seed, 0),
                  '--model', args.model, '--opt', args.opt, '--experiment', experiment, '--no-energy', *extra]
    if args.val_num_samples:
        train_args += ['--val-num-samples', str(args.val_num_samples)]
    error = train_unless_done(train_args, summary, args.epochs, f'{method} seed {seed}', launcher=launcher,
                              env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if error is not None:
        print(error, file=sys.stderr)
        return dict(method=method, seed=seed, failed=True, curve=[])
    curve = read_curve(summary)
    train_time = curve[-1][0]
    row = dict(method=method, seed=seed, lr=lr, failed=False, curve=curve, final_top1=curve[-1][1],
               best_top1=max(a for _, a in curve), train_time=train_time,
               images_per_s=args.train_num_samples // args.batch_size * args.batch_size * args.epochs / train_time)
    print(f'    final {row["final_top1"]:.2f}  time {train_time:.1f}s  {row["images_per_s"]:.1f} img/s', flush=True)
    return row


def summarize(rows, methods, target_method):
    done = {m: [r for r in rows if r['method'] == m and not r['failed']] for m in methods}
    target = statistics.median(r['final_top1'] for r in done[target_method])
    bp_time = statistics.median(r['train_time'] for r in done[target_method])
    table = {}
    for m, runs in done.items():
        if not runs:
            continue
        reach = [time_to_reach(r['curve'], target) for r in runs]
        table[m] = dict(
            seeds=len(runs), final_top1=[r['final_top1'] for r in runs], images_per_s=[r['images_per_s'] for r in runs],
            train_time=[r['train_time'] for r in runs],
            final_median=statistics.median(r['final_top1'] for r in runs),
            best_median=statistics.median(r['best_top1'] for r in runs),
            images_per_s_median=statistics.median(r['images_per_s'] for r in runs),
            time_to_target=[t / bp_time if t is not None else None for t in reach],
            tta_median=statistics.median([t / bp_time if t is not None else float('inf') for t in reach]),
        )
    return target, bp_time, table


def plot(rows, table, path, target, target_method):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, method in enumerate(table):
        first = True
        for r in rows:
            if r['method'] == method and not r['failed']:
                ax.plot([t for t, _ in r['curve']], [a for _, a in r['curve']], color=f'C{i}', marker='o', ms=3,
                        alpha=0.7, label=method if first else None)
                first = False
    ax.axhline(target, color='k', ls='--', lw=1, label=f'target: {target_method} final {target:.2f}%')
    ax.set_xlabel('training wall-clock (s), evaluation excluded')
    ax.set_ylabel('Fashion-MNIST test top-1 (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title('Decoupled pipeline (K = 2 processes) vs BP on 2 CPU cores, every seed')
    fig.tight_layout()
    fig.savefig(path)


def main():
    args = parser.parse_args()
    rows = [run_one(args, method, seed) for seed in args.seeds for method in args.methods]
    target_method = args.methods[0]
    if not any(r['method'] == target_method and not r['failed'] for r in rows):
        sys.exit(f'every {target_method} run failed: no target')
    target, bp_time, table = summarize(rows, args.methods, target_method)
    print(f'\ntarget = {target_method} final top-1 (median) {target:.2f}%, its training time {bp_time:.1f}s')
    print(f'{"method":>16} {"img/s":>7} {"final":>7} {"best":>7} {"to target":>9}  raw img/s | final top-1 per seed')
    for m, t in table.items():
        raw = ' '.join(f'{x:.1f}' for x in t['images_per_s']) + ' | ' + ' '.join(f'{x:.2f}' for x in t['final_top1'])
        print(f'{m:>16} {t["images_per_s_median"]:7.1f} {t["final_median"]:7.2f} {t["best_median"]:7.2f} '
              f'{t["tta_median"]:9.2f}  {raw}')
    import torch
    meta = dict(date=datetime.now().isoformat(timespec='seconds'), command=' '.join(sys.argv), args=vars(args),
                torch=torch.__version__, cpus=os.cpu_count(), target=target, target_time=bp_time,
                methods={m: METHODS[m] for m in args.methods})
    with open(f'{args.out}.json', 'w') as f:
        json.dump(dict(meta=meta, table=table, rows=rows), f, indent=1)
    plot(rows, table, f'{args.out}.png', target, target_method)
    print(f'wrote {args.out}.json and {args.out}.png')


if __name__ == '__main__':
    main()
