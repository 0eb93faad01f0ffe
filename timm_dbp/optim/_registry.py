""" Registration of DBP optimizers in timm's optimizer registry

Every name is a single token, 'dbp' + a timm optimizer name (`dbpsgd`, `dbpadamw`, ...), because timm's
factory splits names on '_' and keeps the last piece: 'dbp_sgd' would otherwise silently build plain SGD.
A guard on the registry's factory rewrites 'dbp_<name>' (and 'lookahead_dbp_<name>') to the registered
spelling, and refuses with an error naming the right spellings when there is none.
"""
import dataclasses
from typing import List, Optional

from timm.optim import OptimInfo
from timm.optim._optim_factory import OptimizerRegistry, default_registry

from .dbp import with_dbp

__all__ = ['DBP_BASE_OPTIMIZERS', 'register_dbp_optimizer', 'canonical_optimizer_name']

# timm optimizers that get a registered DBP twin on import; any other one: register_dbp_optimizer(name)
DBP_BASE_OPTIMIZERS = (
    'sgd', 'momentum', 'sgdw', 'adam', 'adamw', 'nadamw', 'lamb', 'lars', 'lion', 'adopt', 'rmsprop', 'muon')


def register_dbp_optimizer(
        base_name: str,
        name: Optional[str] = None,
        registry: OptimizerRegistry = default_registry,
) -> OptimInfo:
    """Register the DBP twin of timm optimizer `base_name` as `name` (default 'dbp' + base_name).

    The twin keeps the base entry's defaults and has_eps / has_momentum / has_betas flags, and its class is
    `with_dbp(base class)`.

    Examples:
        >>> register_dbp_optimizer('adan')
        >>> opt = timm.optim.create_optimizer_v2(model, opt='dbpadan', lr=1e-3, decor_lr=1e-4)
    """
    name = (name or f'dbp{base_name}').lower()
    if '_' in name:
        raise ValueError(f'optimizer name {name!r} must not contain "_" (timm keeps only the part after the last "_")')
    base = registry.get_optimizer_info(base_name)
    base_class = registry.get_optimizer_class(base, bind_defaults=False)
    info = dataclasses.replace(
        base, name=name, opt_class=with_dbp(base_class), description=f'Decorrelated BP + {base.description}')
    registry.register(info)
    return info


def canonical_optimizer_name(opt: str, registry: OptimizerRegistry = default_registry) -> str:
    """Map 'dbp_sgd' -> 'dbpsgd' and 'lookahead_dbp_adamw' -> 'lookahead_dbpadamw'; other names unchanged.

    Raises:
        ValueError: 'dbp_<x>' where 'dbp<x>' is not registered (never a silent fallback to plain <x>).
    """
    pieces = opt.lower().split('_')
    if 'dbp' not in pieces[:-1]:
        return opt
    i = pieces.index('dbp')
    joined = pieces[:i] + [f'dbp{pieces[i + 1]}'] + pieces[i + 2:]
    dbp_names: List[str] = registry.list_optimizers('dbp*')
    if len(joined) > 2 or joined[-1] not in dbp_names or (len(joined) == 2 and joined[0] != 'lookahead'):
        raise ValueError(
            f'Unknown DBP optimizer {opt!r}. DBP optimizer names are one token without "_", '
            f'one of: {", ".join(dbp_names)} (or lookahead_<name>); '
            f'register another with timm_dbp.optim.register_dbp_optimizer(base_name).')
    return '_'.join(joined)


def _install_spelling_guard(registry: OptimizerRegistry) -> None:
    """Route the registry's factory through `canonical_optimizer_name` (once per registry)."""
    if getattr(registry.create_optimizer, 'dbp_spelling_guard', False):
        return
    create_optimizer = registry.create_optimizer

    def guarded_create_optimizer(model_or_params, opt: str, *args, **kwargs):
        return create_optimizer(model_or_params, canonical_optimizer_name(opt, registry), *args, **kwargs)

    guarded_create_optimizer.dbp_spelling_guard = True
    guarded_create_optimizer.__doc__ = create_optimizer.__doc__
    registry.create_optimizer = guarded_create_optimizer


def _register_dbp_optimizers(registry: OptimizerRegistry = default_registry) -> None:
    for base_name in DBP_BASE_OPTIMIZERS:
        register_dbp_optimizer(base_name, registry=registry)
    _install_spelling_guard(registry)
