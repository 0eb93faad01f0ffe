from ._registry import DBP_BASE_OPTIMIZERS, canonical_optimizer_name, register_dbp_optimizer, _register_dbp_optimizers
from .dbp import DBP_DEFAULTS, NoDecorLayersWarning, dbp_optimizer_of, is_dbp_optimizer, with_dbp

_register_dbp_optimizers()
