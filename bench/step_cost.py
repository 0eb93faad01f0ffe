""" Training-step cost of DBP vs BP, with the DBP overhead broken down by part

For each (model, image size, batch) config, times one training step (forward, backward, optimizer step) of:
    bp        the plain timm model (e.g. resnet18) with SGD
    fusion    the DBP twin with dbpsgd and decor_lr=0: the fused W R forward/backward only, no sampling, no update
    sample    as fusion, plus the sampling: decor_samples inputs per layer drawn from the armed forward's kept input
              in the optimizer step, as the dbp step does (result discarded)
    dbp       the DBP twin with dbpsgd, default settings: fusion + sampling + R update
Variants run interleaved (bp fusion sample dbp bp fusion ...), --repeats rounds after one warm-up round; medians.
Overheads are differences of medians: fusion - bp, sample - fusion, dbp - sample. Timer: time.perf_counter with
torch.cuda.synchronize() on CUDA. Each timed sample is one block of decor_interval steps (so an R update every k
steps is included once per block), reported per step. Every step is also timed by phase (forward with the loss,
backward, optimizer step; medians in `phase_median_s`): the optimizer step of dbp minus that of sample is the R update
measured directly, without the forward's and backward's noise. Writes JSON (with this script's source) and a PNG bar
chart.

    python bench/step_cost.py --out docs/bench_step_cost   # CPU: resnet18 64px b64, resnet18 224px b32, resnet50 64px b64
    python bench/step_cost.py --dbp dbp_structure=channel decor_interval=4   # other DBP settings
    python bench/step_cost.py --configs resnet18:64:64 --compile   # every model under torch.compile (inductor)
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

from _cli import model_config, split_dbp_settings  # bench/_cli.py

parser = argparse.ArgumentParser()
parser.add_argument('--configs', nargs='+', default=['resnet18:64:64', 'resnet18:224:32', 'resnet50:64:64'],
                    help='model:img_size:batch_size (the DBP twin is dbp_<model>)')
parser.add_argument('--repeats', type=int, default=7)
parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
parser.add_argument('--channels-last', action='store_true')
parser.add_argument('--amp', action='store_true', help='bfloat16 autocast')
parser.add_argument('--compile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                    help='torch.compile every variant\'s model (backend: inductor if none is named); compiling happens '
                         'in the warm-up round, which is not timed')
parser.add_argument('--out', default=None, help='output prefix: writes <out>.json and <out>.png')
parser.add_argument('--dbp', nargs='*', default={}, action=timm.utils.ParseKwargs,
                    help='DBP settings: dbp_* keys go to the model (e.g. dbp_structure=channel), the rest to the '
                         'optimizer (e.g. decor_interval=4 decor_samples=512)')

VARIANTS = ('bp', 'fusion', 'sample', 'dbp')
PHASES = ('forward', 'backward', 'step')  # each step is also timed by phase: forward + loss, backward, opt.step()


def build(variant, model_name, img_size, device, channels_last, settings, compile_backend=None):
    torch.manual_seed(0)
    model_kwargs, opt_kwargs = split_dbp_settings(settings)
    size_kwargs = dict(img_size=img_size) if timm.models.get_pretrained_cfg(model_name).fixed_input_size else {}
    model_kwargs = dict(model_kwargs, **size_kwargs)  # ViTs are built for the benchmark's image size
    if variant == 'bp':
        model = timm.create_model(model_name, num_classes=100, **size_kwargs)
        opt_name, opt_kwargs = 'sgd', {}
    else:
        model = timm.create_model(f'dbp_{model_name}', num_classes=100, **model_kwargs)
        opt_name = 'dbpsgd'
        if variant != 'dbp':
            opt_kwargs = dict(opt_kwargs, decor_lr=0.0)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = timm.optim.create_optimizer_v2(model, opt=opt_name, lr=0.01, momentum=0.9, **opt_kwargs)
    if compile_backend:  # as train.py --torchcompile: the model, after its optimizer was made
        model = torch.compile(model, backend=compile_backend)
    return model, opt


def step_fn(variant, model, opt, x, y, amp, settings, phase_times):
    """A function running one block of decor_interval training steps, appending each step's (forward, backward,
    optimizer step) seconds to phase_times."""
    layers = [layer for _, layer in decor_layers(model)]
    samples = settings.get('decor_samples', timm_dbp.DBP_DEFAULTS['decor_samples'])
    block = settings.get('decor_interval', timm_dbp.DBP_DEFAULTS['decor_interval'])

    def one_step(index):
        arm = variant == 'sample' and index == 0  # sample as often as the R update would
        if arm:
            for layer in layers:
                layer.decor_samples = samples
        t0 = now(x.device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        t1 = now(x.device)
        loss.backward()
        t2 = now(x.device)
        opt.step()
        if arm:  # the sample the dbp step draws in its optimizer step
            for layer in layers:
                layer.take_decor_inputs()
        t3 = now(x.device)
        phase_times.append((t1 - t0, t2 - t1, t3 - t2))
        opt.zero_grad(set_to_none=True)

    def steps():
        for index in range(block):
            one_step(index)
    return steps, block


def now(device):
    """time.perf_counter() once the device's queued work is done."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter()


def timed(fn, device):
    t0 = now(device)
    fn()
    return now(device) - t0


def main():
    args = parser.parse_args()
    device = torch.device(args.device)
    results = []
    for config in args.configs:
        model_name, img, batch = model_config(parser, '--configs', config)
        x = torch.randn(batch, 3, img, img, device=device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 100, (batch,), device=device)
        steps, state_mib, phases = {}, 0.0, {v: [] for v in VARIANTS}
        for variant in VARIANTS:
            model, opt = build(variant, model_name, img, device, args.channels_last, args.dbp, args.compile)
            steps[variant], block = step_fn(variant, model, opt, x, y, args.amp, args.dbp, phases[variant])
            if variant == 'dbp':
                state_mib = sum(layer.decor_state_bytes for _, layer in decor_layers(model)) / 2 ** 20
        times, warmup = {v: [] for v in VARIANTS}, {}
        for round_idx in range(args.repeats + 1):
            for variant in VARIANTS:
                t = timed(steps[variant], device) / block
                if round_idx > 0:  # round 0 is warm-up (and compiling, with --compile)
                    times[variant].append(t)
                else:
                    warmup[variant] = t
        med = {v: statistics.median(times[v]) for v in VARIANTS}
        timed_phases = {v: phases[v][block:] for v in VARIANTS}  # steps of the timed rounds (not the warm-up)
        phase_med = {v: dict(zip(PHASES, (statistics.median(p) for p in zip(*timed_phases[v])))) for v in VARIANTS}
        row = dict(
            config=config, model=model_name, img_size=img, batch_size=batch, dbp_settings=args.dbp,
            decor_state_mib=state_mib, median_s=med, raw_s=times, warmup_s=warmup, phase_median_s=phase_med,
            raw_phase_s=timed_phases,
            ratio_dbp_bp=med['dbp'] / med['bp'],
            overhead_s=dict(fusion=med['fusion'] - med['bp'], sample=med['sample'] - med['fusion'],
                            update=med['dbp'] - med['sample']),
        )
        results.append(row)
        o = row['overhead_s']
        print(f'{config:>18}: bp {med["bp"]:.3f}s  dbp {med["dbp"]:.3f}s  ratio {row["ratio_dbp_bp"]:.2f}  '
              f'overhead: fusion {o["fusion"]:+.3f}s  sample {o["sample"]:+.3f}s  update {o["update"]:+.3f}s  '
              f'R {state_mib:.1f} MiB',
              flush=True)
        print(' ' * 20 + 'phase medians (forward / backward / optimizer step, ms): ' + ', '.join(
            f'{v} ' + ' / '.join(f'{phase_med[v][p] * 1e3:.1f}' for p in PHASES) for v in VARIANTS), flush=True)
        if args.compile:
            print(' ' * 20 + 'warm-up round with compiling (s): ' + ', '.join(
                f'{v} {warmup[v] * block:.1f}' for v in VARIANTS), flush=True)
    meta = dict(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__, timm=timm.__version__,
                amp=args.amp, channels_last=args.channels_last, compile=args.compile, repeats=args.repeats,
                dbp_settings=args.dbp,
                dbp_defaults=timm_dbp.DBP_DEFAULTS)
    if args.compile == 'inductor':  # TORCHINDUCTOR_LAYOUT_OPTIMIZATION=0 turns it off (section 44b)
        from torch._inductor import config as inductor_config
        meta['inductor_layout_optimization'] = inductor_config.layout_optimization
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
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(results)), 4.5), dpi=120)
    names = [r['config'] for r in results]
    bottoms = [r['median_s']['bp'] for r in results]
    ax.bar(names, bottoms, label='BP step')
    for part in ('fusion', 'sample', 'update'):
        values = [max(r['overhead_s'][part], 0) for r in results]
        ax.bar(names, values, bottom=bottoms, label=f'DBP {part}')
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel('seconds per training step (median)')
    if len(results) > 4:  # long config names: slanted
        ax.tick_params(axis='x', labelrotation=40, labelsize=8)
        plt.setp(ax.get_xticklabels(), ha='right')
    compiled = f', torch.compile ({meta["compile"]})' if meta.get('compile') else ''
    ax.set_title(f'DBP vs BP step cost ({meta["device"]}, {meta["threads"]} threads{compiled})\n'
                 f'{meta["dbp_settings"] or "defaults"}', fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == '__main__':
    main()
