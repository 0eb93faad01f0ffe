""" Fashion-MNIST from the IDX files that Debian's `dataset-fashion-mnist` package installs

Local files only (no download): /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
"""
import gzip
import os
from typing import Tuple

import numpy as np
import torch

__all__ = ['FASHION_MNIST_DIR', 'FASHION_MNIST_CLASSES', 'read_idx', 'load_fashion_mnist']

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally .gz): magic 0x0000 <dtype code> <ndim>, big-endian int32 dims, data."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f'{path}: not an IDX file (bad magic {data[:4].hex()})')
    ndim = data[3]
    dims = np.frombuffer(data, dtype='>i4', count=ndim, offset=4)
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    payload = data[4 + 4 * ndim:]
    if len(payload) != expected:
        raise ValueError(f'{path}: truncated or corrupt IDX file ({len(payload)} data bytes, expected {expected})')
    return np.frombuffer(payload, dtype=dtype).reshape(tuple(int(d) for d in dims))


def load_fashion_mnist(split: str = 'train', root: str = FASHION_MNIST_DIR) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of split 'train' (60k) or 'test' (10k)."""
    prefix = {'train': 'train', 'test': 't10k', 'validation': 't10k'}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    paths = [os.path.join(root, f'{prefix}-{kind}-ubyte.gz') for kind in ('images-idx3', 'labels-idx1')]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f'Fashion-MNIST files not found: {", ".join(missing)}. '
            f'Install them with: apt-get install -y dataset-fashion-mnist')
    images, labels = (torch.from_numpy(read_idx(p).copy()) for p in paths)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f'{root}: {images.shape[0]} images but {labels.shape[0]} labels')
    return images, labels.long()
