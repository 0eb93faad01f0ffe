from .dbp_resnet import *
