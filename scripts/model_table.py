#!/usr/bin/env python3
""" The README's table of registered dbp_ models: parameters, DBP state (R) with the default kron structure and with
full R, and the timm pretrained weights each twin loads with R = I (checked offline for every twin by
tests/test_twins.py). tests/test_readme_table.py keeps the README equal to this script's output.

    python scripts/model_table.py          # prints the markdown table
"""
import timm
import torch

import timm_dbp  # noqa: F401
from timm_dbp import decor_layers


def _state_mib(name: str, **kwargs) -> float:
    model = timm.create_model(name, device='meta', **kwargs)
    return sum(layer.decor_state_bytes for _, layer in decor_layers(model)) / 2 ** 20


def model_table() -> str:
    lines = [
        '| model | params (M) | R, kron (default) (MiB) | R, full (MiB) | timm weights loaded with R = I |',
        '|---|---:|---:|---:|---|']
    for name in timm.list_models('dbp_*'):
        model = timm.create_model(name, device='meta')
        params = sum(p.numel() for p in model.parameters()) / 1e6
        tags = ', '.join(f'`{tag.split(".", 1)[1]}`' for tag in timm.list_pretrained(f'{name}.*'))
        lines.append(f'| `{name}` | {params:.1f} | {_state_mib(name):.1f} | '
                     f'{_state_mib(name, dbp_structure="full"):.1f} | {tags} |')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    torch.set_num_threads(1)
    print(model_table(), end='')
