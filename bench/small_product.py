""" The kron spatial factor's product A = W R_s: matmul against `times_small_matrix` (one 1x1 conv on CPU)

A kron layer fuses its spatial factor into the kernel on every forward, A_o = W_o R_s with W viewed as (out, c, s),
and maps the kernel's gradient back with R_s^T on every backward: an (out c, s) x (s, s) product, s = kh * kw (9 for a
3x3 conv). For every distinct kron conv weight shape of dbp_<model>, this script times, interleaved in one process
(matmul, small, matmul, small, ...; --repeats rounds after a warm-up, medians):
    forward          A @ R_s  vs  times_small_matrix(A, R_s)
    forward+backward the same with the gradient of A (grad @ R_s^T)
and a plain copy of W for scale (what a memory-bound product would cost at least). Writes JSON.

    python bench/small_product.py --model resnet18 --out docs/bench_small_product_s30/resnet18
"""
import argparse
import json
import statistics

import timm
import torch

import timm_dbp  # noqa: F401  registers dbp_ models
from timm_dbp import decor_layers
from timm_dbp.layers import times_small_matrix

from _timing import interleaved_times  # bench/_timing.py

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--model', default='resnet18', help='the DBP twin dbp_<model> gives the weight shapes')
parser.add_argument('--repeats', type=int, default=21)
parser.add_argument('--out', default=None, help='output prefix: writes <out>.json')


def main():
    args = parser.parse_args()
    model = timm.create_model(f'dbp_{args.model}', device='meta')
    shapes = sorted({(layer.weight.shape[0], layer.weight.shape[1], layer.decor_spatial.shape[0])
                     for _, layer in decor_layers(model) if layer.decor_spatial.numel() > 0}, reverse=True)
    torch.manual_seed(0)
    rows = []
    for out, c, s in shapes:
        W = torch.randn(out, c, s, requires_grad=True)
        R_s, grad = torch.eye(s) + 0.1 * torch.randn(s, s), torch.randn(out, c, s)
        variants = {
            'matmul_fwd': lambda: W @ R_s,
            'small_fwd': lambda: times_small_matrix(W, R_s),
            'matmul_fwd_bwd': lambda: torch.autograd.grad(W @ R_s, W, grad),
            'small_fwd_bwd': lambda: torch.autograd.grad(times_small_matrix(W, R_s), W, grad),
            'copy': lambda: W.detach().clone(),
        }
        times = interleaved_times(variants, args.repeats)
        median = {name: statistics.median(t) for name, t in times.items()}
        rows.append(dict(weight=[out, c, s], elements=out * c * s, median_s=median, raw_s=times,
                         fwd_speedup=median['matmul_fwd'] / median['small_fwd'],
                         fwd_bwd_speedup=median['matmul_fwd_bwd'] / median['small_fwd_bwd']))
        r = rows[-1]
        print(f'W {out:4d} x {c:4d} x {s:2d}: fwd matmul {median["matmul_fwd"] * 1e3:6.2f} ms, small '
              f'{median["small_fwd"] * 1e3:6.2f} ms ({r["fwd_speedup"]:.2f}x); fwd+bwd matmul '
              f'{median["matmul_fwd_bwd"] * 1e3:6.2f} ms, small {median["small_fwd_bwd"] * 1e3:6.2f} ms '
              f'({r["fwd_bwd_speedup"]:.2f}x); copy {median["copy"] * 1e3:5.2f} ms', flush=True)
    if args.out:
        with open(args.out + '.json', 'w') as f:
            json.dump(dict(meta=dict(model=args.model, repeats=args.repeats, threads=torch.get_num_threads(),
                                     torch=torch.__version__, script=open(__file__).read()), rows=rows), f, indent=1)
        print(f'wrote {args.out}.json')


if __name__ == '__main__':
    main()
