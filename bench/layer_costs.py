""" Where the DBP overhead sits: per DBP layer, the cost of its fusion, its sampling and its R update

bench/step_cost.py splits the DBP overhead of a whole training step into fusion, sampling and R update; this script
splits each part by layer, so the next lever is visible (which layers, which forward path, which sizes).
For every DecorConv2d / DecorLinear of dbp_<model>, on the input that layer sees in a forward of a random batch:
    fusion    forward + backward (grads of input and weight) of the DBP layer minus the same of the plain conv /
              linear with the layer's weight (median of --repeats interleaved pairs); `path` says how R is applied:
              'fused' (A = W R is the kernel) or 'input' (R_c on the input, a 1x1 conv; the spatial factor fused)
    sample    drawing decor_samples inputs from that input (an armed no-grad forward plus the optimizer step's sample
              from the input it kept, minus an unarmed forward; interleaved pairs)
    update    one R update from that sample (`update_decorrelation`, decor_lr = 0 so R stays the same)
Sampling and update multiply in the optimizer's `decor_matmul_dtype` (default 'auto': bfloat16 operands where the CPU
has bfloat16 units); the optimizer batches equal-shape updates of several layers, which this per-layer view does not.
Each time is the median of --repeats rounds after one warm-up round (bench/_timing.py).

    python bench/layer_costs.py --config resnet18:64:64 --out docs/bench_layer_costs   # JSON with every layer
    python bench/layer_costs.py --config test_resnet:32:128 --repeats 3                 # the Fashion-MNIST model
    python bench/layer_costs.py --config wide_resnet50_2:64:32 --dbp dbp_block_size=0   # dense R's (model kwargs)
"""
import argparse
import json
import statistics

import timm
import torch
import torch.nn.functional as F

import timm_dbp  # noqa: F401  registers dbp_ models
from timm_dbp import DBP_DEFAULTS, decor_layers
from timm_dbp.layers import MATMUL_DTYPE_NAMES, matmul_dtype_named

from _cli import model_config, split_dbp_settings  # bench/_cli.py
from _timing import interleaved_times  # bench/_timing.py

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--config', default='resnet18:64:64', help='model:img_size:batch_size (DBP twin: dbp_<model>)')
parser.add_argument('--repeats', type=int, default=7)
parser.add_argument('--samples', type=int, default=DBP_DEFAULTS['decor_samples'])
parser.add_argument('--matmul-dtype', default=DBP_DEFAULTS['decor_matmul_dtype'], choices=MATMUL_DTYPE_NAMES,
                    help="operands of the sample's and the update's products (the optimizer's decor_matmul_dtype)")
parser.add_argument('--dbp', nargs='*', default={}, action=timm.utils.ParseKwargs,
                    help='dbp_* model kwargs of the twin (e.g. dbp_block_size=0 dbp_structure=channel)')
parser.add_argument('--out', default=None, help='output prefix: writes <out>.json')


def armed_forward(layer, x, samples):
    """One no-grad forward of `layer` and, armed (samples > 0), the sample of `samples` inputs that the optimizer step
    draws from the input the forward kept; returns that sample (None unarmed)."""
    layer.decor_samples = samples
    layer(x)
    layer.decor_samples = 0
    return layer.take_decor_inputs()


def forward_backward(layer, x, plain):
    x = x.detach().requires_grad_()
    if plain:
        y = layer._conv_forward(x, layer.weight, layer.bias) if hasattr(layer, 'kernel_size') else F.linear(
            x, layer.weight, layer.bias)
    else:
        y = layer(x)
    y.sum().backward()
    layer.weight.grad = None


def forward_path(layer, x):
    return 'input' if hasattr(layer, 'channel_factor_on_input') and layer.channel_factor_on_input(x) else 'fused'


def main():
    args = parser.parse_args()
    if args.samples < 1 or args.repeats < 1:
        parser.error(f'--samples and --repeats must be at least 1, got {args.samples} and {args.repeats}')
    name, img, batch = model_config(parser, '--config', args.config)
    model_kwargs, others = split_dbp_settings(args.dbp)
    if others:
        parser.error(f'--dbp takes dbp_* model kwargs only (use --samples / --matmul-dtype), got {sorted(others)}')
    torch.manual_seed(0)
    model = timm.create_model(f'dbp_{name}', num_classes=100, **model_kwargs).train()
    layers = list(decor_layers(model))
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda _, a, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, layer in layers]
    model(torch.randn(batch, 3, img, img))
    for hook in hooks:
        hook.remove()

    matmul_dtype = matmul_dtype_named(args.matmul_dtype, torch.device('cpu'))
    rows = []
    for n, layer in layers:
        x = inputs[n]
        layer.decor_matmul_dtype = args.matmul_dtype  # as the optimizer sets it, for the armed forward's product
        pairs = interleaved_times({plain: (lambda p=plain: forward_backward(layer, x, p)) for plain in (True, False)},
                                  args.repeats)  # plain / DBP interleaved
        plain_s, dbp_s = (statistics.median(pairs[p]) for p in (True, False))
        with torch.no_grad():  # armed / unarmed forwards interleaved
            forwards = interleaved_times({k: (lambda k=k: armed_forward(layer, x, k)) for k in (args.samples, 0)},
                                         args.repeats)
        armed, unarmed = (statistics.median(forwards[k]) for k in (args.samples, 0))
        sample = armed_forward(layer, x, args.samples)
        update = lambda: layer.update_decorrelation(sample, lr=0.0, kappa=0.0, matmul_dtype=matmul_dtype)  # noqa: E731
        update_s = statistics.median(interleaved_times({'update': update}, args.repeats)['update'])
        rows.append(dict(
            layer=n, structure=layer.decor_structure, weight=list(layer.weight.shape), input=list(x.shape),
            R=list(layer.decor_matrix.shape), spatial=list(layer.decor_spatial.shape), path=forward_path(layer, x),
            plain_fwd_bwd_s=plain_s, dbp_fwd_bwd_s=dbp_s, fusion_s=dbp_s - plain_s, sample_s=armed - unarmed,
            update_s=update_s))
        r = rows[-1]
        print(f'{n:26s} W {str(tuple(r["weight"])):18s} x {str(tuple(r["input"])):18s} {r["path"]:5s} '
              f'fusion {r["fusion_s"] * 1e3:+7.2f} ms  sample {r["sample_s"] * 1e3:+6.2f} ms  '
              f'update {r["update_s"] * 1e3:6.2f} ms  (plain fwd+bwd {plain_s * 1e3:6.2f} ms)', flush=True)
    totals = {part: sum(r[f'{part}_s'] for r in rows) for part in ('plain_fwd_bwd', 'fusion', 'sample', 'update')}
    by_path = {path: sum(r['fusion_s'] for r in rows if r['path'] == path) for path in ('fused', 'input')}
    print(f'total: plain conv/linear fwd+bwd {totals["plain_fwd_bwd"] * 1e3:.1f} ms; DBP fusion '
          f'{totals["fusion"] * 1e3:+.1f} ms (fused layers {by_path["fused"] * 1e3:+.1f}, input-path layers '
          f'{by_path["input"] * 1e3:+.1f}), sampling {totals["sample"] * 1e3:+.1f} ms, R update '
          f'{totals["update"] * 1e3:.1f} ms')
    meta = dict(config=args.config, dbp=args.dbp, matmul_dtype=args.matmul_dtype, matmul_operands=str(matmul_dtype),
                repeats=args.repeats, samples=args.samples, threads=torch.get_num_threads(),
                torch=torch.__version__, timm=timm.__version__)
    if args.out:
        with open(f'{args.out}.json', 'w') as f:
            json.dump(dict(meta=meta, totals_s=totals, fusion_by_path_s=by_path, layers=rows), f, indent=1)
        print(f'wrote {args.out}.json')


if __name__ == '__main__':
    main()
