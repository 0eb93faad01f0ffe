""" Trace-estimated conv gradients (XConv, `timm_dbp.sketch_convs`): training memory, step time, gradient error

Variants of one architecture, same random batch: `bp` (exact), `relu_masks` (only the ReLUs keep bool masks: shows
what the masks alone save), `xconv<r>` (sketch_convs with r probes: sketched convs and masked ReLUs), and
`dbp_xconv<r>` (the dbp_ twin, sketched: DBP + XConv).
Per variant:
    activations   bytes autograd keeps for backward (distinct storages, parameters excluded): exact, no timing
    peak          CPU: the process's own peak resident size (VmHWM) minus the resident size after building model,
                  optimizer and batch (what training adds); CUDA: max_memory_allocated minus allocated after
                  building. Each variant runs --steps steps (SGD / dbpsgd) in its own process, on CPU with glibc's
                  MALLOC_MMAP_THRESHOLD_=65536 (by default glibc raises its mmap threshold after the first large
                  free and then serves activations from its heap, which it does not give back). Not ru_maxrss: a
                  child started by fork + exec inherits its parent's maximum there (this script's parent holds every
                  variant), which made the first two runs print one peak for every variant.
    step time     one process, variants interleaved (A B C ... A B C ...), --repeats timed steps each after one
                  warm-up step; the median and the ratio to bp's median.
    grad error    |estimated - exact| / |exact| of all conv kernel gradients together, one batch, per r.

    python bench/sketched_conv.py --models resnet18:224:64 resnet50:224:32 --out docs/bench_sketched_conv
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_dbp  # noqa: F401  registers the dbp_ models
from timm_dbp.layers import MaskedReLU, sketch_convs, sketched_layers

from _cli import model_config  # bench/_cli.py
from _proc import rss_bytes  # bench/_proc.py

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--models', nargs='+', default=['resnet18:224:64', 'resnet50:224:32'],
                    help='MODEL:IMG_SIZE:BATCH_SIZE')
parser.add_argument('--probes', type=int, nargs='+', default=[4, 16, 64])
parser.add_argument('--dbp-probes', type=int, default=16, help='probes of the DBP + XConv variant')
parser.add_argument('--steps', type=int, default=2, help='training steps per memory measurement')
parser.add_argument('--repeats', type=int, default=5, help='timed steps per variant')
parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
parser.add_argument('--out', default=None, help='output prefix: writes <out>.json and <out>.png')
parser.add_argument('--child', nargs=4, metavar=('MODEL', 'IMG', 'BATCH', 'VARIANT'), help=argparse.SUPPRESS)


def build(model_name: str, variant: str, device: torch.device):
    """(model, optimizer) of a variant: bp, relu_masks, xconv<r> or dbp_xconv<r>."""
    torch.manual_seed(0)
    dbp = variant.startswith('dbp_')
    model = timm.create_model(f'dbp_{model_name}' if dbp else model_name, num_classes=100).to(device).train()
    if variant == 'relu_masks':
        for module in model.modules():
            if type(module) is nn.ReLU:
                module.__class__ = MaskedReLU
    elif 'xconv' in variant:
        sketch_convs(model, probes=int(variant.rsplit('xconv', 1)[1]))
    opt = timm.optim.create_optimizer_v2(model, opt='dbpsgd' if dbp else 'sgd', lr=0.01, momentum=0.9)
    return model, opt


def batch(img_size: int, batch_size: int, device: torch.device):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=generator).to(device)
    return x, torch.randint(0, 100, (batch_size,), generator=generator).to(device)


def train_step(model, opt, x, y) -> None:
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def activation_bytes(model, x, y) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def child(args) -> None:
    """Peak memory of one variant (own process): prints JSON."""
    model_name, img_size, batch_size, variant = args.child
    device = torch.device(args.device)
    model, opt = build(model_name, variant, device)
    x, y = batch(int(img_size), int(batch_size), device)
    built = torch.cuda.memory_allocated() if device.type == 'cuda' else rss_bytes()
    for _ in range(args.steps):
        train_step(model, opt, x, y)
    peak = torch.cuda.max_memory_allocated() if device.type == 'cuda' else rss_bytes('VmHWM')
    print(json.dumps(dict(built=built, peak=peak, training=peak - built)))


def conv_grad_error(model_name: str, img_size: int, batch_size: int, probes: int, device: torch.device) -> float:
    """Relative error of all conv kernel gradients of one batch (the same weights, exact vs sketched)."""
    exact, _ = build(model_name, 'bp', device)
    sketched = sketch_convs(copy.deepcopy(exact), probes=probes)
    x, y = batch(img_size, batch_size, device)
    names = [f'{name}.weight' for name, _ in sketched_layers(sketched)]
    grads = []
    for model in (exact, sketched):
        F.cross_entropy(model(x), y).backward()
        params = dict(model.named_parameters())
        grads.append(torch.cat([params[n].grad.flatten() for n in names]))
    return float((grads[1] - grads[0]).norm() / grads[0].norm())


def main():
    args = parser.parse_args()
    if args.child:
        return child(args)
    device = torch.device(args.device)
    variants = ['bp', 'relu_masks'] + [f'xconv{r}' for r in args.probes] + [f'dbp_xconv{args.dbp_probes}']
    results = []
    for spec in args.models:
        model_name, img_size, batch_size = model_config(parser, '--models', spec)
        row = dict(model=model_name, img_size=img_size, batch_size=batch_size, variants={})
        built = {v: build(model_name, v, device) for v in variants}
        x, y = batch(img_size, batch_size, device)
        times = {v: [] for v in variants}
        for v in variants:
            row['variants'][v] = dict(activation_bytes=activation_bytes(built[v][0], x, y))
            train_step(*built[v], x, y)  # warm-up
        for _ in range(args.repeats):  # A B C ... A B C ...
            for v in variants:
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                start = time.perf_counter()
                train_step(*built[v], x, y)
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                times[v].append(time.perf_counter() - start)
        del built
        for v in variants:
            cmd = [sys.executable, __file__, '--child', model_name, str(img_size), str(batch_size), v,
                   '--steps', str(args.steps), '--device', args.device]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')  # freed activations go back to the OS
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            row['variants'][v].update(json.loads(out.strip().splitlines()[-1]), step_times=times[v])
        row['grad_error'] = {r: conv_grad_error(model_name, img_size, batch_size, r, device) for r in args.probes}
        results.append(row)
        report(row)
    meta = dict(device=args.device, torch=torch.__version__, timm=timm.__version__, steps=args.steps,
                repeats=args.repeats, cpu_count=os.cpu_count(), date=time.strftime('%Y-%m-%d'),
                command='python bench/sketched_conv.py ' + ' '.join(sys.argv[1:]),
                measure='cuda max_memory_allocated' if device.type == 'cuda' else
                'VmHWM - VmRSS after build (MALLOC_MMAP_THRESHOLD_=65536)')
    if args.out:
        with open(f'{args.out}.json', 'w') as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
        plot(results, f'{args.out}.png')


def report(row) -> None:
    mib = 2 ** 20
    bp = row['variants']['bp']
    bp_time = statistics.median(bp['step_times'])
    print(f'{row["model"]} {row["img_size"]} px batch {row["batch_size"]}')
    for v, r in row['variants'].items():
        t = statistics.median(r['step_times'])
        print(f'  {v:>12}: activations {r["activation_bytes"] / mib:8.1f} MiB ({r["activation_bytes"] / bp["activation_bytes"]:.2f}x)'
              f'  training peak +{r["training"] / mib:8.1f} MiB ({r["training"] / bp["training"]:.2f}x)'
              f'  step {t:.3f} s ({t / bp_time:.2f}x)', flush=True)
    print('  conv gradient relative error: ' + ', '.join(f'r={r}: {e:.3f}' for r, e in row['grad_error'].items()))


def plot(results, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for i, row in enumerate(results):
        names = list(row['variants'])
        width = 0.8 / len(results)
        xs = [j + i * width for j in range(len(names))]
        bp = row['variants']['bp']
        label = f'{row["model"]} {row["img_size"]}px b{row["batch_size"]}'
        axes[0].bar(xs, [row['variants'][n]['training'] / bp['training'] for n in names], width, label=label)
        bp_time = statistics.median(bp['step_times'])
        axes[1].bar(xs, [statistics.median(row['variants'][n]['step_times']) / bp_time for n in names], width,
                    label=label)
        for ax in axes:
            ax.set_xticks(range(len(names)), names, rotation=20)
    axes[0].set_ylabel('training peak memory / exact BP')
    axes[1].set_ylabel('step time / exact BP')
    for ax in axes:
        ax.axhline(1, color='k', lw=0.8)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == '__main__':
    main()
