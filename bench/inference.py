""" Inference throughput: folded DBP model vs the plain timm model (and the unfolded DBP model)

A trained DBP model folds into the plain architecture (W R in ordinary layers), so it must run exactly as fast.
Times eval-mode forwards (no grad) of: plain `resnet18`, `fold(dbp_resnet18)` with R moved away from the identity,
and the unfolded `dbp_resnet18` (which recomputes W R every forward). Interleaved rounds after one warm-up round,
medians; throughput in images/s. Writes JSON with this script's source.

    python bench/inference.py --out docs/bench_inference.json
"""
import argparse
import copy
import json
import statistics

import timm
import torch

import timm_dbp
from timm_dbp import decor_layers

from _timing import interleaved_times  # bench/_timing.py

parser = argparse.ArgumentParser()
parser.add_argument('--model', default='resnet18')
parser.add_argument('--img-size', type=int, default=224)
parser.add_argument('-b', '--batch-size', type=int, default=32)
parser.add_argument('--repeats', type=int, default=15)
parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
parser.add_argument('--out', default=None)


def main():
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    dbp = timm.create_model(f'dbp_{args.model}')
    with torch.no_grad():
        for _, layer in decor_layers(dbp):  # a "trained" R: the folded weights differ from W
            layer.decor_matrix.add_(0.01 * torch.randn_like(layer.decor_matrix))
    models = {
        'plain': timm.create_model(args.model),
        'folded': timm_dbp.fold(copy.deepcopy(dbp)),
        'dbp_unfolded': dbp,
    }
    for model in models.values():
        model.to(device).eval()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    with torch.no_grad():
        times = interleaved_times({name: (lambda m=model: m(x)) for name, model in models.items()}, args.repeats,
                                  torch.cuda.synchronize if device.type == 'cuda' else None)
    med = {name: statistics.median(t) for name, t in times.items()}
    rate = {name: args.batch_size / m for name, m in med.items()}
    for name in models:
        print(f'{name:>13}: {rate[name]:8.1f} img/s  (median {med[name] * 1000:.1f} ms / batch of {args.batch_size})')
    print(f'folded / plain throughput: {rate["folded"] / rate["plain"]:.4f}')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(args=vars(args), device=str(device), threads=torch.get_num_threads(),
                           torch=torch.__version__, median_s=med, images_per_s=rate, raw_s=times,
                           folded_over_plain=rate['folded'] / rate['plain'], code=open(__file__).read()), f, indent=1)


if __name__ == '__main__':
    main()
