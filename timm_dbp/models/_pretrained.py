""" Pretrained weights for dbp_ models: where they come from, whether they fit, and errors that name the file and key

Shared by every dbp_ model family: a family's pretrained filter completes missing R with the identity
(`timm_dbp.fill_decor_matrices`), folds R into an input conv that timm is about to adapt to other `in_chans`
(`fold_adapted_input_convs`) and checks the result against the model (`check_pretrained_fits`); its entrypoints build
through `build_dbp_model`.
"""
import os
import traceback
from typing import Any, Dict, Mapping, Sequence, Type

import torch
from torch import nn

from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from timm_dbp.layers import factor_size, fused_weight

from ._dbp_kwargs import DBP_MODEL_KWARGS, UNLIMITED

__all__ = [
    'PretrainedWeightsError', 'pretrained_source', 'fold_adapted_input_convs', 'check_pretrained_fits',
    'raised_while_loading_pretrained', 'build_dbp_model', 'r_shape_hint', 'r_mismatch_hint']


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights that cannot be read or do not fit the model; the message names the file or the key."""


# weight files timm looks for in a local-dir: / hf-hub: folder, most preferred first
_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')


def pretrained_source(cfg: Mapping[str, Any]) -> str:
    """Where timm reads the pretrained weights of `cfg` from, as a person can find it: the file, the weights file of a
    `local-dir:` folder, or the `hf-hub:` id with its file in the local cache (timm's order of sources)."""
    source, hub_id, file = cfg.get('source'), cfg.get('hf_hub_id'), cfg.get('file')
    if source == 'local-dir' and file:
        found = [os.path.join(file, name) for name in _WEIGHT_FILES if os.path.isfile(os.path.join(file, name))]
        return found[0] if found else f'local-dir:{file}'
    if source != 'hf-hub' and cfg.get('state_dict') is not None:
        return 'the state_dict in pretrained_cfg'
    if source != 'hf-hub' and file:
        return str(file)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache
        repo_id, _, revision = hub_id.partition('@')
        names = [cfg['hf_hub_filename']] if cfg.get('hf_hub_filename') else _WEIGHT_FILES
        for name in names:
            cached = try_to_load_from_cache(repo_id, name, revision=revision or None)
            if isinstance(cached, str):
                return f'hf-hub:{hub_id} ({cached})'
        return f'hf-hub:{hub_id}'
    return str(cfg.get('url') or 'the pretrained weights')


def _r_structure(state_dict: Mapping[str, torch.Tensor], prefix: str) -> str:
    """The R structure a DBP state dict holds for the layer `prefix` (read from the shapes, as fold_state_dict does)."""
    R, weight = state_dict[prefix + 'decor_matrix'], state_dict.get(prefix + 'weight')
    if prefix + 'decor_spatial' in state_dict:
        structure = 'kron'
    else:
        structure = 'full' if weight is None or factor_size(R) == weight[0].numel() else 'channel'
    return structure if R.dim() == 2 else f'{structure}, block-diagonal ({R.shape[0]} blocks of {R.shape[-1]})'


_R_BUFFERS = ('.decor_matrix', '.decor_spatial')


def _size_options(model: nn.Module, names: Sequence[str]) -> str:
    """The model's size limits `names` (`decorrelate()` arguments) as model kwargs (None as UNLIMITED)."""
    dbp_args = getattr(model, 'dbp_args', {})
    return ', '.join(f'{DBP_MODEL_KWARGS[name][0]}={dbp_args.get(name) or UNLIMITED!r}' for name in names)


def r_shape_hint(state_dict: Mapping[str, torch.Tensor], key: str, model: nn.Module) -> str:
    """For a `key` whose shape differs between `state_dict` and `model`: when it is an R buffer, a hint naming the
    R the weights hold and the dbp_structure / dbp_kron_max_dim / dbp_block_size the model was built with; '' for any
    other key."""
    if not key.endswith(_R_BUFFERS):
        return ''
    structure = getattr(model, 'dbp_args', {}).get('structure')
    return (f' (the weights have a {_r_structure(state_dict, key.rsplit(".", 1)[0] + ".")} R, the model '
            f'dbp_structure={structure!r}, {_size_options(model, ("kron_max_dim", "block_size"))}: build it with the '
            f'dbp_ options the weights were trained with, 0 for no limit; dbp_block_size=0 for dense R\'s)')


def r_mismatch_hint(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> str:
    """Why DBP weights do not load into `model`, when R is the reason: the first R buffer of another shape
    (`r_shape_hint`), R buffers of layers the model keeps plain (dbp_max_dim / dbp_exclude), or a kron R's spatial
    factor where the model has a channel R (dbp_kron_max_dim); '' otherwise."""
    target = model.state_dict()
    for key, value in state_dict.items():
        if key in target and value.shape != target[key].shape:
            return r_shape_hint(state_dict, key, model)
    extra = [k.rsplit('.', 1)[0] for k in state_dict if k.endswith(_R_BUFFERS) and k not in target]
    plain = sorted({name for name in extra if f'{name}.decor_matrix' not in target})
    if not plain:
        return r_shape_hint(state_dict, f'{extra[0]}.decor_spatial', model) if extra else ''
    exclude = list(getattr(model, 'dbp_args', {}).get('exclude', ()))
    return (f' (the weights have R in {len(plain)} layer(s) the model keeps plain, e.g. {plain[0]}; the model '
            f'{_size_options(model, ("max_dim",))}, dbp_exclude={exclude!r}: build it with the dbp_ options the '
            f'weights were trained with; dbp_max_dim=0 keeps no layer plain by size)')


def _names(value) -> Sequence[str]:
    return [value] if isinstance(value, str) else list(value or ())


def fold_adapted_input_convs(
        state_dict: Dict[str, torch.Tensor], model: nn.Module, cfg: Mapping[str, Any],
) -> Dict[str, torch.Tensor]:
    """A DBP input conv whose channels timm is about to adapt (in_chans differs): fold its R into W first (W R is what
    the layer applies), so timm adapts W R and the layer restarts from R = I."""
    for name in _names(cfg.get('first_conv')):
        prefix = name + '.'
        weight = state_dict.get(prefix + 'weight')
        if weight is None or weight.ndim != 4 or prefix + 'decor_matrix' not in state_dict:
            continue
        try:
            in_channels = model.get_submodule(name).weight.shape[1]
        except AttributeError:
            continue
        if weight.shape[1] != in_channels:
            state_dict[prefix + 'weight'] = fused_weight(
                weight, state_dict.pop(prefix + 'decor_matrix'), state_dict.pop(prefix + 'decor_spatial', None))
    return state_dict


def check_pretrained_fits(state_dict: Mapping[str, torch.Tensor], model: nn.Module, cfg: Mapping[str, Any]) -> None:
    """Raise PretrainedWeightsError, naming the weights file and the first wrong key, unless `state_dict` loads into
    `model` the way timm's load_pretrained loads it (classifier dropped when num_classes differs, input conv
    adapted when in_chans differs)."""
    target = model.state_dict()
    skip = {f'{name}.weight' for name in _names(cfg.get('first_conv'))}
    for name in _names(cfg.get('classifier')):
        if cfg.get('num_classes') is not None and getattr(model, 'num_classes', None) != cfg['num_classes']:
            skip |= {k for k in [*state_dict, *target] if k.startswith(name + '.')}
    where = f'{pretrained_source(cfg)} does not fit {cfg.get("architecture") or type(model).__name__}'
    for key, value in state_dict.items():
        if key in skip or key not in target or value.shape == target[key].shape:
            continue
        raise PretrainedWeightsError(f'{where}: {key} is {tuple(value.shape)} in the weights but '
                                     f'{tuple(target[key].shape)} in the model{r_shape_hint(state_dict, key, model)}')
    unexpected = [k for k in state_dict if k not in target and k not in skip]
    missing = [k for k in target if k not in state_dict and k not in skip]
    if unexpected or missing:
        parts = [f'{label} key(s) {", ".join(keys[:3])}{", ..." if len(keys) > 3 else ""} ({len(keys)})'
                 for label, keys in (('unexpected', unexpected), ('missing', missing)) if keys]
        hint = r_mismatch_hint(state_dict, model) or ' (weights of another architecture?)'
        raise PretrainedWeightsError(f'{where}: {"; ".join(parts)}{hint}')



def raised_while_loading_pretrained(error: BaseException) -> bool:
    """Whether `error` came out of timm's load_pretrained (reading or loading the weights, not building the model)."""
    return any(frame.f_code.co_name == 'load_pretrained' and frame.f_globals.get('__name__') == 'timm.models._builder'
               for frame, _ in traceback.walk_tb(error.__traceback__))


def build_dbp_model(model_cls: Type[nn.Module], variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's build_model_with_cfg, with unreadable pretrained weights reported as PretrainedWeightsError naming the
    file (timm's own error says neither which file nor which model)."""
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except PretrainedWeightsError:
        raise
    except Exception as e:  # a truncated, corrupt or missing weights file: say which file
        if not pretrained or not raised_while_loading_pretrained(e):
            raise
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        message = f'{type(e).__name__}: {e}'.strip().splitlines()[0]
        raise PretrainedWeightsError(
            f'cannot load pretrained weights for {variant} from {pretrained_source(cfg.to_dict())}: {message}') from e
