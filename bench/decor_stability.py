""" Stability of the R update on wide twins: decor_lr x step cap (decor_max_step), with train.py on Fashion-MNIST

A decor_lr tuned on a small network can blow R up on a wide one: the step R <- (I - lr G) R is stable only while
lr |lambda|_max(G) stays below about 2, and after a ReLU |lambda|_max grows with the layer width (see
timm_dbp/layers/decorrelation.py). Every (twin, decor_lr, decor_max_step) trains a short run of the Fashion-MNIST
recipe (examples/fashion_mnist_bp_vs_dbp.py) and reports per epoch the mean decorrelation loss, the R updates refused
by the guard and shrunk by the cap, and test top-1. Runs are resumable (a finished summary.csv is read, not re-run).
Writes <out>.json (raw rows) and <out>.png (decorrelation loss per epoch).

    python bench/decor_stability.py --out docs/bench_stability   # resnet18 / 50, decor_lr 3e-3 / 1e-2, cap off / on
    python bench/decor_stability.py --models dbp_test_resnet --decor-lrs 1e-2 --max-steps inf 0.5 --epochs 1 \\
        --train-num-samples 256 --val-num-samples 128 --out /tmp/stability_smoke   # seconds-long smoke run
"""
import argparse
import csv
import json
import os
import sys
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'examples'))
from fashion_mnist_bp_vs_dbp import recipe_args, train_unless_done  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--models', nargs='+', default=['dbp_resnet18', 'dbp_resnet50'])
parser.add_argument('--opt', default='dbpsgd')
parser.add_argument('--lr', type=float, default=0.2, help='weight learning rate')
parser.add_argument('--decor-lrs', nargs='+', type=float, default=[3e-3, 1e-2])
parser.add_argument('--max-steps', nargs='+', type=float, default=[float('inf'), 0.5],
                    help='decor_max_step values (inf = no cap)')
parser.add_argument('--decor-samples', type=int, default=None,
                    help='inputs sampled per layer (default: the library\'s)')
parser.add_argument('--epochs', type=int, default=2)
parser.add_argument('--train-num-samples', type=int, default=3000)
parser.add_argument('--val-num-samples', type=int, default=1000)
parser.add_argument('-b', '--batch-size', type=int, default=128)
parser.add_argument('--seed', type=int, default=0)
parser.add_argument('--runs-dir', default=os.path.join(ROOT, 'output', 'stability'), help='train.py output root')
parser.add_argument('--out', required=True, help='output prefix: writes <out>.json and <out>.png')


def run_one(args, model: str, decor_lr: float, max_step: float) -> dict:
    experiment = f'{model}-{args.opt}-lr{args.lr:g}-dlr{decor_lr:g}-cap{max_step:g}-s{args.seed}-e{args.epochs}' \
                 f'-n{args.train_num_samples}' + (f'-ds{args.decor_samples}' if args.decor_samples else '')
    summary = os.path.join(args.runs_dir, 'train', experiment, 'summary.csv')
    train_args = [*recipe_args(args.epochs, args.batch_size, args.train_num_samples, args.lr, args.runs_dir, args.seed),
                  '--model', model, '--opt', args.opt, '--experiment', experiment, '--decor-lr', str(decor_lr),
                  '--val-num-samples', str(args.val_num_samples), '--decor-max-step', str(max_step)]
    if args.decor_samples:
        train_args += ['--decor-samples', str(args.decor_samples)]
    error = train_unless_done(train_args, summary, args.epochs, experiment)
    if error is not None:
        sys.exit(f'train.py failed for {experiment}:\n{error}')
    with open(summary) as f:
        rows = list(csv.DictReader(f))
    epochs = [dict(epoch=int(r['epoch']), decor_loss=float(r['train_decor_loss']),
                   skipped=int(r['train_decor_skipped']), capped=int(r['train_decor_capped']),
                   updates=int(r['train_decor_updates']), top1=float(r['eval_top1'])) for r in rows]
    return dict(model=model, decor_lr=decor_lr, max_step=max_step, epochs=epochs)


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot([e['epoch'] + 1 for e in r['epochs']], [e['decor_loss'] for e in r['epochs']], marker='o',
                label=f"{r['model']} decor_lr {r['decor_lr']:g} cap {r['max_step']:g}: "
                      f"top-1 {r['epochs'][-1]['top1']:.1f}%")
    ax.set(xlabel='epoch', ylabel='decorrelation loss (mean over layers)', yscale='log')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = parser.parse_args()
    started = datetime.now().isoformat(timespec='seconds')
    results = [run_one(args, model, decor_lr, max_step)
               for model in args.models for decor_lr in args.decor_lrs for max_step in args.max_steps]
    print(f"{'model':<18} {'decor_lr':>8} {'cap':>5}  decor loss per epoch            refused / capped / updates"
          f"   top-1")
    for r in results:
        last = r['epochs'][-1]
        losses = ' -> '.join(f"{e['decor_loss']:.3g}" for e in r['epochs'])
        print(f"{r['model']:<18} {r['decor_lr']:>8g} {r['max_step']:>5g}  {losses:<32} "
              f"{last['skipped']} / {last['capped']} / {last['updates']}   {last['top1']:.2f}")
    with open(args.out + '.json', 'w') as f:
        json.dump(dict(started=started, finished=datetime.now().isoformat(timespec='seconds'), argv=sys.argv,
                       args={k: v for k, v in vars(args).items()}, results=results), f, indent=1)
    plot(results, args.out + '.png')
    print(f'wrote {args.out}.json and {args.out}.png')


if __name__ == '__main__':
    main()
