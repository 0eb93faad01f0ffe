""" Training-step cost of DBP vs BP, with the DBP overhead broken down by part

For each (model, image size, batch) config, times one training step (forward, backward, optimizer step) of:
    bp        the plain timm model (e.g. resnet18) with SGD
    fusion    the DBP twin with dbpsgd and decor_lr=0: the fused W R forward/backward only, no sampling, no update
    sample    as fusion, plus the armed forward that samples decor_samples inputs per layer (result discarded)
    dbp       the DBP twin with dbpsgd, default settings: fusion + sampling + R update
Variants run interleaved (bp fusion sample dbp bp fusion ...), --repeats rounds after one warm-up round; medians.
Overheads are differences of medians: fusion - bp, sample - fusion, dbp - sample. Timer: time.perf_counter with
torch.cuda.synchronize() on CUDA. Writes JSON (with this script's source) and a PNG bar chart.

    python bench/step_cost.py --out docs/bench_step_cost   # CPU: resnet18 64px b64, resnet18 224px b32, resnet50 64px b64
"""
import argparse
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import timm_dbp  # noqa: F401  registers dbp_ models and optimizers
from timm_dbp import decor_layers

parser = argparse.ArgumentParser()
parser.add_argument('--configs', nargs='+', default=['resnet18:64:64', 'resnet18:224:32', 'resnet50:64:64'],
                    help='model:img_size:batch_size (the DBP twin is dbp_<model>)')
parser.add_argument('--repeats', type=int, default=7)
parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
parser.add_argument('--channels-last', action='store_true')
parser.add_argument('--amp', action='store_true', help='bfloat16 autocast')
parser.add_argument('--out', default=None, help='output prefix: writes <out>.json and <out>.png')

VARIANTS = ('bp', 'fusion', 'sample', 'dbp')


def build(variant, model_name, device, channels_last):
    torch.manual_seed(0)
    name = model_name if variant == 'bp' else f'dbp_{model_name}'
    model = timm.create_model(name, num_classes=100).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt_name, kwargs = ('sgd', {}) if variant == 'bp' else ('dbpsgd', {} if variant == 'dbp' else {'decor_lr': 0.0})
    opt = timm.optim.create_optimizer_v2(model, opt=opt_name, lr=0.01, momentum=0.9, **kwargs)
    return model, opt


def step_fn(variant, model, opt, x, y, amp):
    layers = [layer for _, layer in decor_layers(model)]
    samples = timm_dbp.DBP_DEFAULTS['decor_samples']

    def step():
        if variant == 'sample':
            for layer in layers:
                layer.decor_samples = samples
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if variant == 'sample':
            for layer in layers:
                layer.take_decor_inputs()
    return step


def timed(fn, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    args = parser.parse_args()
    device = torch.device(args.device)
    results = []
    for config in args.configs:
        model_name, img, batch = config.split(':')
        img, batch = int(img), int(batch)
        x = torch.randn(batch, 3, img, img, device=device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 100, (batch,), device=device)
        steps = {}
        for variant in VARIANTS:
            model, opt = build(variant, model_name, device, args.channels_last)
            steps[variant] = step_fn(variant, model, opt, x, y, args.amp)
        times = {v: [] for v in VARIANTS}
        for round_idx in range(args.repeats + 1):
            for variant in VARIANTS:
                t = timed(steps[variant], device)
                if round_idx > 0:  # round 0 is warm-up
                    times[variant].append(t)
        med = {v: statistics.median(times[v]) for v in VARIANTS}
        row = dict(
            config=config, model=model_name, img_size=img, batch_size=batch, median_s=med, raw_s=times,
            ratio_dbp_bp=med['dbp'] / med['bp'],
            overhead_s=dict(fusion=med['fusion'] - med['bp'], sample=med['sample'] - med['fusion'],
                            update=med['dbp'] - med['sample']),
        )
        results.append(row)
        o = row['overhead_s']
        print(f'{config:>18}: bp {med["bp"]:.3f}s  dbp {med["dbp"]:.3f}s  ratio {row["ratio_dbp_bp"]:.2f}  '
              f'overhead: fusion {o["fusion"]:+.3f}s  sample {o["sample"]:+.3f}s  update {o["update"]:+.3f}s',
              flush=True)
    meta = dict(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__, timm=timm.__version__,
                amp=args.amp, channels_last=args.channels_last, repeats=args.repeats,
                dbp_defaults=timm_dbp.DBP_DEFAULTS)
    if device.type == 'cuda':
        meta['gpu'] = torch.cuda.get_device_name()
    print(json.dumps(meta))
    if args.out:
        with open(f'{args.out}.json', 'w') as f:
            json.dump(dict(meta=meta, results=results, code=open(__file__).read()), f, indent=1)
        plot(results, f'{args.out}.png', meta)


def plot(results, path, meta):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    names = [r['config'] for r in results]
    bottoms = [r['median_s']['bp'] for r in results]
    ax.bar(names, bottoms, label='BP step')
    for part in ('fusion', 'sample', 'update'):
        values = [max(r['overhead_s'][part], 0) for r in results]
        ax.bar(names, values, bottom=bottoms, label=f'DBP {part}')
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel('seconds per training step (median)')
    ax.set_title(f'DBP vs BP step cost ({meta["device"]}, {meta["threads"]} threads)')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == '__main__':
    main()
