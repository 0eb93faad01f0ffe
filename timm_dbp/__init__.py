""" timm-dbp: Decorrelated Backpropagation (arXiv 2405.02385) for timm models

`import timm_dbp` registers the dbp_ models with timm's model registry and the dbp optimizers
(dbpsgd, dbpadamw, ...) with timm's optimizer registry.
"""
from .analytic import RecursiveLeastSquares, fit_analytic_head
from .layers import (
    DecorConv2d, DecorLinear, decor_layers, decorrelate, fill_decor_matrices, fold, fold_state_dict, sketch_convs,
    sketched_layers)
from .models import *
from .optim import DBP_DEFAULTS, NoDecorLayersWarning, is_dbp_optimizer, register_dbp_optimizer, with_dbp

__version__ = '0.1.0'
