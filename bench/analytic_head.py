""" Analytic least-squares head vs a gradient-trained head on Fashion-MNIST, for three backbones (CPU)

Backbone: the DBP twin `dbp_test_resnet` at 32 px, 1 channel, in three states:
    random   as initialised (seed 0), never trained
    brief    train.py's Fashion-MNIST recipe (examples/fashion_mnist_bp_vs_dbp.py, dbpsgd) for --brief-epochs on the
             first --brief-num-samples training images
    full     the same recipe for --full-epochs on the first --train-num-samples images
Every head is fitted on the same images: the first --train-num-samples training images with eval transforms (no
augmentation), whose pooled features (the classifier's input) are computed once per backbone and cached; test top-1
is over the first --val-num-samples test images. Per backbone:
    analytic     RecursiveLeastSquares on the cached features, one-hot targets, one fit per --ridges value
    analytic_e2e timm_dbp.fit_analytic_head(model, loader) with --e2e-ridge: the library call, feature pass included
    probe        a linear probe: a fresh nn.Linear on the same cached features, AdamW (--probe-lr, cosine), cross
                 entropy, --probe-epochs epochs of batch -b
    own          the backbone's own head: trained end to end with it (brief, full), untrained (random)
Times are wall-clock (time.perf_counter, CPU): analytic and probe on cached features (the feature pass is timed once,
`feature_seconds`), analytic_e2e including it. One run; the backbones' train.py runs are resumable (a finished
run is read, not re-run). Writes <out>.json (everything, with this script's source) and <out>.png.

    python bench/analytic_head.py --threads 1 --out docs/bench_analytic_head   # 25 min on 2 busy CPU cores
    python bench/analytic_head.py --train-num-samples 256 --val-num-samples 128 --brief-num-samples 128 \\
        --full-epochs 1 --probe-epochs 1 --ridges 0 1 --runs-dir /tmp/ah --out /tmp/ah   # seconds-long smoke run
"""
import argparse
import json
import os
import sys
import time
from datetime import datetime

import torch
import torch.nn.functional as F
from torch import nn

import timm
from timm.data import create_loader, resolve_data_config

import timm_dbp
from timm_dbp.analytic import RecursiveLeastSquares
from timm_dbp.data import FashionMNIST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'examples'))
from fashion_mnist_bp_vs_dbp import read_curve, recipe_args, train_unless_done  # noqa: E402

MEAN, STD = (0.2860,), (0.3530,)  # train.py's Fashion-MNIST defaults

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--model', default='dbp_test_resnet')
parser.add_argument('--train-num-samples', type=int, default=10000, help='head fit set; full backbone training set')
parser.add_argument('--val-num-samples', type=int, default=2000, help='test images (the first N of the 10k)')
parser.add_argument('--brief-epochs', type=int, default=1)
parser.add_argument('--brief-num-samples', type=int, default=5000)
parser.add_argument('--full-epochs', type=int, default=3)
parser.add_argument('--ridges', nargs='+', type=float, default=[0.0, 1e-3, 1e-1, 10.0, 1e3])
parser.add_argument('--e2e-ridge', type=float, default=1e-3, help='ridge of the fit_analytic_head call')
parser.add_argument('--probe-epochs', type=int, default=20)
parser.add_argument('--probe-lr', type=float, default=3e-3)
parser.add_argument('-b', '--batch-size', type=int, default=128)
parser.add_argument('--lr', type=float, default=0.05, help='backbone training (train.py recipe, dbpsgd)')
parser.add_argument('--workers', type=int, default=1)
parser.add_argument('--threads', type=int, default=None, help='torch threads of the head fits (default: torch\'s)')
parser.add_argument('--runs-dir', default=os.path.join(ROOT, 'output', 'analytic_head'), help='train.py output root')
parser.add_argument('--out', required=True, help='output prefix: writes <out>.json and <out>.png')


def train_backbone(args, name, epochs, num_samples):
    """Train the backbone with train.py's recipe unless done already; returns its last.pth.tar and summary curve."""
    experiment = f'{name}-{args.model}-e{epochs}-n{num_samples}-b{args.batch_size}-lr{args.lr:g}'
    exp_dir = os.path.join(args.runs_dir, 'train', experiment)
    summary = os.path.join(exp_dir, 'summary.csv')
    train_args = [*recipe_args(epochs, args.batch_size, num_samples, args.lr, args.runs_dir, 0, args.workers),
                  '--model', args.model, '--opt', 'dbpsgd', '--decor-lr', '1e-3', '--kappa', '0',
                  '--experiment', experiment, '--no-energy']
    if args.val_num_samples:
        train_args += ['--val-num-samples', str(args.val_num_samples)]
    error = train_unless_done(train_args, summary, epochs, f'{name} backbone')
    if error is not None:
        sys.exit(f'{name} backbone: train.py failed:\n{error}')
    return os.path.join(exp_dir, 'last.pth.tar'), read_curve(summary)


def eval_loader(model, split, num_samples, args):
    """train.py's eval loader (32 px, Fashion-MNIST mean / std, center crop) over one split."""
    config = resolve_data_config(dict(img_size=32, in_chans=1, mean=MEAN, std=STD), model=model)
    return create_loader(
        FashionMNIST(split=split, num_samples=num_samples), input_size=config['input_size'],
        batch_size=args.batch_size, is_training=False, interpolation=config['interpolation'], mean=config['mean'],
        std=config['std'], crop_pct=config['crop_pct'], num_workers=args.workers, use_prefetcher=False)


@torch.no_grad()
def pooled_features(model, loader):
    """(features (N, d): the classifier's input, logits (N, classes), labels (N,)) over a loader, eval mode."""
    model.eval()
    features, logits, labels = [], [], []
    for images, target in loader:
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        features.append(pooled)
        logits.append(model.get_classifier()(pooled))
        labels.append(target)
    return torch.cat(features), torch.cat(logits), torch.cat(labels)


def top1(logits, labels):
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def analytic_head(features, labels, ridge, batch_size):
    """Least-squares head on cached features, fed in loader-sized batches; returns (weight, bias, seconds)."""
    start = time.perf_counter()
    solver = RecursiveLeastSquares(features.shape[1], 10, ridge=ridge)
    for i in range(0, len(features), batch_size):
        solver.update(features[i:i + batch_size], F.one_hot(labels[i:i + batch_size], 10))
    weight, bias, _ = solver.solution()
    return weight.float(), bias.float(), time.perf_counter() - start


def linear_probe(features, labels, test_features, test_labels, args):
    """A fresh nn.Linear trained by AdamW on cached features; returns (test top-1 per epoch, seconds)."""
    torch.manual_seed(0)
    head = nn.Linear(features.shape[1], 10)
    steps = args.probe_epochs * -(-len(features) // args.batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=args.probe_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    curve, seconds = [], 0.0
    for _ in range(args.probe_epochs):
        start = time.perf_counter()
        order = torch.randperm(len(features))
        for i in range(0, len(features), args.batch_size):
            idx = order[i:i + args.batch_size]
            loss = F.cross_entropy(head(features[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        seconds += time.perf_counter() - start
        with torch.no_grad():
            curve.append(top1(head(test_features), test_labels))  # evaluation not timed
    return curve, seconds


def run_backbone(args, name, model):
    """Every head on one backbone; returns its result row."""
    fit_loader = eval_loader(model, 'train', args.train_num_samples, args)
    test_loader = eval_loader(model, 'test', args.val_num_samples, args)
    start = time.perf_counter()
    features, _, labels = pooled_features(model, fit_loader)
    feature_seconds = time.perf_counter() - start
    test_features, test_logits, test_labels = pooled_features(model, test_loader)
    row = dict(backbone=name, num_features=features.shape[1], fit_samples=len(features),
               test_samples=len(test_labels), feature_seconds=feature_seconds, own_top1=top1(test_logits, test_labels))
    print(f'--- {name}: {features.shape[1]} features, {len(features)} fit / {len(test_labels)} test images, '
          f'feature pass {feature_seconds:.1f}s, own head {row["own_top1"]:.2f}', flush=True)
    row['analytic'] = []
    for ridge in args.ridges:
        weight, bias, seconds = analytic_head(features, labels, ridge, args.batch_size)
        acc = top1(test_features @ weight.T + bias, test_labels)
        row['analytic'].append(dict(ridge=ridge, top1=acc, seconds=seconds))
        print(f'    analytic ridge {ridge:<8g} top-1 {acc:6.2f}  {seconds:.2f}s', flush=True)
    info = timm_dbp.fit_analytic_head(model, fit_loader, ridge=args.e2e_ridge)
    with torch.no_grad():  # the refitted classifier on the cached test features (the backbone is unchanged)
        e2e_top1 = top1(model.get_classifier()(test_features), test_labels)
    row['analytic_e2e'] = dict(ridge=args.e2e_ridge, top1=e2e_top1, seconds=info['seconds'])
    print(f'    fit_analytic_head ridge {args.e2e_ridge:g} (feature pass included) top-1 '
          f'{row["analytic_e2e"]["top1"]:6.2f}  {info["seconds"]:.1f}s', flush=True)
    curve, seconds = linear_probe(features, labels, test_features, test_labels, args)
    row['probe'] = dict(top1=curve[-1], best_top1=max(curve), curve=curve, seconds=seconds, epochs=args.probe_epochs,
                        lr=args.probe_lr)
    print(f'    linear probe ({args.probe_epochs} epochs AdamW) top-1 {curve[-1]:6.2f} (best {max(curve):.2f})  '
          f'{seconds:.2f}s', flush=True)
    return row


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    labels = (['own head (random: untrained)'] + [f'analytic, ridge {a["ridge"]:g}' for a in rows[0]['analytic']]
              + ['linear probe'])
    width = 0.8 / len(labels)
    for i, row in enumerate(rows):
        values = [row['own_top1']] + [a['top1'] for a in row['analytic']] + [row['probe']['top1']]
        for j, value in enumerate(values):
            ax.bar(i + (j - len(labels) / 2 + 0.5) * width, value, width, color=f'C{j}',
                   label=labels[j] if i == 0 else None)
    ax.set_xticks(range(len(rows)), [r['backbone'] for r in rows])
    ax.set_ylabel('Fashion-MNIST test top-1 (%)')
    ax.set_title('Heads on a frozen dbp_test_resnet backbone')
    ax.grid(alpha=0.3, axis='y')
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc='upper left')
    fig.tight_layout()
    fig.savefig(path)


def main():
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbones = [('random', None, [])]
    for name, epochs, num_samples in (('brief', args.brief_epochs, args.brief_num_samples),
                                      ('full', args.full_epochs, args.train_num_samples)):
        start = time.perf_counter()
        checkpoint, curve = train_backbone(args, name, epochs, num_samples)
        print(f'    {name} backbone: {epochs} epochs on {num_samples} images, train.py eval top-1 {curve[-1][1]:.2f}, '
              f'train time {curve[-1][0]:.1f}s (this call {time.perf_counter() - start:.0f}s)', flush=True)
        backbones.append((name, checkpoint, curve))
    rows = []
    for name, checkpoint, curve in backbones:
        model = timm.create_model(args.model, num_classes=10, in_chans=1)
        if checkpoint is not None:
            model.load_state_dict(torch.load(checkpoint, map_location='cpu', weights_only=False)['state_dict'])
        row = run_backbone(args, name, model)
        row['backbone_curve'] = curve
        rows.append(row)
    meta = dict(date=datetime.now().isoformat(timespec='seconds'), command=' '.join(sys.argv), args=vars(args),
                threads=torch.get_num_threads(), torch=torch.__version__, timm=timm.__version__,
                source=open(__file__).read())
    with open(f'{args.out}.json', 'w') as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    plot(rows, f'{args.out}.png')
    print(f'wrote {args.out}.json and {args.out}.png')


if __name__ == '__main__':
    main()
