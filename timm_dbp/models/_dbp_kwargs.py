""" A dbp_ model's own kwargs: the `decorrelate()` arguments it is built with, as model kwargs and back """
from typing import Any, Dict, Tuple

from timm_dbp.layers import DEFAULT_STRUCTURE, exclude_patterns

__all__ = ['DBP_MODEL_KWARGS', 'SIZE_LIMIT_ARGS', 'UNLIMITED', 'pop_dbp_args', 'dbp_model_kwargs']

# a dbp_ model's own kwargs: decorrelate() argument -> (model kwarg, default)
DBP_MODEL_KWARGS: Dict[str, Tuple[str, Any]] = {
    'exclude': ('dbp_exclude', ()),  # fnmatch patterns of module names kept plain (see `exclude_patterns`)
    'max_dim': ('dbp_max_dim', None),  # keep layers with input dimension d above it plain; 0: none
    'linear': ('dbp_linear', True),  # decorrelate Linear layers too
    'structure': ('dbp_structure', DEFAULT_STRUCTURE),  # R of the convs: 'full', 'channel', 'kron'
    'kron_max_dim': ('dbp_kron_max_dim', None),  # kron convs with d above it take a channel R; 0: none
    'block_size': ('dbp_block_size', None),  # R's over channels wider than it block-diagonal; 0: dense
}
# "no limit" as a model kwarg (dense R's, no layer kept plain by its size, kron R at every size): timm's create_model
# drops None-valued kwargs, so None cannot undo a model's default
UNLIMITED = 0
SIZE_LIMIT_ARGS = ('max_dim', 'kron_max_dim', 'block_size')  # decorrelate() arguments, None = UNLIMITED as a kwarg


def pop_dbp_args(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Take a dbp_ model's own arguments (DBP_MODEL_KWARGS) out of `kwargs`, as `decorrelate()` arguments."""
    args = {name: kwargs.pop(kwarg, default) for name, (kwarg, default) in DBP_MODEL_KWARGS.items()}
    args['exclude'] = exclude_patterns(args['exclude'])
    for name in SIZE_LIMIT_ARGS:
        if type(args[name]) is int and args[name] == UNLIMITED:
            args[name] = None
    return args


def dbp_model_kwargs(dbp_args: Dict[str, Any]) -> Dict[str, Any]:
    """The dbp_ model kwargs that build a model with these `decorrelate()` arguments again (the inverse of
    `pop_dbp_args`), every one of them, defaults included (no limit as 0, e.g. dense R's as dbp_block_size=0): R's
    shapes must not depend on the defaults of the day (the library's or a model entrypoint's)."""
    kwargs = {kwarg: list(dbp_args[name]) if isinstance(dbp_args[name], tuple) else dbp_args[name]
              for name, (kwarg, _) in DBP_MODEL_KWARGS.items()}
    for name in SIZE_LIMIT_ARGS:
        kwarg = DBP_MODEL_KWARGS[name][0]
        if kwargs[kwarg] is None:
            kwargs[kwarg] = UNLIMITED
    return kwargs
