#!/usr/bin/env python3
""" The README's table of registered dbp_ models: parameters, DBP state (R) with the model's defaults (kron R; blocks of
at most 256 channels for the wide twins, `WIDE_TWIN_ARGS`), the default block size, the state with full R, and the
timm pretrained weights each twin loads with R = I (checked offline for every twin by
tests/test_twins.py). tests/test_readme_table.py keeps the README equal to this script's output.

    python scripts/model_table.py          # prints the markdown table
"""
import timm
import torch

import timm_dbp  # noqa: F401
from timm_dbp import decor_layers


def full_r_bytes(layer) -> int:
    """Bytes of the layer's R with the full structure: one d x d matrix, d = decor_dim, in the weight's dtype."""
    return layer.decor_dim ** 2 * layer.weight.element_size()


def model_table() -> str:
    lines = [
        '| model | params (M) | R, default (MiB) | dbp_block_size | R, full (MiB) | timm weights loaded with R = I |',
        '|---|---:|---:|---:|---:|---|']
    for name in timm.list_models('dbp_*'):
        model = timm.create_model(name, device='meta')
        params = sum(p.numel() for p in model.parameters()) / 1e6
        layers = [layer for _, layer in decor_layers(model)]
        default_mib = sum(layer.decor_state_bytes for layer in layers) / 2 ** 20
        blocks = model.dbp_args['block_size'] or '-'
        full_mib = sum(full_r_bytes(layer) for layer in layers) / 2 ** 20
        tags = ', '.join(f'`{tag.split(".", 1)[1]}`' for tag in timm.list_pretrained(f'{name}.*'))
        lines.append(f'| `{name}` | {params:.1f} | {default_mib:.1f} | {blocks} | {full_mib:.1f} | {tags} |')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    torch.set_num_threads(1)
    print(model_table(), end='')
