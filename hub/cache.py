""" Put a Hub model folder into the local Hugging Face cache, so `hf-hub:ORG/NAME` loads it with no network

The cache layout is huggingface_hub's own (what `hf_hub_download` writes and, with HF_HUB_OFFLINE=1, reads):

    <cache>/models--ORG--NAME/blobs/<sha256 of the file>
    <cache>/models--ORG--NAME/snapshots/<commit>/<path>  ->  ../../blobs/<sha256>   (a copy where links fail)
    <cache>/models--ORG--NAME/refs/<revision>            holds <commit>

For machines without network (copy a folder written by `python -m hub.publish --dry-run` or downloaded elsewhere)
and for the offline tests.
"""
import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional, Union

__all__ = ['place_in_hf_cache']


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def place_in_hf_cache(
        folder: Union[str, Path],
        repo_id: str,
        cache_dir: Optional[Union[str, Path]] = None,
        revision: str = 'main',
) -> Path:
    """Install every file of `folder` as one snapshot of model repo `repo_id` in a Hugging Face cache.

    Args:
        folder: The model folder (config.json, model.safetensors, README.md, ...).
        repo_id: 'ORG/NAME', the id that `hf-hub:ORG/NAME` will name.
        cache_dir: The hub cache (default: huggingface_hub's, i.e. $HF_HUB_CACHE or $HF_HOME/hub).
        revision: The branch name that points at the snapshot.

    Returns:
        The snapshot folder.
    """
    from huggingface_hub import constants
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'not a folder: {folder}')
    files = sorted(p for p in folder.rglob('*') if p.is_file())
    hashes = {p: _sha256(p) for p in files}
    # a commit id that depends on the content only, so the same folder always gives the same snapshot
    commit = hashlib.sha1(''.join(f'{p.relative_to(folder).as_posix()}:{h};' for p, h in hashes.items()).encode()
                          ).hexdigest()
    repo_dir = Path(cache_dir or constants.HF_HUB_CACHE) / f'models--{repo_id.replace("/", "--")}'
    snapshot = repo_dir / 'snapshots' / commit
    (repo_dir / 'blobs').mkdir(parents=True, exist_ok=True)
    for path, digest in hashes.items():
        blob = repo_dir / 'blobs' / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:  # no symlinks (some Windows set-ups): huggingface_hub then keeps copies too
            shutil.copyfile(blob, link)
    (repo_dir / 'refs').mkdir(exist_ok=True)
    (repo_dir / 'refs' / revision).write_text(commit)
    return snapshot
