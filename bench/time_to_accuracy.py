""" Time to accuracy on Fashion-MNIST: BP with timm's optimizers vs DBP, several seeds, equal learning-rate sweeps

Every method trains the same architecture (timm's `test_resnet`, or its DBP twin) with the same train.py recipe
(examples/fashion_mnist_bp_vs_dbp.py: 32 px, cosine schedule, label smoothing, random-resized-crop), differing only
in optimizer (and, for DBP, the model's R). Equal tuning budget: every method gets the same sweep of learning-rate
multipliers around its usual base LR, on the sweep seed; its best LR (final top-1) then runs on the other seeds.
Runs are interleaved (method A B C ... for each LR / seed), so slow drifts of the machine hit every method alike;
with --interleave-epochs the runs of each phase go one epoch at a time in step (A1 B1 A2 B2 ...), so each run spans
the same stretch of wall-clock (train.py --stop-after-epoch and --resume auto: the same runs, continued exactly).

Target: BP-SGD's final top-1 (median over seeds). Per method: final and best top-1, and the training wall-clock
(train.py's `train_time`, evaluation excluded) to first reach the target, divided by BP-SGD's total training time
(epoch granularity: the first evaluated epoch at or above the target), and the energy of the training epochs
(codecarbon, when installed: train.py's `train_energy_kwh`). Runs are resumable: a finished run
(summary.csv with every epoch) is read, not re-run. Writes <out>.json (raw rows, every run) and <out>.png.

Shorter schedules (`--budgets`): a cosine schedule reaches its accuracy only at its end, so within one run of
--epochs every method crosses the target in its last epoch or two, and the ratio above is mostly the ratio of epoch
costs. With `--budgets 1 2` every method also trains complete shorter schedules (1 and 2 epochs, the same recipe,
its chosen LR, every seed), and "time to target, any budget" is per seed the earliest crossing over all of that
method's schedules (the time-to-train protocol of MLPerf and airbench). Every method gets the same budgets; the
target stays BP-SGD's final top-1 of the --epochs schedule. `--budget-methods` limits them to some methods (say so
when reporting: a method without shorter schedules can only cross the target in its --epochs runs).

A best LR at the edge of the sweep says a wider sweep might find a better one. `--extend-edges N` widens the sweep
by one point beyond each edge where some method's best multiplier lies (by the sweep's outer spacing: x16 after
... 4 8), for every method alike (the tuning budget stays equal), and picks again, up to N times; the JSON records
the sweep that ran (`meta.sweep`), and every method whose best still lies at an edge is named in the output and
flagged in the table (`best_at_sweep_edge`).

Longer schedules (`--fixed-lr-mults METHOD=MULT ...`): those methods skip the sweep and train at that multiplier,
their choice from the sweep of a shorter schedule of the same protocol (as section 28b did at 12 epochs). Give one
for every method, so that the tuning budget stays equal; the JSON records them.

    python bench/time_to_accuracy.py --out docs/bench_tta   # defaults below; about 1 h on 2 CPU cores
    python bench/time_to_accuracy.py --methods bp_sgd dbp_kron --lr-mults 1 --seeds 0 --epochs 1 \\
        --train-num-samples 512 --out /tmp/tta_smoke   # seconds-long smoke run
    python bench/time_to_accuracy.py --lr-mults 2 4 --budgets 1 2 --out docs/bench_tta_budgets   # + shorter schedules
    python bench/time_to_accuracy.py --train-flags="--sched-on-updates" ...   # cosine stepped every update (note the =)
    python bench/time_to_accuracy.py --methods bp_sgd dbp_kron --lr-mults 1 2 4 --extend-edges 2 ...  # x0.5 / x8 ...
    python bench/time_to_accuracy.py --methods bp_sgd dbp_kron --fixed-lr-mults bp_sgd=4 dbp_kron=8 --epochs 12 \\
        --budgets 6 --budget-methods dbp_kron ...   # 12 epochs at the 6-epoch choices; DBP's 6-epoch schedule too
    python bench/time_to_accuracy.py --methods bp_sgd dbp_kron --fixed-lr-mults bp_sgd=4 dbp_kron=8 --epochs 6 \\
        --method-epochs dbp_kron=4 --interleave-epochs ...   # BP's 6 epochs against DBP's 4, epoch by epoch in step
"""
import argparse
import csv
import json
import os
import shlex
import statistics
import sys
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'examples'))
from fashion_mnist_bp_vs_dbp import (  # noqa: E402
    read_curve, recipe_args, time_to_reach, train_unless_done)

# name: (model prefix, --opt, base lr, extra train.py flags[, environment]). BP methods train timm's model, DBP ones
# its twin. timm's kron contracts a conv weight's preconditioner with one einsum: without opt_einsum (the `bench`
# extra) torch contracts it left to right and asks for a 110 GB buffer, and torch.compile on CPU lowers it the same
# way, so kron runs eagerly with opt_einsum (TORCHDYNAMO_DISABLE=1: the same maths, uncompiled).
ADAPTIVE_WD = ['--weight-decay', '0.05']
BF16_DBP_FLAGS = ['--decor-lr', '3e-3', '--decor-matmul-dtype', 'bfloat16']  # DBP pinned as the section-32 default
METHODS = {
    'bp_sgd': ('', 'sgd', 0.05, []),
    'bp_adamw': ('', 'adamw', 2e-3, ADAPTIVE_WD),
    'bp_muon': ('', 'muon', 0.01, ADAPTIVE_WD),
    'bp_kron': ('', 'kron', 1e-3, ADAPTIVE_WD, {'TORCHDYNAMO_DISABLE': '1'}),
    'bp_adopt': ('', 'adopt', 2e-3, ADAPTIVE_WD),
    'bp_lamb': ('', 'lamb', 5e-3, ADAPTIVE_WD),
    'dbp_full': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=full', '--kappa', '0']),  # the paper's R
    'dbp_full_i8': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=full', '--decor-interval', '8']),
    'dbp_channel': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=channel', '--kappa', '0']),
    'dbp_kron': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', '--kappa', '0']),
    'dbp_kron_k05': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', '--kappa', '0.5']),
    'dbp_kron_kauto': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', '--kappa', 'auto']),
    # the cost lever of the kron default: R updated every 4th step (at the same or 4x the decor_lr)
    'dbp_kron_i4': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', '--decor-interval', '4']),
    'dbp_kron_i4_dlr4e-3': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', '--decor-interval', '4',
                                                     '--decor-lr', '4e-3']),
    # the decor_interval lever at the section-21 decor_lr (pinned, so the name says what ran)
    **{f'dbp_kron_i{k}_dlr3e-3': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron',
                                                          '--decor-interval', str(k), '--decor-lr', '3e-3'])
       for k in (2, 4)},
    # the decor_lr sweep of the kron default (section 21; dbp_kron ran with the default of its time: 1e-3 before
    # section 21, 3e-3 since)
    **{f'dbp_kron_dlr{dlr}': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', '--decor-lr', dlr])
       for dlr in ('1e-4', '3e-4', '1e-3', '3e-3', '1e-2', '3e-2')},
    # one vector per sampled kron patch (decor_vectors_per_patch 1: the sampling before section 25)
    'dbp_kron_dlr3e-3_v1': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', '--decor-lr', '3e-3',
                                                    '--decor-vectors-per-patch', '1']),
    # fewer sampled patches (section 24e): a kron factor still learns from 1024 vectors (4 per patch at 256)
    **{f'dbp_kron_dlr3e-3_n{n}': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', '--decor-lr', '3e-3',
                                                          '--decor-samples', str(n)]) for n in (256,)},
    # the R update's and the sample's products (R's of 128+ rows) with bfloat16 operands (section 32)
    'dbp_kron_dlr3e-3_bf16': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', *BF16_DBP_FLAGS]),
    # ... with R updated (and sampled) on every 2nd step only: the cheapest interval not yet measured (section 36)
    'dbp_kron_dlr3e-3_bf16_i2': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', *BF16_DBP_FLAGS,
                                                         '--decor-interval', '2']),
    # layer selection: layers whose input dimension d exceeds 2304 kept plain (resnet18: layer4's three
    # 512 x 512 x 3 x 3 convs, the largest share of DBP's fusion and update on small inputs; BENCHMARKS 22b, 33c, 34)
    'dbp_kron_dlr3e-3_bf16_d2304': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', 'dbp_max_dim=2304',
                                                            *BF16_DBP_FLAGS]),
    # kron R only for convs with d <= 1152, a channel R above (resnet18: layer3 / layer4's 3x3 convs fed 256 / 512
    # channels, those whose R_c acts on the input at 64 px, where folding R_s into the kernel is most of the fusion)
    'dbp_kron_dlr3e-3_bf16_k1152': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron',
                                                            'dbp_kron_max_dim=1152', *BF16_DBP_FLAGS]),
    # both layer options at once, products in the library's 'auto' dtype (float32 on a CPU without bfloat16 units):
    # on resnet18 at 64 px, kron R up to layer3.0.conv1, channel R's in layer3 / layer4.0.conv1, layer4's three
    # 512 x 512 x 3 x 3 convs plain (BENCHMARKS 48)
    'dbp_kron_dlr3e-3_d2304_k1152': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron',
                                                             'dbp_max_dim=2304', 'dbp_kron_max_dim=1152',
                                                             '--decor-lr', '3e-3']),
    # R learned from the first 20 training batches before epoch 0 (train.py --decor-warmup, forward only, counted
    # in the time): in a short schedule decor_lr 3e-3 leaves R far from decorrelating (RMS correlation 0.13 after 3
    # epochs at 64 px), so W trains on hardly decorrelated inputs at first
    'dbp_kron_dlr3e-3_bf16_wu20': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', *BF16_DBP_FLAGS,
                                                           '--decor-warmup', '20']),
    # partial whitening (kappa 0.5: the paper's best on CIFAR-10, its kappa 0 on ImageNet), library settings otherwise
    'dbp_kron_dlr3e-3_bf16_k05': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', *BF16_DBP_FLAGS,
                                                          '--kappa', '0.5']),
    # the adaptive kappa (chosen per layer and update from the measured errors; section 9 ran it on test_resnet)
    'dbp_kron_dlr3e-3_bf16_kauto': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', *BF16_DBP_FLAGS,
                                                            '--kappa', 'auto']),
    # R learned in the first E epochs only, then fixed (train.py --decor-epochs): no sampling and no R update
    # afterwards, so the later epochs cost BP plus the fusion W R; does a frozen R keep DBP's accuracy?
    **{f'dbp_kron_dlr3e-3_bf16_de{e}': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron',
                                                                *BF16_DBP_FLAGS, '--decor-epochs', str(e)])
       for e in (1, 2, 4, 6)},
    # block-diagonal R over channels (dbp_block_size b): R's over more than b channels as blocks of at most b, so
    # the wide layers' update costs n c b + c b^2 instead of n c^2 + c^3 (resnet50's 1x1 convs of 1024 / 2048 channels)
    # (methods without a block size take the model's default: dense R's, except on the wide twins, which default to
    # blocks of 256 since section 42; `_dense` pins dense R's there)
    **{f'dbp_kron_dlr3e-3_bf16_{tag}': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron',
                                                                f'dbp_block_size={b}', *BF16_DBP_FLAGS])
       for tag, b in (('b128', 128), ('b256', 256), ('dense', 0))},
    'dbp_adamw': ('dbp_', 'dbpadamw', 2e-3, ADAPTIVE_WD + ['--model-kwargs', 'dbp_structure=kron', '--kappa', '0']),
    # ... the same with block-diagonal R's (the wide twins' option, for families trained with AdamW: ConvNeXt)
    **{f'dbp_adamw_{tag}': ('dbp_', 'dbpadamw', 2e-3, ADAPTIVE_WD + ['--model-kwargs', 'dbp_structure=kron',
                                                                    f'dbp_block_size={b}', '--kappa', '0'])
       for tag, b in (('b128', 128), ('b256', 256), ('dense', 0))},
    'dbp_muon': ('dbp_', 'dbpmuon', 0.01, ADAPTIVE_WD),  # timm's muon with DBP's R, library DBP defaults
    # XConv (trace-estimated conv kernel gradients, timm_dbp.sketch_convs) with r probe vectors, alone and with DBP
    **{f'xconv{r}_sgd': ('', 'sgd', 0.05, ['--sketch-probes', str(r)]) for r in (2, 8, 32)},
    'dbp_xconv8': ('dbp_', 'dbpsgd', 0.05, ['--model-kwargs', 'dbp_structure=kron', '--kappa', '0',
                                            '--sketch-probes', '8']),
}
DEFAULT_METHODS = ['bp_sgd', 'bp_adamw', 'bp_muon', 'bp_kron', 'bp_adopt', 'dbp_full', 'dbp_channel', 'dbp_kron',
                   'dbp_kron_k05', 'dbp_kron_kauto']

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--methods', nargs='+', default=DEFAULT_METHODS, choices=list(METHODS))
parser.add_argument('--model', default='test_resnet', help='timm model; DBP methods use dbp_<model>')
parser.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                    help='architecture arguments for every method (e.g. img_size=32 patch_size=4 for a ViT)')
parser.add_argument('--lr-mults', nargs='+', type=float, default=[0.5, 1.0, 2.0],
                    help='learning-rate sweep, multipliers of each method\'s base LR (the same for every method)')
parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2], help='the first one is the sweep seed')
parser.add_argument('--epochs', type=int, default=3, help='schedule of the LR sweep and the target')
parser.add_argument('--budgets', nargs='*', type=int, default=[], metavar='EPOCHS',
                    help='also train these shorter complete schedules at each method\'s chosen LR, every seed')
parser.add_argument('--budget-methods', nargs='+', default=None, metavar='METHOD',
                    help='train the --budgets schedules for these methods only (default: every method)')
parser.add_argument('--fixed-lr-mults', nargs='+', default=[], metavar='METHOD=MULT',
                    help='methods that skip the sweep and train at this LR multiplier (chosen on another schedule)')
parser.add_argument('--method-epochs', nargs='+', default=[], metavar='METHOD=EPOCHS',
                    help='these methods train a schedule of EPOCHS instead of --epochs (with --fixed-lr-mults: a '
                         'shorter schedule chosen in another run of the protocol); the target stays BP-SGD\'s')
parser.add_argument('--extend-edges', type=int, default=0, metavar='N',
                    help='widen the sweep (for every method) beyond an edge where some method\'s best LR lies, up to '
                         'N times')
parser.add_argument('--train-num-samples', type=int, default=10000)
parser.add_argument('--val-num-samples', type=int, default=None, help='test images evaluated (default: all 10k)')
parser.add_argument('-b', '--batch-size', type=int, default=128)
parser.add_argument('--workers', type=int, default=1)
parser.add_argument('--train-flags', default='', metavar='"FLAGS"',
                    help='extra train.py flags for every method, one string after =, e.g. '
                         '--train-flags="--sched-on-updates"; they are part of each run\'s name, so runs with other '
                         'flags are never reused')
parser.add_argument('--interleave-epochs', action='store_true',
                    help='advance the runs of each phase one epoch at a time, in step through their schedules, so '
                         'that a drift of the machine\'s speed hits every method alike (each epoch is a train.py '
                         'call: --stop-after-epoch, then --resume auto; the same runs, continued exactly)')
parser.add_argument('--runs-dir', default=os.path.join(ROOT, 'output', 'tta'), help='train.py output root')
parser.add_argument('--out', required=True, help='output prefix: writes <out>.json and <out>.png')


def run_spec(args, method, lr_mult, seed, epochs=None):
    """What train.py runs for one (method, lr multiplier, seed, schedule of `epochs`, default the method's)."""
    epochs = epochs or args.schedules.get(method, args.epochs)
    prefix, opt, base_lr, extra, *env = METHODS[method]
    if args.model_kwargs:  # one --model-kwargs flag: train.py keeps only the last one
        at = extra.index('--model-kwargs') + 1 if '--model-kwargs' in extra else len(extra)
        extra = extra[:at] + ([] if '--model-kwargs' in extra else ['--model-kwargs']) + args.model_kwargs + extra[at:]
    lr = base_lr * lr_mult
    flags = args.train_flag_list
    experiment = f'{method}-lr{lr:g}-s{seed}-e{epochs}-n{args.train_num_samples}-b{args.batch_size}'
    experiment += ''.join('_' + f.strip('-').replace('=', '-').replace('/', '-') for f in flags)
    train_args = [*recipe_args(epochs, args.batch_size, args.train_num_samples, lr, args.runs_dir, seed, args.workers),
                  '--model', prefix + args.model, '--opt', opt, '--experiment', experiment, *extra, *flags]
    if args.val_num_samples:
        train_args += ['--val-num-samples', str(args.val_num_samples)]
    return dict(method=method, lr=lr, lr_mult=lr_mult, seed=seed, epochs=epochs, train_args=train_args,
                summary=os.path.join(args.runs_dir, 'train', experiment, 'summary.csv'),
                label=f'{method} lr {lr:g} seed {seed} epochs {epochs}', env=dict(os.environ, **(env[0] if env else {})))


def train_runs(args, specs):
    """Train every run of `specs` unless done already; returns their result rows, in order.

    With --interleave-epochs the runs advance one epoch at a time (train.py --stop-after-epoch, then --resume auto:
    the same schedule, continued exactly), the run least far through its schedule next, so every run spans the same
    stretch of wall-clock and a drift of the machine's speed slows every method alike."""
    errors = {}
    if args.interleave_epochs:
        done = [len(read_curve(s['summary'])) if os.path.exists(s['summary']) else 0 for s in specs]
        while pending := [((done[i] + 1) / s['epochs'], i) for i, s in enumerate(specs)
                          if done[i] < s['epochs'] and i not in errors]:
            i = min(pending)[1]
            spec, epoch = specs[i], done[i] + 1
            chunk = [*spec['train_args'], '--stop-after-epoch', str(epoch), *(['--resume', 'auto'] if done[i] else [])]
            error = train_unless_done(chunk, spec['summary'], epoch, f'{spec["label"]}, epoch {epoch}', env=spec['env'])
            if error is None:
                done[i] = epoch
            else:
                errors[i] = error
    else:
        for i, spec in enumerate(specs):
            error = train_unless_done(spec['train_args'], spec['summary'], spec['epochs'], spec['label'],
                                      env=spec['env'])
            if error is not None:
                errors[i] = error
    return [result_row(spec, errors.get(i)) for i, spec in enumerate(specs)]


def result_row(spec, error):
    """One run's row: final / best top-1, training time, the curve and the last epoch's DBP and energy columns."""
    row = {k: spec[k] for k in ('method', 'lr', 'lr_mult', 'seed', 'epochs')}
    if error is not None:
        print(error, file=sys.stderr)
        return dict(row, failed=True, curve=[])
    curve = read_curve(spec['summary'])
    row.update(failed=False, curve=curve, final_top1=curve[-1][1], best_top1=max(a for _, a in curve),
               train_time=curve[-1][0])
    with open(spec['summary']) as f:  # DBP / energy columns of the last epoch, when present
        last = list(csv.DictReader(f))[-1]
    row.update({k: float(v) for k, v in last.items()
                if k.startswith(('train_decor', 'train_energy', 'train_co2')) and v})
    print(f'    {spec["label"]}: final {row["final_top1"]:.2f}  best {row["best_top1"]:.2f}  '
          f'time {row["train_time"]:.1f}s', flush=True)
    return row


def _median_missing_last(values):
    """Median where a None (the target never reached) counts as infinitely slow."""
    return statistics.median([x if x is not None else float('inf') for x in values])


def summarize(rows, methods, target_method='bp_sgd'):
    """Per method at its chosen LR: medians over seeds, and time to the target as a fraction of BP-SGD's time."""
    chosen = {m: [r for r in rows if r['method'] == m and r.get('chosen')] for m in methods}
    target = statistics.median(r['final_top1'] for r in chosen[target_method])
    bp_time = statistics.median(r['train_time'] for r in chosen[target_method])
    table = {}
    for m, runs in chosen.items():
        reach = [time_to_reach(r['curve'], target) for r in runs]
        ratios = [t / bp_time if t is not None else None for t in reach]
        reached = [x for x in ratios if x is not None]
        table[m] = dict(
            lr=runs[0]['lr'], seeds=len(runs),
            final_top1=[r['final_top1'] for r in runs], best_top1=[r['best_top1'] for r in runs],
            train_time=[r['train_time'] for r in runs], time_to_target=ratios,
            final_median=statistics.median(r['final_top1'] for r in runs),
            best_median=statistics.median(r['best_top1'] for r in runs),
            time_median=statistics.median(r['train_time'] for r in runs) / bp_time,
            tta_median=_median_missing_last(ratios),
            reached=f'{len(reached)}/{len(runs)}',
            energy_kwh=[r.get('train_energy_kwh') for r in runs], co2_kg=[r.get('train_co2_kg') for r in runs],
        )
        measured = [e for e in table[m]['energy_kwh'] if e is not None]
        table[m]['energy_kwh_median'] = statistics.median(measured) if measured else None
        shorter = [r for r in rows if r['method'] == m and r.get('budget') and not r['failed']]
        if shorter:  # earliest crossing over every schedule of the same seed
            any_budget = []
            for run, ratio in zip(runs, ratios):  # ratio: this seed's crossing in the --epochs schedule, or None
                crossings = [(ratio, run['epochs'])] if ratio is not None else []
                for b in (b for b in shorter if b['seed'] == run['seed']):
                    t = time_to_reach(b['curve'], target)
                    if t is not None:
                        crossings.append((t / bp_time, b['epochs']))
                any_budget.append(min(crossings) if crossings else (None, None))
            table[m].update(
                time_to_target_any=[t for t, _ in any_budget], schedule_of_best=[e for _, e in any_budget],
                tta_any_median=_median_missing_last([t for t, _ in any_budget]),
                reached_any=f'{sum(t is not None for t, _ in any_budget)}/{len(runs)}',
                budget_final_top1={e: [r['final_top1'] for r in shorter if r['epochs'] == e]
                                   for e in sorted({r['epochs'] for r in shorter})})
    return target, bp_time, table


def plot(rows, table, path, target):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, method in enumerate(table):
        color = f'C{i % 10}'
        for r in rows:
            if r['method'] == method and r.get('chosen'):
                ax.plot([t for t, _ in r['curve']], [a for _, a in r['curve']], color=color, marker='o', ms=3,
                        alpha=0.7, label=f'{method} (lr {r["lr"]:g})' if r['seed'] == min(
                            x['seed'] for x in rows if x['method'] == method and x.get('chosen')) else None)
            elif r['method'] == method and r.get('budget') and not r['failed']:  # a shorter schedule: dashed
                ax.plot([t for t, _ in r['curve']], [a for _, a in r['curve']], color=color, ls='--', marker='x',
                        ms=3, alpha=0.5)
    ax.axhline(target, color='k', ls='--', lw=1, label=f'target: BP-SGD final {target:.2f}%')
    ax.set_xlabel('training wall-clock (s), evaluation excluded')
    ax.set_ylabel('Fashion-MNIST test top-1 (%)')
    ax.set_ylim(max(50, min(a for r in rows if r.get('chosen') for _, a in r['curve']) - 2), None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title('Time to accuracy, every seed at each method\'s chosen LR'
                 + (' (dashed: shorter schedules)' if any(r.get('budget') for r in rows) else ''))
    fig.tight_layout()
    fig.savefig(path)


def parse_per_method(items, methods, flag, convert=float):
    """{method: value > 0} from METHOD=VALUE strings (`convert`: float or int); ValueError names the bad item."""
    values = {}
    for item in items:
        method, sep, value = item.partition('=')
        if not sep or method not in methods:
            raise ValueError(f'{flag} takes METHOD=VALUE with METHOD one of --methods {methods}, got {item!r}')
        try:
            values[method] = convert(value)
        except ValueError:
            values[method] = float('nan')
        if not 0 < values[method] < float('inf'):  # also NaN
            kind = 'integer' if convert is int else 'number'
            raise ValueError(f'{flag}: the value must be a positive {kind}, got {item!r}')
    return values


def edge_extension(mults, best):
    """Multipliers that widen the sorted sweep `mults` by one point beyond each edge where some method's best
    multiplier lies (`best`: method -> multiplier), spaced as the sweep's two outer points (x2 for one point)."""
    low, high = mults[0], mults[-1]
    new = []
    if low in best.values():
        new.append(low * low / mults[1] if len(mults) > 1 else low / 2)
    if high in best.values():
        new.append(high * high / mults[-2] if len(mults) > 1 else high * 2)
    return new


def best_runs(rows, methods):
    """{method: its sweep-seed run with the highest final top-1} over the finished runs (methods with none left out)."""
    best = {}
    for method in methods:
        done = [r for r in rows if r['method'] == method and not r['failed']]
        if done:
            best[method] = max(done, key=lambda r: r['final_top1'])
    return best


def sweep_table(rows, methods, mults, seed):
    """The sweep as text: per method and multiplier the sweep seed's final top-1 and training time, * = chosen."""
    lines = [f'\nLR sweep, seed {seed}: final top-1 % (training s), * = chosen',
             f'{"method":>18} ' + ' '.join(f'{"x" + format(m, "g"):>15}' for m in mults)]
    for method in methods:
        cells = []
        for mult in mults:
            r = next((r for r in rows if r['method'] == method and r['lr_mult'] == mult and r['seed'] == seed
                      and not r.get('budget')), None)
            cell = '' if r is None else 'failed' if r['failed'] else (
                f'{"*" if r.get("chosen") else ""}{r["final_top1"]:.2f} ({r["train_time"]:.0f})')
            cells.append(f'{cell:>15}')
        lines.append(f'{method:>18} ' + ' '.join(cells))
    return '\n'.join(lines)


def main():
    args = parser.parse_args()
    if args.extend_edges < 0:
        parser.error(f'--extend-edges must be 0 or more, got {args.extend_edges}')
    if args.budget_methods is not None and not set(args.budget_methods) <= set(args.methods):
        parser.error(f'--budget-methods must be some of --methods {args.methods}, got {args.budget_methods}')
    try:
        fixed = parse_per_method(args.fixed_lr_mults, args.methods, '--fixed-lr-mults')
        args.schedules = parse_per_method(args.method_epochs, args.methods, '--method-epochs', int)
    except ValueError as e:
        parser.error(str(e))
    shortest = min([args.epochs, *args.schedules.values()])
    if any(not 1 <= e < shortest for e in args.budgets):
        parser.error(f'--budgets must be epoch counts from 1 to {shortest - 1}, shorter than every method\'s schedule '
                     f'(--epochs, --method-epochs), got {args.budgets}')
    args.train_flag_list = shlex.split(args.train_flags)
    rows = []
    sweep_seed, other_seeds = args.seeds[0], args.seeds[1:]
    mults = sorted(set(args.lr_mults))
    swept = [m for m in args.methods if m not in fixed]
    todo = {m: [fixed[m]] if m in fixed else mults for m in args.methods}
    for extension in range(args.extend_edges + 1):  # phase 1: LR sweep on the sweep seed, methods interleaved
        rows += train_runs(args, [run_spec(args, method, todo[method][i], sweep_seed)
                                  for i in range(max(map(len, todo.values())))
                                  for method in args.methods if i < len(todo[method])])
        best = best_runs(rows, args.methods)
        wider = edge_extension(mults, {m: r['lr_mult'] for m, r in best.items() if m in swept})
        if not wider or extension == args.extend_edges:
            break
        mults = sorted(mults + wider)
        todo = {m: wider if m in swept else [] for m in args.methods}  # only the new points, every swept method
        print(f'a best LR lies at an edge of the sweep: widened to x{" x".join(f"{m:g}" for m in mults)}', flush=True)
    at_edge = {m: len(mults) > 1 and r['lr_mult'] in (mults[0], mults[-1]) for m, r in best.items() if m in swept}
    for method in args.methods:
        if method not in best:
            print(f'every sweep run of {method} failed: left out of the comparison', file=sys.stderr)
        elif at_edge.get(method):
            print(f'{method}: its best LR (x{best[method]["lr_mult"]:g}) lies at an edge of the sweep; a wider one '
                  f'might find a better LR (--extend-edges)', file=sys.stderr)
    for r in best.values():
        r['chosen'] = True
    best_mult = {m: r['lr_mult'] for m, r in best.items()}
    if 'bp_sgd' in args.methods and 'bp_sgd' not in best_mult:
        sys.exit('every bp_sgd run failed: no target')
    # phase 2: the chosen LR on the other seeds
    for row in train_runs(args, [run_spec(args, m, best_mult[m], seed) for seed in other_seeds for m in best_mult]):
        row['chosen'] = not row['failed']
        rows.append(row)
    # phase 3: shorter complete schedules, chosen LR, every seed
    for row in train_runs(args, [run_spec(args, m, best_mult[m], seed, epochs)
                                 for epochs in sorted(args.budgets) for seed in args.seeds for m in best_mult
                                 if args.budget_methods is None or m in args.budget_methods]):
        row['budget'] = True
        rows.append(row)
    target_method = 'bp_sgd' if 'bp_sgd' in args.methods else args.methods[0]
    target, bp_time, table = summarize(rows, list(best_mult), target_method)
    for m in table:
        table[m]['best_at_sweep_edge'] = at_edge.get(m)  # None: a fixed multiplier, no sweep

    print(sweep_table(rows, args.methods, sorted(set(mults) | set(fixed.values())), sweep_seed))
    print(f'\ntarget = {target_method} final top-1 (median) {target:.2f}%, its training time {bp_time:.1f}s')
    print(f'{"method":>18} {"lr":>8} {"final":>7} {"best":>7} {"time":>6} {"to target":>9} {"reached":>7} '
          f'{"kWh":>8}  raw time-to-target per seed')
    for m, t in table.items():
        raw = ' '.join('-' if x is None else f'{x:.2f}' for x in t['time_to_target'])
        kwh = 'n/a' if t['energy_kwh_median'] is None else f'{t["energy_kwh_median"]:.2e}'
        print(f'{m:>18} {t["lr"]:8.2g} {t["final_median"]:7.2f} {t["best_median"]:7.2f} {t["time_median"]:6.2f} '
              f'{t["tta_median"]:9.2f} {t["reached"]:>7} {kwh:>8}  {raw}')
    if args.budgets:
        print(f'\ntime to target over every schedule ({args.epochs} and {" ".join(map(str, args.budgets))} epochs), '
              f'/ {target_method} time; final top-1 medians of the shorter schedules')
        print(f'{"method":>18} {"to target":>9} {"reached":>7}  per seed (schedule)  '
              + '  '.join(f'final e{e}' for e in sorted(args.budgets)))
        for m, t in table.items():
            if 'time_to_target_any' not in t:
                continue
            raw = ' '.join('-' if x is None else f'{x:.2f} ({e})'
                           for x, e in zip(t['time_to_target_any'], t['schedule_of_best']))
            finals = '  '.join(f'{statistics.median(v):8.2f}' if v else f'{"-":>8}'
                               for v in (t['budget_final_top1'].get(e) for e in sorted(args.budgets)))
            print(f'{m:>18} {t["tta_any_median"]:9.2f} {t["reached_any"]:>7}  {raw}  {finals}')
    import torch
    meta = dict(date=datetime.now().isoformat(timespec='seconds'), command=' '.join(sys.argv), args=vars(args),
                threads=torch.get_num_threads(), torch=torch.__version__, target=target, bp_sgd_time=bp_time,
                sweep=mults,
                methods={m: METHODS[m] for m in args.methods})
    with open(f'{args.out}.json', 'w') as f:
        json.dump(dict(meta=meta, table=table, rows=rows), f, indent=1)
    plot(rows, table, f'{args.out}.png', target)
    print(f'wrote {args.out}.json and {args.out}.png')


if __name__ == '__main__':
    main()
