""" Training checkpoints that are written atomically and resume exactly

A checkpoint holds everything a run needs to continue bit-for-bit on the same machine: model (with every DBP
matrix R), optimizer (with the DBP step counter and per-layer counters), scheduler, grad scaler, EMA model,
epoch, best metric and the Python / NumPy / torch (CPU and CUDA) RNG states at the end of the epoch.
"""
import os
import random
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ['save_atomic', 'copy_atomic', 'load_checkpoint_file', 'rng_state', 'set_rng_state', 'CheckpointError']


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


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Read a checkpoint written by `save_atomic`; raise CheckpointError with a one-line reason otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, ...
        raise CheckpointError(f'cannot read checkpoint {path}: {type(e).__name__}: {e}'.splitlines()[0]) from None
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
        raise CheckpointError(f'{path} is not a training checkpoint (no state_dict)')
    return checkpoint


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
