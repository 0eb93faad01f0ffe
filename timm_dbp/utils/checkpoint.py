""" Training checkpoints that are written atomically and resume exactly

A checkpoint holds everything a run needs to continue bit-for-bit on the same machine: model (with every DBP
matrix R), optimizer (with the DBP step counter and per-layer counters), scheduler, grad scaler, EMA model,
epoch, best metric and the Python / NumPy / torch (CPU and CUDA) RNG states at the end of the epoch.
"""
import argparse
import csv
import os
import random
import shutil
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

__all__ = ['save_atomic', 'copy_atomic', 'load_checkpoint_file', 'checkpoint_safe_globals', 'rng_state', 'set_rng_state',
           'append_summary', 'CheckpointError']


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run."""


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path` (never a partial file)."""
    tmp = f'{path}.tmp'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_atomic(src: str, dst: str) -> None:
    """Make `dst` hold what `src` holds, atomically: a hard link (no second write) or, where links fail, a copy."""
    tmp = f'{dst}.tmp'
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def checkpoint_safe_globals() -> List[Any]:
    """What torch.load(weights_only=True) must accept in a train.py checkpoint beyond tensors and containers: the
    argparse Namespace of its args and the NumPy arrays of its RNG state (plain numeric data, no code)."""
    multiarray = getattr(np, '_core', None) or np.core
    dtypes = [type(np.dtype(t)) for t in (np.uint8, np.int32, np.int64, np.uint32, np.float32, np.float64, np.bool_)]
    return [argparse.Namespace, np.ndarray, np.dtype, multiarray.multiarray._reconstruct, *dtypes]


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Read a checkpoint written by `save_atomic` with torch.load(weights_only=True), so that a checkpoint from
    elsewhere never runs pickled code; raise CheckpointError with a one-line reason otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, a pickle that wants more than weights
        message = f'{type(e).__name__}: {e}'.strip().splitlines()[0]
        if 'Weights only load failed' in message or 'WeightsUnpickler' in str(e):
            message = 'it holds objects other than tensors and training state (refused: weights_only loading)'
        raise CheckpointError(f'cannot read checkpoint {path}: {message}') from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict'), dict):
        raise CheckpointError(f'{path} is not a training checkpoint (no state_dict)')
    return checkpoint


def append_summary(path: str, row: Mapping[str, Any]) -> None:
    """Append one epoch's row to a CSV summary whose columns stay aligned: a row with columns the file lacks (an
    epoch that validated after epochs that did not, --val-interval) rewrites the file, atomically, with the union
    of the columns; cells a row lacks stay empty."""
    rows: List[Dict[str, str]] = []
    columns: List[str] = []
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        with open(path, newline='') as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    new_columns = [k for k in row if k not in columns]
    if columns and not new_columns:
        with open(path, 'a', newline='') as f:
            csv.DictWriter(f, fieldnames=columns, restval='').writerow(row)
        return
    tmp = f'{path}.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns + new_columns, restval='')
        writer.writeheader()
        writer.writerows(rows + [dict(row)])
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    """Every RNG a training step draws from."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[Dict[str, Any]]) -> None:
    if not state:
        return
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
