""" Fashion-MNIST from the IDX files that Debian's `dataset-fashion-mnist` package installs

Local files only (no download): /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
"""
import gzip
import os
from typing import Tuple

import numpy as np
import torch

__all__ = ['FASHION_MNIST_DIR', 'FASHION_MNIST_CLASSES', 'FashionMNIST', 'read_idx', 'load_fashion_mnist', 'write_idx']

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


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST as a timm-style image dataset: PIL 'L' images (28 x 28) and int labels, from local IDX files.

    Args:
        root: Folder with the four IDX .gz files (default: where Debian's dataset-fashion-mnist puts them).
        split: 'train' (60k) or 'test' / 'validation' (10k).
        transform: Applied to each PIL image (timm's train / eval transforms).
        num_samples: Use only the first N images of the split.
    """

    def __init__(self, root: str = FASHION_MNIST_DIR, split: str = 'train', transform=None, num_samples=None):
        self.images, self.labels = load_fashion_mnist(split, root or FASHION_MNIST_DIR)
        if num_samples:
            self.images, self.labels = self.images[:num_samples], self.labels[:num_samples]
        self.transform = transform
        self.classes = list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image
        img = Image.fromarray(self.images[index].numpy(), mode='L')
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])


def write_idx(path: str, array: np.ndarray) -> None:
    """Write `array` as an IDX file (gzip-compressed when path ends in .gz); the inverse of `read_idx`."""
    codes = {np.dtype(v).str: k for k, v in _IDX_DTYPES.items()}
    big_endian = array.astype(np.dtype(array.dtype).newbyteorder('>')) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, codes[np.dtype(big_endian.dtype).str], array.ndim])
    header += np.asarray(array.shape, dtype='>i4').tobytes()
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'wb') as f:
        f.write(header + np.ascontiguousarray(big_endian).tobytes())
