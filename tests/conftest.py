import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # train.py / validate.py live at the repository root

if os.environ.get('PYTEST_XDIST_WORKER'):  # one of `pytest -n N`'s workers: one thread each, N share the cores
    torch.set_num_threads(1)
    os.environ.setdefault('OMP_NUM_THREADS', '1')  # and so do the train.py / torchrun processes tests start


@pytest.fixture(scope='session')
def tiny_fmnist(tmp_path_factory):
    """A small Fashion-MNIST look-alike in IDX files: 4 classes of noisy stripe patterns, 28 x 28."""
    from timm_dbp.data import write_idx
    root = tmp_path_factory.mktemp('fmnist')
    rng = np.random.default_rng(0)
    for prefix, n in (('train', 256), ('t10k', 128)):
        labels = rng.integers(0, 4, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.int32)
        for i, label in enumerate(labels):
            images[i, :, label * 7:(label + 1) * 7] += 180  # class = which vertical band is bright
        write_idx(str(root / f'{prefix}-images-idx3-ubyte.gz'), np.clip(images, 0, 255).astype(np.uint8))
        write_idx(str(root / f'{prefix}-labels-idx1-ubyte.gz'), labels)
    return str(root)
