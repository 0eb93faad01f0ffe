from ._pretrained import PretrainedWeightsError, r_mismatch_hint, r_shape_hint
from ._dbp_kwargs import DBP_MODEL_KWARGS, SIZE_LIMIT_ARGS, UNLIMITED, dbp_model_kwargs, pop_dbp_args
from ._twin import BASIC_RESNET_TWIN_ARGS, WIDE_TWIN_ARGS, DBPModel, build_dbp_twin, dbp_checkpoint_filter
from .dbp_convnext import *
from .dbp_efficientnet import *
from .dbp_mobilenetv3 import *
from .dbp_regnet import *
from .dbp_resnet import *
from .dbp_vision_transformer import *
