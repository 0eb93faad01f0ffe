""" The R update with float32 or bfloat16 operands (`decor_matmul_dtype`), by problem width d and batch size

`grouped_decorrelation_update_` runs one batched update per group of equal-shape R's; its cost is its products
(n d^2 for X = z^T z, d^3 for G R) on wide R's and its few dozen tensor operations on narrow ones. This script times,
interleaved in one process (float32, bfloat16, float32, ...; --repeats rounds after a warm-up, medians), one update
of a batch of R's (d x d, n = --samples decorrelated inputs each) at each width and batch size, with the products'
operands in float32 and in bfloat16, and the plain products z^T z in both dtypes (the hardware's GEMM speed, GFLOP/s).
The widths below MATMUL_DTYPE_MIN_DIM are timed with bfloat16 products forced on, which shows where bfloat16 stops
paying (the conversions cost more than the product saves). The float32 update and z^T z are also timed with every
batch of products as one torch.bmm (`update_float32_one_bmm`, `gemm_float32`) against `batch_matmul`'s split of a
CPU batch over the threads (`update_float32`, `gemm_float32_balanced`): odd batches on 2 threads show the difference.
Writes JSON.

    python bench/matmul_dtype.py --out docs/bench_matmul_dtype_s32/update
    python bench/matmul_dtype.py --dims 128 256 512 --batches 1 2 3 4 5 --repeats 11 --out docs/bench_s47/update
"""
import argparse
import json
import statistics

import torch

from timm_dbp.layers import decorrelation

from _timing import interleaved_times  # bench/_timing.py

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--dims', nargs='+', type=int, default=[9, 32, 64, 96, 128, 192, 256, 512, 1024])
parser.add_argument('--batches', nargs='+', type=int, default=[1, 4])
parser.add_argument('--samples', type=int, default=1024, help='decorrelated inputs per R (decor_samples)')
parser.add_argument('--repeats', type=int, default=21)
parser.add_argument('--out', default=None, help='output prefix: writes <out>.json')


def one_bmm(fn):
    """fn with every batch of products as one torch.bmm (`batch_matmul` never splits a batch)."""
    def run():
        saved, decorrelation.BALANCED_BMM_MIN_MACS = decorrelation.BALANCED_BMM_MIN_MACS, float('inf')
        try:
            return fn()
        finally:
            decorrelation.BALANCED_BMM_MIN_MACS = saved
    return run


def main():
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    min_dim = decorrelation.MATMUL_DTYPE_MIN_DIM
    try:
        for batch in args.batches:
            for d in args.dims:
                decorrelation.MATMUL_DTYPE_MIN_DIM = 0  # bfloat16 at every width, to see where it stops paying
                R = torch.eye(d).repeat(batch, 1, 1) + 0.01 * torch.randn(batch, d, d)
                z = torch.randn(batch, args.samples, d)
                z16 = z.bfloat16()
                rule = dict(lr=3e-3, kappa=0.0, max_rel_change=1.0, max_step=0.5, decorrelated=True)
                variants = {
                    f'update_{name}': (lambda dtype=dtype: decorrelation._flat_update_(
                        R.clone(), z, matmul_dtype=dtype, **rule))
                    for name, dtype in decorrelation.MATMUL_DTYPES.items()}
                variants['update_float32_one_bmm'] = one_bmm(variants['update_float32'])
                variants.update(gemm_float32=lambda: torch.bmm(z.mT, z), gemm_bfloat16=lambda: torch.bmm(z16.mT, z16),
                                gemm_float32_balanced=lambda: decorrelation.batch_matmul(z.mT, z))
                times = interleaved_times(variants, args.repeats)
                median = {name: statistics.median(t) for name, t in times.items()}
                flops = 2 * batch * args.samples * d * d
                rows.append(dict(batch=batch, d=d, n=args.samples, median_s=median, raw_s=times,
                                 update_speedup=median['update_float32'] / median['update_bfloat16'],
                                 balanced_speedup=median['update_float32_one_bmm'] / median['update_float32'],
                                 gemm_gflops={k: flops / median[f'gemm_{k}'] / 1e9 for k in ('float32', 'bfloat16')}))
                r = rows[-1]
                print(f'batch {batch} d {d:5d}: update float32 {median["update_float32"] * 1e3:8.3f} ms, bfloat16 '
                      f'{median["update_bfloat16"] * 1e3:8.3f} ms ({r["update_speedup"]:.2f}x); float32 with one bmm '
                      f'{median["update_float32_one_bmm"] * 1e3:8.3f} ms (balanced {r["balanced_speedup"]:.2f}x); '
                      f'z^T z {r["gemm_gflops"]["float32"]:6.0f} / {r["gemm_gflops"]["bfloat16"]:6.0f} GFLOP/s, '
                      f'balanced {median["gemm_float32_balanced"] * 1e3:.3f} ms vs {median["gemm_float32"] * 1e3:.3f}',
                      flush=True)
    finally:
        decorrelation.MATMUL_DTYPE_MIN_DIM = min_dim
    if args.out:
        with open(args.out + '.json', 'w') as f:
            json.dump(dict(meta=dict(samples=args.samples, repeats=args.repeats, threads=torch.get_num_threads(),
                                     torch=torch.__version__, matmul_dtype_min_dim=min_dim,
                                     script=open(__file__).read()), rows=rows), f, indent=1)
        print(f'wrote {args.out}.json')


if __name__ == '__main__':
    main()
