""" Ad hoc (BENCHMARKS 39b): each stage of a kron layer's sampling, and ways to lay the input out as pixel rows,
timed interleaved with bench/_timing.interleaved_times (medians of 40 rounds, ms).
    PYTHONPATH=<repo> python docs/bench_sampling_s39/sampling_stages.py """
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'bench'))
from _timing import interleaved_times  # noqa: E402
from timm_dbp.layers.decor_layers import DecorConv2d, _draw_patches, _pixel_rows  # noqa: E402
from timm_dbp.layers.decorrelation import (  # noqa: E402
    kron_vector_positions, matmul_dtype_named, operand_dtype, rounded_product)


def medians_ms(variants):
    return {k: round(statistics.median(v) * 1e3, 3) for k, v in interleaved_times(variants, 40).items()}


def generator():
    g = torch.Generator()
    g.manual_seed(5)
    return g


for shape in [(64, 64, 16, 16), (64, 128, 8, 8)]:  # layer1 / layer2 inputs at 64 px, batch 64
    c = shape[1]
    conv = DecorConv2d(c, c, 3, padding=1, bias=False, decor_structure='kron')
    conv.decor_samples, conv.decor_seed, conv.decor_matmul_dtype = 1024, 5, 'auto'
    x = torch.randn(shape)
    R_c, R_s = conv.decor_matrix, conv.decor_spatial
    _, b, _, pixel = _draw_patches(x, conv, 1024, generator())
    n, s = pixel.shape
    pixels, rows = _pixel_rows(x, b, pixel, torch.float32)
    pos_s, pos_c = (kron_vector_positions(n, size, 1024, x.device) for size in (s, c))
    bag_rows = rows.repeat_interleave(pos_s.shape[1], 0)
    channel_vectors = F.embedding_bag(bag_rows, pixels, per_sample_weights=R_s[pos_s.reshape(-1)], mode='sum')
    patches = pixels.index_select(0, rows.reshape(-1)).view(n, s, -1)
    spatial = torch.einsum('nqc,nsc->nqs', R_c[pos_c], patches)
    dtype = operand_dtype(c, matmul_dtype_named('auto', x.device))
    B, C, H, W = shape
    out = torch.empty(B * H * W + 1, C)
    pick_b, pick_pixel = torch.randint(B, (n * s,)), torch.randint(H * W, (n * s,))
    print(shape, 'stages', medians_ms({
        'draw': lambda: _draw_patches(x, conv, 1024, generator()),
        'pixel rows': lambda: _pixel_rows(x, b, pixel, torch.float32),
        'embedding_bag': lambda: F.embedding_bag(bag_rows, pixels, per_sample_weights=R_s[pos_s.reshape(-1)],
                                                 mode='sum'),
        'R_c product': lambda: rounded_product(channel_vectors, R_c.mT, dtype),
        'index_select': lambda: pixels.index_select(0, rows.reshape(-1)),
        'einsum': lambda: torch.einsum('nqc,nsc->nqs', R_c[pos_c], patches),
        'R_s product': lambda: spatial.reshape(-1, s) @ R_s.mT,
        'whole sample': lambda: conv._store_decor_inputs(x, False),
    }))
    print(shape, 'layouts', medians_ms({
        'copy to rows (in use)': lambda: out[:-1].view(B, H, W, C).copy_(x.permute(0, 2, 3, 1)),
        'contiguous(channels_last)': lambda: x.contiguous(memory_format=torch.channels_last),
        'gather the n*s sampled pixels from NCHW': lambda: x.flatten(2).transpose(1, 2)[pick_b, pick_pixel],
    }))
