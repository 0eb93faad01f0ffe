""" Load a published model through timm, with errors that name the file or the key

`load_model('hf-hub:ORG/NAME')` (or `local-dir:PATH`) is `timm.create_model(name, pretrained=True)` after
`import timm_dbp`, plus checks that turn timm's failures into one clear message: an unreadable config.json, an
architecture timm does not know (the message says to `import timm_dbp`), a truncated or corrupt weights file, and
weights that do not fit the architecture. Weights are read by timm: safetensors, or torch.load(weights_only=True).
A folder published before size limits were pinned as 0 pins "no limit" as null, which timm drops (the model's default
would apply): `load_model` passes those as 0.
"""
import json
from pathlib import Path
from typing import Any, Dict, Tuple

import timm
from torch import nn

import timm_dbp
from timm_dbp.models import DBP_MODEL_KWARGS, SIZE_LIMIT_ARGS, UNLIMITED
from timm_dbp.models._pretrained import (
    PretrainedWeightsError, check_pretrained_fits, pretrained_source, raised_while_loading_pretrained)

__all__ = ['HubLoadError', 'read_hub_config', 'load_model']


class HubLoadError(RuntimeError):
    """A published model that cannot be loaded; the message names the file or the key."""


def _config_file(name: str) -> Tuple[str, str, Path]:
    """(source, id, path of config.json) for an `hf-hub:` or `local-dir:` model name."""
    source, model_id = timm.models.parse_model_name(name)
    if source == 'local-dir':
        path = Path(model_id) / 'config.json'
        if not path.is_file():
            raise HubLoadError(f'{path} not found: local-dir:{model_id} is not a published model folder')
        return source, model_id, path
    if source == 'hf-hub':
        from huggingface_hub import hf_hub_download
        repo_id, _, revision = model_id.partition('@')
        try:
            return source, model_id, Path(hf_hub_download(repo_id, 'config.json', revision=revision or None))
        except Exception as e:  # not in the cache (offline), no such repo, no network, ...
            raise HubLoadError(f'cannot get config.json of hf-hub:{model_id}: {type(e).__name__}: '
                               f'{str(e).strip().splitlines()[0] if str(e).strip() else ""}') from None
    raise HubLoadError(f'{name!r} is not an hf-hub:ORG/NAME or local-dir:PATH model name')


def read_hub_config(name: str) -> Tuple[Dict[str, Any], Path]:
    """The config.json of an `hf-hub:` / `local-dir:` model and its path; its architecture must be registered."""
    _, _, path = _config_file(name)
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubLoadError(f'{path}: not a readable config.json ({type(e).__name__}: {e})') from None
    architecture = config.get('architecture') if isinstance(config, dict) else None
    if not isinstance(architecture, str) or not architecture:
        raise HubLoadError(f'{path}: no "architecture" (not a timm config.json)')
    if not timm.is_model(architecture):
        known = ', '.join(timm.list_models('dbp_*'))
        raise HubLoadError(
            f'{path}: architecture {architecture!r} is not registered with timm. `import timm_dbp` before '
            f'timm.create_model registers the DBP architectures (timm-dbp {timm_dbp.__version__}: {known}); '
            f'a name missing from that list needs the timm-dbp (or other library) that defines it')
    return config, path


def load_model(name: str, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, pretrained=pretrained, **kwargs)` for a published `hf-hub:` / `local-dir:` model,
    raising HubLoadError (naming config.json, the weights file or the key) instead of timm's bare errors."""
    config, path = read_hub_config(name)
    model_args = config.get('model_args') or {}
    for kwarg in (DBP_MODEL_KWARGS[limit][0] for limit in SIZE_LIMIT_ARGS):
        if kwarg in model_args and model_args[kwarg] is None:
            kwargs.setdefault(kwarg, UNLIMITED)
    source, model_id = timm.models.parse_model_name(name)
    if source == 'hf-hub':
        where = pretrained_source(dict(hf_hub_id=model_id, source=source))
    else:
        where = pretrained_source(dict(file=model_id, source=source))
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except PretrainedWeightsError as e:
        raise HubLoadError(str(e)) from e
    except Exception as e:
        if not raised_while_loading_pretrained(e):
            raise
        mismatch = _mismatch(name, where, kwargs)
        if mismatch:
            raise HubLoadError(mismatch) from e
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        detail = '; '.join(lines[:2]) if lines else ''
        raise HubLoadError(
            f'cannot load weights of {config["architecture"]} from {where}: {type(e).__name__}: {detail}') from e


def _mismatch(name: str, where: str, kwargs: Dict[str, Any]) -> str:
    """After a failed load: the first key of the weights file that does not fit the architecture, or ''."""
    path = where.rsplit(' (', 1)[-1].rstrip(')') if where.startswith('hf-hub:') else where
    if not path.endswith('.safetensors') or not Path(path).is_file():
        return ''
    try:
        from safetensors.torch import load_file
        state_dict = load_file(path)
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # the file itself is unreadable: the caller's message says so
        return ''
    try:
        check_pretrained_fits(state_dict, model, dict(model.pretrained_cfg, first_conv=None))
    except PretrainedWeightsError as e:
        return str(e)
    return ''
