""" Memory of DBP: bytes of DBP state (R) per model and R structure, and peak training memory vs BP

Part 1, DBP state: the bytes of every R buffer (all factors) of dbp_<model> for each structure (full, channel, kron,
each with dense R's whatever the model's default, and kron with block-diagonal R's over channels, `kron_b<size>` for
each --block-sizes), counted on the meta device
(exact, no allocation), next to the model's own parameter bytes.
Part 2, peak training memory: each variant trains --steps steps in a fresh subprocess (SGD / dbpsgd, random data).
CPU: the process's own peak resident size (VmHWM) minus the resident size after the model, optimizer and batch were
built, so the figure is what training adds (activations, gradients, optimizer state, DBP samples and update
temporaries), plus the total. CUDA: torch.cuda.max_memory_allocated after the steps, and after building.

    python bench/memory.py --out docs/bench_memory   # resnet18 and resnet50, 64 px batch 64, CPU
    python bench/memory.py --models resnet101 convnext_small --state-only   # DBP state only (meta device)
"""
import argparse
import json
import subprocess
import sys

import timm
import torch
import torch.nn.functional as F

import timm_dbp  # noqa: F401  registers dbp_ models and optimizers
from timm_dbp import decor_layers

from _proc import rss_bytes  # bench/_proc.py

STRUCTURES = ('full', 'channel', 'kron')
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--models', nargs='+', default=['resnet18', 'resnet50'])
parser.add_argument('--img-size', type=int, default=64)
parser.add_argument('-b', '--batch-size', type=int, default=64)
parser.add_argument('--steps', type=int, default=3)
parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
parser.add_argument('--block-sizes', nargs='*', type=int, default=[256],
                    help='also kron R with dbp_block_size=B (variant kron_bB) for each B')
parser.add_argument('--state-only', action='store_true', help='part 1 only: DBP state, no training (seconds)')
parser.add_argument('--out', default=None, help='output prefix: writes <out>.json and <out>.png')
parser.add_argument('--child', nargs=2, metavar=('MODEL', 'VARIANT'), help=argparse.SUPPRESS)


def variants(block_sizes):
    """{variant name: dbp_ model kwargs}: each R structure with dense R's (whatever the model's default), then kron
    with each block size."""
    named = {s: dict(dbp_structure=s, dbp_block_size=0) for s in STRUCTURES}
    named.update({f'kron_b{b}': dict(dbp_structure='kron', dbp_block_size=b) for b in block_sizes})
    return named


def state_bytes(model_name, block_sizes):
    """{variant: bytes of R} for dbp_<model>, and the plain model's parameter bytes."""
    plain = timm.create_model(model_name, device='meta')
    params = sum(p.numel() * p.element_size() for p in plain.parameters())
    dbp = {name: sum(layer.decor_state_bytes for _, layer in decor_layers(
        timm.create_model(f'dbp_{model_name}', device='meta', **kwargs)))
        for name, kwargs in variants(block_sizes).items()}
    return params, dbp


def child(args, model_name, variant):
    """Train a few steps; print JSON with the memory figures (runs in its own process)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    if variant == 'bp':
        model = timm.create_model(model_name, num_classes=100).to(device)
        opt = timm.optim.create_optimizer_v2(model, opt='sgd', lr=0.01, momentum=0.9)
    else:
        kwargs = variants(args.block_sizes)[variant]
        model = timm.create_model(f'dbp_{model_name}', num_classes=100, **kwargs).to(device)
        opt = timm.optim.create_optimizer_v2(model, opt='dbpsgd', lr=0.01, momentum=0.9)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    built = torch.cuda.memory_allocated() if device.type == 'cuda' else rss_bytes()
    for _ in range(args.steps):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss_bytes('VmHWM')
    print(json.dumps(dict(built=built, peak=peak, training=peak - built)))


def main():
    args = parser.parse_args()
    if args.child:
        return child(args, *args.child)
    results = []
    for model_name in args.models:
        params, dbp = state_bytes(model_name, args.block_sizes)
        row = dict(model=model_name, img_size=args.img_size, batch_size=args.batch_size, param_bytes=params,
                   decor_state_bytes=dbp, peak={})
        for variant in () if args.state_only else ('bp', *dbp):
            cmd = [sys.executable, __file__, '--child', model_name, variant, '--img-size', str(args.img_size),
                   '-b', str(args.batch_size), '--steps', str(args.steps), '--device', args.device,
                   '--block-sizes', *map(str, args.block_sizes)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row['peak'][variant] = json.loads(out.strip().splitlines()[-1])
        results.append(row)
        mib = 2 ** 20
        print(f'{model_name}: params {params / mib:.1f} MiB; R: ' + ', '.join(
            f'{s} {b / mib:.1f} MiB' for s, b in dbp.items()))
        bp_train = row['peak']['bp']['training'] if row['peak'] else None  # None with --state-only: no peaks
        for name, p in row['peak'].items():
            print(f'    {name:>8}: peak {p["peak"] / mib:8.1f} MiB, training adds {p["training"] / mib:8.1f} MiB '
                  f'({p["training"] / bp_train:.2f}x BP)', flush=True)
    meta = dict(device=args.device, torch=torch.__version__, timm=timm.__version__, steps=args.steps,
                block_sizes=args.block_sizes,
                measure='cuda max_memory_allocated' if args.device.startswith('cuda') else 'VmHWM - VmRSS after build')
    if args.out:
        with open(f'{args.out}.json', 'w') as f:
            json.dump(dict(meta=meta, results=results, code=open(__file__).read()), f, indent=1)
        plot(results, f'{args.out}.png')


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    with_peak = bool(results[0]['peak'])
    fig, axes = plt.subplots(1, 1 + with_peak, figsize=(5 + 5 * with_peak, 4), dpi=120, squeeze=False)
    axes = axes[0]
    structures = tuple(results[0]['decor_state_bytes'])
    names = ('bp', *structures)
    width = 0.8 / len(results)
    for i, row in enumerate(results):
        xs = [j + i * width for j in range(len(names))]
        axes[0].bar(xs[1:], [row['decor_state_bytes'][s] / 2 ** 20 for s in structures], width, label=row['model'])
        if with_peak:
            axes[1].bar(xs, [row['peak'][n]['training'] / 2 ** 20 for n in names], width, label=row['model'])
    axes[0].set_xticks(range(1, len(names)), structures)
    axes[0].set_yscale('log')
    axes[0].set_ylabel('DBP state (R), MiB')
    axes[0].axhline(35, color='k', ls='--', lw=1, label='35 MiB goal')
    if with_peak:
        axes[1].set_xticks(range(len(names)), names)
        axes[1].set_ylabel('memory added by training, MiB')
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == '__main__':
    main()
