from ._pretrained import PretrainedWeightsError
from .dbp_resnet import *
