""" BP vs DBP on Fashion-MNIST with train.py, side by side (the README's main job)

Runs train.py twice with one recipe: timm's `test_resnet` with `sgd` (BP) and its DBP twin `dbp_test_resnet` with
`dbpsgd` (DBP), same seed (so the same initial weights and the same batches: DBP sampling has its own RNG stream).
Then prints final and best test top-1, training wall-clock, and the time DBP needs to reach BP's final accuracy,
and writes accuracy vs training time for both as a PNG. Data: Debian's dataset-fashion-mnist (no download).

The defaults are one seed of the time-to-accuracy benchmark (docs/BENCHMARKS.md, section 27c): 10k images, 3 epochs,
cosine stepped every update, LR 0.4 (the multiplier that the same sweep chose for BP-SGD and for DBP).

    python examples/fashion_mnist_bp_vs_dbp.py                      # a few minutes on 2 CPU cores
    python examples/fashion_mnist_bp_vs_dbp.py --decor-interval 8      # DBP options apply to the DBP run only
    python examples/fashion_mnist_bp_vs_dbp.py --epochs 10 --train-num-samples 60000 -- --amp   # flags for both runs
"""
import argparse
import csv
import os
import subprocess
import sys
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--epochs', type=int, default=3)
parser.add_argument('--train-num-samples', type=int, default=10000, help='first N of the 60k training images')
parser.add_argument('-b', '--batch-size', type=int, default=128)
parser.add_argument('--lr', type=float, default=0.4,
                    help='8x timm\'s 0.05: the LR of the equal sweep (x2 / x4 / x8) for both methods, BENCHMARKS 27c')
parser.add_argument('--decor-lr', type=float, default=None, help='DBP: learning rate of R (default: the library\'s)')
parser.add_argument('--kappa', type=float, default=None, help='DBP: kappa (default: the library\'s)')
parser.add_argument('--decor-interval', type=int, default=None, help='DBP: update R every k steps (default: the library\'s)')
parser.add_argument('--workers', type=int, default=1)
parser.add_argument('--output', default=os.path.join(ROOT, 'output', 'fmnist-bp-vs-dbp'))
parser.add_argument('train_args', nargs='*', help='extra train.py flags for both runs (after --)')

RUNS = (('BP', 'test_resnet', 'sgd'), ('DBP', 'dbp_test_resnet', 'dbpsgd'))


def recipe_args(epochs, batch_size, train_num_samples, lr, output, seed=0, workers=1):
    """train.py flags of the Fashion-MNIST recipe shared by this example and bench/time_to_accuracy.py."""
    return [
        '--dataset', 'fashion_mnist', '--img-size', '32', '--epochs', str(epochs), '-b', str(batch_size),
        '--train-num-samples', str(train_num_samples), '--lr', str(lr), '--weight-decay', '5e-4',
        '--sched', 'cosine', '--warmup-epochs', '0', '--smoothing', '0.1', '--scale', '0.35', '1',
        '--color-jitter', '0', '--seed', str(seed), '-j', str(workers), '--log-interval', '50',
        '--checkpoint-hist', '1', '--output', output,
    ]


def read_curve(summary_csv):
    """[(cumulative train seconds, eval top-1)] per epoch from train.py's summary.csv."""
    with open(summary_csv) as f:
        return [(float(r['train_time']), float(r['eval_top1'])) for r in csv.DictReader(f) if r.get('eval_top1')]


def train_unless_done(train_args, summary_csv, epochs, label, env=None, launcher=None):
    """Run train.py with `train_args` (launched by `launcher`, default this Python) unless `summary_csv` already has
    `epochs` evaluated epochs, so benchmarks resume; returns None, or the tail of train.py's stderr if it failed."""
    if os.path.exists(summary_csv) and len(read_curve(summary_csv)) >= epochs:
        return None
    cmd = [*(launcher or [sys.executable]), os.path.join(ROOT, 'train.py'), *train_args]
    print(f'=== {label}: {" ".join(cmd[1:])}', flush=True)
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    return result.stderr[-3000:] if result.returncode != 0 else None


def time_to_reach(curve, target):
    return next((t for t, acc in curve if acc >= target), None)


def plot(curves, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, curve in curves.items():
        ax.plot([0] + [t for t, _ in curve], [10.0] + [a for _, a in curve], marker='o', label=name)
    ax.set_xlabel('training wall-clock (s)')
    ax.set_ylabel('Fashion-MNIST test top-1 (%)')
    ax.set_title('BP (test_resnet, sgd) vs DBP (dbp_test_resnet, dbpsgd)')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main():
    args = parser.parse_args()
    stamp = datetime.now().strftime('%Y%m%d-%H%M%S')
    common = recipe_args(args.epochs, args.batch_size, args.train_num_samples, args.lr, args.output,
                         workers=args.workers)
    curves = {}
    for name, model, opt in RUNS:
        experiment = f'{stamp}-{name.lower()}'
        dbp_flags = {'--decor-lr': args.decor_lr, '--kappa': args.kappa, '--decor-interval': args.decor_interval}
        extra = [x for flag, value in dbp_flags.items() if value is not None
                 for x in (flag, str(value))] if opt.startswith('dbp') else []
        cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *common, '--sched-on-updates', '--model', model,
               '--opt', opt, '--experiment', experiment, *extra, *args.train_args]
        print(f'=== {name}: {" ".join(cmd[1:])}', flush=True)
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f'{name} run failed (train.py said why above)')
        curves[name] = read_curve(os.path.join(args.output, 'train', experiment, 'summary.csv'))

    bp_final = curves['BP'][-1][1]
    print(f'\n{"":4} {"final top-1":>11} {"best top-1":>10} {"train time":>10} {"time to BP final":>16}')
    for name, curve in curves.items():
        t = time_to_reach(curve, bp_final)
        print(f'{name:4} {curve[-1][1]:11.2f} {max(a for _, a in curve):10.2f} {curve[-1][0]:9.1f}s '
              f'{(f"{t:.1f}s" if t is not None else "not reached"):>16}')
    reach = time_to_reach(curves['DBP'], bp_final)
    if reach is not None:
        print(f"DBP reached BP's final accuracy ({bp_final:.2f}%) in {reach / curves['BP'][-1][0]:.2f}x BP's "
              f"training time (epoch granularity).")
    else:
        print(f"DBP did not reach BP's final accuracy ({bp_final:.2f}%) in this run.")
    png = os.path.join(args.output, f'{stamp}-bp-vs-dbp.png')
    plot(curves, png)
    print(f'Plot: {png}')


if __name__ == '__main__':
    main()
