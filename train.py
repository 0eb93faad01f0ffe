#!/usr/bin/env python3
""" timm-dbp training script: timm's ImageNet recipe and flags, for DBP and plain models

Built from timm's library pieces (timm.data, timm.loss, timm.optim, timm.scheduler, timm.utils) with timm's flag
names, defaults and YAML configs (`-c/--config`), so a timm command carries over by changing `--model` and `--opt`:

    python train.py --data-dir /imagenet --model dbp_resnet18 --opt dbpsgd --lr 0.5 -b 256 --epochs 90 \
        --opt-kwargs decor_lr=3e-3 kappa=0.0
    python train.py --dataset fashion_mnist --model dbp_test_resnet --opt dbpsgd --img-size 32 --epochs 2

One process or many: `torchrun --nproc_per_node=N train.py ...` (CPU: gloo, CUDA: nccl). Under DDP every rank
applies the same R update (the DBP samples are all-gathered) and R is excluded from DDP's buffer broadcast.

Checkpoints (`last.pth.tar`, best `model_best.pth.tar`, `--checkpoint-hist` top ones) are written atomically and
hold everything for an exact resume, the dbp_ model kwargs the model was built with included (a resume builds the
same R's under any later default); `--resume auto` continues the experiment's last checkpoint in place.
`summary.csv` has timm's columns plus the DBP ones and the cumulative training wall-clock (`train_time`).
With codecarbon installed (`pip install timm-dbp[energy]`) it also has the cumulative energy and emissions of the
training epochs (`train_energy_kwh`, `train_co2_kg`; `--energy-country`, `--no-energy`).

`--analytic-head` refits the classifier after training by least squares over the pooled features of the training
images (eval transforms, no augmentation), `--analytic-head-only` does that on the backbone as built or loaded
without any gradient training; both log the accuracy before and after and write `analytic_head.json` and
`analytic_head.pth.tar` (timm_dbp.fit_analytic_head).

`--decoupled K` trains the model as a pipeline of K stages, one per process (torchrun --nproc_per_node=K), on
delayed gradients (timm_dbp.pipeline: FDG, and ADL with --grad-accum-steps M): `--decoupled-delay 0` is locked
backpropagation (bit-identical to one process with --opt-kwargs decor_batch=False), 1 (default) lets every stage
work all the time.

`--sketch-probes R` trains every conv with trace-estimated kernel gradients from R random probe vectors (XConv,
timm_dbp.sketch_convs): exact forward and input gradients, an unbiased estimate of each conv's weight gradient, and
much less activation memory (the ReLUs keep bool masks). Combinable with DBP models and optimizers.
"""
import argparse
import difflib
import importlib
import inspect
import json
import logging
import os
import sys
import time
import warnings
from contextlib import nullcontext
from datetime import datetime
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import yaml
from torch.nn.parallel import DistributedDataParallel

import timm
from timm import utils
from timm.data import (
    FastCollateMixup, Mixup, create_dataset, create_loader, resolve_data_config,
)
from timm.layers import convert_sync_batchnorm, set_fast_norm
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import unwrap_model

import timm_dbp
from timm_dbp.analytic import analytic_classifier
from timm_dbp.models import dbp_model_kwargs, pop_dbp_args, r_mismatch_hint
from timm_dbp.data import FASHION_MNIST_DIR, FashionMNIST
from timm_dbp.layers import MATMUL_DTYPE_NAMES
from timm_dbp.optim import NoDecorLayersWarning, dbp_optimizer_of
from timm_dbp.pipeline import DecoupledTrainer, split_model
from timm_dbp.utils.checkpoint import (
    CheckpointError, append_summary, copy_atomic, load_checkpoint_file, rng_state, save_atomic, set_rng_state,
)
from timm_dbp.utils.energy import NOT_MEASURED, EnergyMeter, check_country_code, codecarbon_available

_logger = logging.getLogger('train')

# The first parser reads only --config; the YAML file's values become the main parser's defaults.
def _kappa(value: str):
    """--kappa: a number, or 'auto'."""
    return value if value == 'auto' else float(value)


def _positive_int(value: str) -> int:
    """--sketch-probes, --decoupled: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f'must be an integer >= 1, got {value}')
    return number


def _non_negative_int(value: str) -> int:
    """--decoupled-delay, --decor-warmup: an integer >= 0."""
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f'must be an integer >= 0, got {value}')
    return number


def _positive(value: str) -> float:
    """--decor-warmup-lr: a finite number > 0."""
    number = float(value)
    if not 0 < number < float('inf'):
        raise argparse.ArgumentTypeError(f'must be a finite number > 0, got {value}')
    return number


def _non_negative(value: str) -> float:
    """--analytic-ridge: a number >= 0."""
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {value}')
    return number


config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file specifying default arguments')

parser = argparse.ArgumentParser(description='timm-dbp training (timm flags)')

# Dataset parameters
group = parser.add_argument_group('Dataset parameters')
parser.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (positional is *deprecated*, use --data-dir)')
group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
group.add_argument('--dataset', metavar='NAME', default='',
                   help='dataset type + name ("<type>/<name>"); "" = ImageFolder / ImageTar; '
                        '"fashion_mnist" = local IDX files (default dir: ' + FASHION_MNIST_DIR + ')')
group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
group.add_argument('--val-split', metavar='NAME', default='validation', help='dataset validation split')
group.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                   help='use only N training samples (fashion_mnist: the first N)')
group.add_argument('--val-num-samples', default=None, type=int, metavar='N', help='use only N validation samples')
group.add_argument('--dataset-download', action='store_true', default=False,
                   help='Allow download of dataset for torch/ and tfds/ datasets that support it.')
group.add_argument('--class-map', default='', type=str, metavar='FILENAME', help='path to class to idx mapping file')
group.add_argument('--input-img-mode', default=None, type=str, help='Dataset image conversion mode for input images.')

# Model parameters
group = parser.add_argument_group('Model parameters')
group.add_argument('--model', default='resnet50', type=str, metavar='MODEL', help='Name of model to train')
group.add_argument('--pretrained', action='store_true', default=False, help='Start with pretrained weights')
group.add_argument('--pretrained-path', default=None, type=str, help='Load this checkpoint as the pretrained weights')
group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH', help='Load this checkpoint into model')
group.add_argument('--resume', default='', type=str, metavar='PATH',
                   help='Resume full model and optimizer state from checkpoint; "auto" = the experiment\'s last.pth.tar')
group.add_argument('--no-resume-opt', action='store_true', default=False, help='do not resume the optimizer state')
group.add_argument('--num-classes', type=int, default=None, metavar='N', help='number of label classes')
group.add_argument('--gp', default=None, type=str, metavar='POOL', help='Global pool type (model default if None)')
group.add_argument('--img-size', type=int, default=None, metavar='N', help='Image size (default: model default)')
group.add_argument('--in-chans', type=int, default=None, metavar='N', help='Image input channels')
group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N',
                   help='Input all image dimensions (d h w, e.g. --input-size 3 224 224)')
group.add_argument('--crop-pct', default=None, type=float, metavar='N', help='Input image center crop percent (eval)')
group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='Override mean pixel value')
group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='Override std deviation')
group.add_argument('--interpolation', default='', type=str, metavar='NAME', help='Image resize interpolation type')
group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='Input batch size for training')
group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N', help='Validation batch size')
group.add_argument('--channels-last', action='store_true', default=False, help='Use channels_last memory layout')
group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N', help='Accumulate gradients over N steps')
group.add_argument('--grad-checkpointing', action='store_true', default=False, help='Enable gradient checkpointing')
group.add_argument('--fast-norm', default=False, action='store_true', help='enable experimental fast-norm')
group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs)
group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='Enable compilation w/ specified backend (default: inductor).')
group.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode (default: None).')

# Device & distributed
group = parser.add_argument_group('Device parameters')
group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str,
                   help='Device (accelerator) to use.')
group.add_argument('--amp', action='store_true', default=False, help='use mixed precision (torch.autocast)')
group.add_argument('--amp-dtype', default='float16', type=str, choices=('float16', 'bfloat16'),
                   help='lower precision AMP dtype (default: float16)')
group.add_argument('--no-ddp-bb', action='store_true', default=False, help='Force broadcast buffers for DDP to False.')
group.add_argument('--local_rank', default=0, type=int)
group.add_argument('--device-modules', default=None, type=str, nargs='+',
                   help='Python imports for device backend modules (timm_dbp is always imported).')

# Optimizer parameters
group = parser.add_argument_group('Optimizer parameters')
group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='Optimizer (default: "sgd")')
group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='Optimizer Epsilon')
group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='Optimizer Betas')
group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='Optimizer momentum (default: 0.9)')
group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='Clip gradient norm')
group.add_argument('--clip-mode', type=str, default='norm', choices=('norm', 'value', 'agc'), help='clipping mode')
group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')
group.add_argument('--opt-kwargs', dest='opt_args', nargs='*', default={}, action=utils.ParseKwargs,
                   help='optimizer kwargs, e.g. --opt-kwargs decor_lr=3e-3 kappa=0.5')

# DBP parameters (shortcuts for the DBP optimizer kwargs; --opt-kwargs works as well)
group = parser.add_argument_group('DBP parameters')
group.add_argument('--decor-lr', type=float, default=None, help='DBP learning rate of R (optimizer default if None)')
group.add_argument('--kappa', type=_kappa, default=None,
                   help="0 = decorrelate, 1 = normalise variances, 'auto' = chosen per layer from the measured errors")
group.add_argument('--decor-samples', type=int, default=None, help='inputs sampled per layer per R update')
group.add_argument('--decor-interval', type=int, default=None, help='update R every k optimizer steps')
group.add_argument('--decor-vectors-per-patch', type=int, default=None,
                   help='kron R: vectors per factor drawn from each sampled patch (decor_samples / this many patches)')
group.add_argument('--decor-max-step', type=float, default=None,
                   help='step cap of the R update: decor_lr * |lambda|_max <= this (inf = no cap)')
group.add_argument('--decor-matmul-dtype', default=None, choices=MATMUL_DTYPE_NAMES,
                   help='operand dtype of the R update\'s matrix products (bfloat16: faster where the hardware has '
                        'it; auto: bfloat16 there, float32 elsewhere)')
group.add_argument('--decor-warmup', type=_non_negative_int, default=0, metavar='N',
                   help='before the first epoch of a fresh run, learn R from N training batches (forward only, one '
                        'R update each at --decor-warmup-lr; weights untouched; timed as training; default 0 = off)')
group.add_argument('--decor-warmup-lr', type=_positive, default=0.5, metavar='LR',
                   help='learning rate of R in the --decor-warmup updates (each kept <= decor_max_step; default 0.5)')
group.add_argument('--decor-epochs', type=_positive, default=None, metavar='E',
                   help='R learns in the first E epochs only (may be fractional), then stays fixed: no sampling and '
                        'no R update after that, the step costs BP plus the fusion W R (default: every epoch)')

# Low-memory conv gradients (XConv: multi-channel randomized trace estimation, timm_dbp.sketch_convs)
group = parser.add_argument_group('Low-memory gradient parameters')
group.add_argument('--sketch-probes', type=_positive_int, default=None, metavar='R',
                   help='trace-estimate every conv kernel gradient from R probe vectors (XConv; default: exact)')

# Learning rate schedule parameters
group = parser.add_argument_group('Learning rate schedule parameters')
group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='LR scheduler (default: "cosine")')
group.add_argument('--sched-on-updates', action='store_true', default=False, help='Apply LR scheduler step on update')
group.add_argument('--lr', type=float, default=None, metavar='LR', help='learning rate, overrides lr-base if set')
group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                   help='base learning rate: lr = lr_base * global_batch_size / base_size')
group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV', help='base learning rate batch size')
group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE', help='"sqrt" or "linear" (default by opt)')
group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct', help='lr noise on/off pcts')
group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT', help='learning rate noise limit pct')
group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV', help='learning rate noise std-dev')
group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT', help='learning rate cycle len multiplier')
group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT', help='decay each learning rate cycle')
group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N', help='learning rate cycle limit')
group.add_argument('--lr-k-decay', type=float, default=1.0, help='learning rate k-decay for cosine/poly')
group.add_argument('--lr-decay-fn', type=str, default=None, help='decay function for wsd (default: cosine)')
group.add_argument('--lr-stable-timescale', type=float, default=None, help='wsd stable phase length (fraction)')
group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup learning rate')
group.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lower lr bound for cyclic schedulers')
group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs to train (default: 300)')
group.add_argument('--epoch-repeats', type=float, default=0., metavar='N', help='epoch repeat multiplier')
group.add_argument('--start-epoch', default=None, type=int, metavar='N', help='manual epoch number')
group.add_argument('--stop-after-epoch', type=_positive_int, default=None, metavar='N',
                   help='stop once the first N epochs of the --epochs schedule are done (checkpoint written; the same '
                        'command with --resume auto continues it exactly): a schedule trained in chunks')
group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar="MILESTONES",
                   help='list of decay epoch indices for multistep lr')
group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
group.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='epochs to warmup LR')
group.add_argument('--warmup-prefix', action='store_true', default=False, help='Exclude warmup from decay schedule')
group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs to cooldown LR at min_lr')
group.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='patience for Plateau LR scheduler')
group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate')

# Augmentation & regularization parameters
group = parser.add_argument_group('Augmentation and regularization parameters')
group.add_argument('--no-aug', action='store_true', default=False, help='Disable all training augmentation')
group.add_argument('--train-crop-mode', type=str, default=None, help='Crop-mode in train')
group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT', help='Random resize scale')
group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO', help='aspect ratio')
group.add_argument('--hflip', type=float, default=0.5, help='Horizontal flip training aug probability')
group.add_argument('--vflip', type=float, default=0., help='Vertical flip training aug probability')
group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='Color jitter factor')
group.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT', help='Color jitter probability')
group.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT', help='random grayscale probability')
group.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT', help='gaussian blur probability')
group.add_argument('--aa', type=str, default=None, metavar='NAME', help='AutoAugment policy, e.g. "rand-m9-mstd0.5"')
group.add_argument('--aug-repeats', type=float, default=0, help='Number of augmentation repetitions (distributed)')
group.add_argument('--bce-loss', action='store_true', default=False, help='Enable BCE loss w/ Mixup/CutMix use.')
group.add_argument('--bce-sum', action='store_true', default=False, help='Sum over classes when using BCE loss.')
group.add_argument('--bce-target-thresh', type=float, default=None, help='Threshold for binarizing BCE targets')
group.add_argument('--bce-pos-weight', type=float, default=None, help='Positive weighting for BCE loss.')
group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='Random erase prob')
group.add_argument('--remode', type=str, default='pixel', help='Random erase mode')
group.add_argument('--recount', type=int, default=1, help='Random erase count')
group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0.')
group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0.')
group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix min/max ratio')
group.add_argument('--mixup-prob', type=float, default=1.0, help='Probability of performing mixup or cutmix')
group.add_argument('--mixup-switch-prob', type=float, default=0.5, help='Probability of switching to cutmix')
group.add_argument('--mixup-mode', type=str, default='batch', help='How to apply mixup/cutmix: batch, pair, elem')
group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N', help='Turn off mixup after this epoch')
group.add_argument('--smoothing', type=float, default=0.1, help='Label smoothing (default: 0.1)')
group.add_argument('--train-interpolation', type=str, default='random', help='Training interpolation')
group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='Dropout rate (default: 0.)')
group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='Drop path rate')
group.add_argument('--drop-block', type=float, default=None, metavar='PCT', help='Drop block rate')

# Batch norm parameters
group = parser.add_argument_group('Batch norm parameters')
group.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum override (if not None)')
group.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon override (if not None)')
group.add_argument('--sync-bn', action='store_true', help='Enable synchronized BatchNorm.')
group.add_argument('--dist-bn', type=str, default='reduce', choices=('broadcast', 'reduce', ''),
                   help='Distribute BatchNorm stats between nodes after each epoch')

# Model Exponential Moving Average
group = parser.add_argument_group('Model exponential moving average parameters')
group.add_argument('--model-ema', action='store_true', default=False, help='Enable tracking moving average of weights')
group.add_argument('--model-ema-force-cpu', action='store_true', default=False, help='Keep the EMA on CPU')
group.add_argument('--model-ema-decay', type=float, default=0.9998, help='Decay factor for model weights moving average')
group.add_argument('--model-ema-warmup', action='store_true', help='Enable warmup for model EMA decay.')

# Analytic head (least-squares classifier over the pooled features, timm_dbp.fit_analytic_head)
group = parser.add_argument_group('Analytic head parameters')
group.add_argument('--analytic-head', action='store_true', default=False,
                   help='after training, refit the classifier by least squares over the training images\' features; '
                        'logs accuracy before / after, writes analytic_head.json and analytic_head.pth.tar')
group.add_argument('--analytic-head-only', action='store_true', default=False,
                   help='no gradient training: fit the classifier alone on the backbone as built / loaded')
group.add_argument('--analytic-ridge', type=_non_negative, default=1e-3, metavar='RIDGE',
                   help='L2 penalty on the analytic head\'s weight (default: 1e-3; 0 = minimum-norm least squares)')

# Decoupled pipeline training (timm_dbp.pipeline)
group = parser.add_argument_group('Decoupled pipeline parameters (FDG / ADL)')
group.add_argument('--decoupled', type=_positive_int, default=None, metavar='K',
                   help='split the model at its stages into K pipeline modules, one per process (torchrun '
                        '--nproc_per_node=K), trained on delayed gradients; ADL accumulation: --grad-accum-steps')
group.add_argument('--decoupled-delay', type=_non_negative_int, default=1, metavar='D',
                   help='ticks per hop between neighbouring stages (0: locked backprop, 1: FDG; default: 1)')
group.add_argument('--decoupled-shrink', type=float, default=1.0, metavar='BETA',
                   help='FDG gradient shrinking: delayed stages scale the gradient they receive (default: 1 = none)')
group.add_argument('--decoupled-cuts', nargs='+', default=None, metavar='STAGE',
                   help='cut after these stage modules (K - 1 names, e.g. layer3 for a ResNet; default: the cuts '
                        'that balance the stages\' forward + backward time, measured on rank 0)')

# Misc
group = parser.add_argument_group('Miscellaneous parameters')
group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
group.add_argument('--worker-seeding', type=str, default='all', help='worker seed mode (default: all)')
group.add_argument('--log-interval', type=int, default=50, metavar='N', help='batches between status logs')
group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N', help='number of best checkpoints to keep')
group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='how many data loading workers')
group.add_argument('--pin-mem', action='store_true', default=False, help='Pin CPU memory in DataLoader')
group.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
group.add_argument('--output', default='', type=str, metavar='PATH', help='path to output folder (default: ./output)')
group.add_argument('--experiment', default='', type=str, metavar='NAME', help='name of train experiment')
group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC', help='Best metric')
group.add_argument('--val-interval', type=int, default=1, metavar='N', help='validate every N epochs (and the last)')
group.add_argument('--use-multi-epochs-loader', action='store_true', default=False, help='use the multi-epochs-loader')
group.add_argument('--energy-country', default=None, type=str, metavar='ISO3',
                   help='country of the machine\'s power grid for the CO2 figure, ISO 3166-1 alpha-3 '
                        '(default: $TIMM_DBP_ENERGY_COUNTRY, else USA)')
group.add_argument('--no-energy', action='store_true', default=False,
                   help='do not measure energy / CO2 (measured by default when codecarbon is installed)')


class UserError(Exception):
    """Bad input: reported as one line and exit code 2, without a traceback."""


def _yaml_value_ok(action: argparse.Action, value) -> bool:
    """Would argparse accept `value` (from YAML) for `action`: its type, choices and number of values?"""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return isinstance(value, bool)
    if isinstance(value, dict):
        return isinstance(action, utils.ParseKwargs)
    many = action.nargs not in (None, '?')
    if isinstance(value, (list, tuple)) != many and value is not None:
        return False
    for v in (value if many and value is not None else [value]):
        if v is None:
            continue
        if action.type in (int, float) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return False
        if action.type is int and isinstance(v, float) and not v.is_integer():
            return False
        if action.type is str and not isinstance(v, str):
            return False
        if action.choices is not None and v not in action.choices:
            return False
    return True


def _parse_args(argv=None):
    """Parse the YAML config (if any) into defaults, warn on unknown keys, refuse invalid values, then the CLI. The
    config's defaults hold for this call only: `run()` called again in the same process starts from train.py's own."""
    args_config, remaining = config_parser.parse_known_args(argv)
    own_defaults = {}
    if args_config.config:
        try:
            with open(args_config.config, 'r') as f:
                cfg = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            parser.error(f'cannot read config {args_config.config}: {e}')
        if not isinstance(cfg, dict):
            parser.error(f'config {args_config.config} must be a mapping of flag names to values')
        actions = {a.dest: a for a in parser._actions}
        known = {}
        for key, value in cfg.items():
            dest = key.replace('-', '_')
            dest = 'opt_args' if dest == 'opt_kwargs' else dest
            if dest not in actions:
                warnings.warn(f'config {args_config.config}: unknown key {key!r} ignored')
                continue
            if not _yaml_value_ok(actions[dest], value):
                parser.error(f'config {args_config.config}: invalid value {value!r} for {key!r}')
            known[dest] = value
        own_defaults = {dest: parser.get_default(dest) for dest in known}
        parser.set_defaults(**known)
    try:
        args = parser.parse_args(remaining)
    finally:
        parser.set_defaults(**own_defaults)
    if args.data and not args.data_dir:
        args.data_dir = args.data
    if args.energy_country is None:  # resolved here so that args.yaml records the country used
        args.energy_country = os.environ.get('TIMM_DBP_ENERGY_COUNTRY') or 'USA'
    return args, _args_yaml(args)


def _args_yaml(args) -> str:
    """The text of a run's args.yaml (loadable again with -c)."""
    return yaml.safe_dump(args.__dict__, default_flow_style=False)


def _check_args(args) -> None:
    if args.grad_accum_steps < 1:
        raise UserError(f'--grad-accum-steps must be >= 1, got {args.grad_accum_steps}')
    if args.batch_size < 1:
        raise UserError(f'-b/--batch-size must be >= 1, got {args.batch_size}')
    if args.epochs < 1:
        raise UserError(f'--epochs must be >= 1, got {args.epochs}')
    if args.val_interval < 1:
        raise UserError(f'--val-interval must be >= 1, got {args.val_interval}')
    if not args.no_energy:
        try:
            check_country_code(args.energy_country)
        except ValueError as e:
            raise UserError(f'--energy-country: {e}') from None
    check_model_name(args.model)
    if args.decoupled is not None:
        _check_decoupled_args(args)


def _check_decoupled_args(args) -> None:
    """What --decoupled does not combine with, refused up front rather than ignored."""
    if not 0 < args.decoupled_shrink <= 1:
        raise UserError(f'--decoupled-shrink must be in (0, 1], got {args.decoupled_shrink}')
    if args.decoupled_shrink != 1 and args.decoupled_delay == 0:
        raise UserError('--decoupled-shrink scales delayed gradients: it needs --decoupled-delay >= 1')
    refused = dict(
        model_ema='--model-ema', clip_grad='--clip-grad (gradient norms would be per stage)',
        layer_decay='--layer-decay', sync_bn='--sync-bn', torchcompile='--torchcompile',
        analytic_head='--analytic-head', analytic_head_only='--analytic-head-only', sketch_probes='--sketch-probes',
        aug_repeats='--aug-repeats', decor_warmup='--decor-warmup')
    for name, flag in refused.items():
        if getattr(args, name) not in (None, False, 0, 0.0):
            raise UserError(f'--decoupled does not support {flag} yet')
    if args.amp and args.amp_dtype == 'float16':
        raise UserError('--decoupled with --amp needs --amp-dtype bfloat16 (a float16 loss scale would have to be '
                        'agreed between the stages)')


def check_model_name(name: str) -> None:
    """A registered model, or an hf-hub: / local-dir: one; otherwise an error naming it with close matches."""
    if name.startswith(('hf-hub:', 'hf_hub:', 'local-dir:')):
        return
    registered = timm.list_models()
    if name not in registered:
        close = difflib.get_close_matches(name, registered, n=3, cutoff=0.6)
        hint = f' Did you mean: {", ".join(close)}?' if close else ''
        raise UserError(f'unknown model {name!r}.{hint} DBP models: {", ".join(timm.list_models("dbp_*"))}')


# --decor-lr, --kappa, ...: None = the optimizer's default
DBP_SHORTCUTS = ('decor_lr', 'kappa', 'decor_samples', 'decor_interval', 'decor_max_step', 'decor_vectors_per_patch',
                 'decor_matmul_dtype')


def _optimizer_kwargs(args) -> dict:
    """timm's optimizer kwargs (incl. --opt-kwargs), with the --decor-* / --kappa shortcuts on top."""
    kwargs = optimizer_kwargs(cfg=args)
    for name in DBP_SHORTCUTS:
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def _is_fashion_mnist(args) -> bool:
    return args.dataset.lower() in ('fashion_mnist', 'fashion-mnist', 'fmnist')


def apply_dataset_defaults(args) -> None:
    """Channels from --input-size; for Fashion-MNIST 1 channel, 10 classes and its mean / std unless given."""
    if args.in_chans is None and getattr(args, 'input_size', None):
        args.in_chans = args.input_size[0]
    if not _is_fashion_mnist(args):
        return
    args.in_chans = args.in_chans or 1
    if args.num_classes is None:
        args.num_classes = 10
    if args.mean is None:
        args.mean, args.std = (0.2860,) * args.in_chans, (0.3530,) * args.in_chans


def build_dataset(args, split: str, is_training: bool, num_samples):
    if _is_fashion_mnist(args):
        return FashionMNIST(args.data_dir or FASHION_MNIST_DIR, split=split, num_samples=num_samples)
    if not args.data_dir and not args.dataset:
        raise UserError('no data: give --data-dir DIR (ImageFolder with train/ and validation/) or --dataset NAME')
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise UserError(f'data dir not found: {args.data_dir}')
    try:
        dataset = create_dataset(
            args.dataset, root=args.data_dir, split=split, is_training=is_training, class_map=args.class_map,
            download=args.dataset_download, batch_size=args.batch_size, seed=args.seed, repeats=args.epoch_repeats,
            num_samples=num_samples, **({'input_img_mode': args.input_img_mode} if args.input_img_mode else {}),
        )
    except (FileNotFoundError, RuntimeError, AssertionError) as e:
        raise UserError(f'cannot load {split} split from {args.data_dir!r}: {e}'.splitlines()[0]) from None
    if len(dataset) == 0:
        raise UserError(f'{split} split in {args.data_dir!r} has no images')
    return dataset


def read_training_checkpoint(path: str) -> Optional[dict]:
    """The train.py (or timm) checkpoint at `path`, or None for any other file (a bare state dict, an unreadable file:
    `load_weights` says why)."""
    try:
        return load_checkpoint_file(path)
    except CheckpointError:
        return None


def load_weights(model: nn.Module, path: str, use_ema: bool = False, checkpoint: Optional[dict] = None) -> None:
    """A training checkpoint (state_dict / state_dict_ema; `checkpoint`: the one at `path`, already read), or a bare
    state dict (plain, folded or DBP)."""
    checkpoint = checkpoint if checkpoint is not None else read_training_checkpoint(path)
    if checkpoint is not None:
        key = 'state_dict_ema' if use_ema else 'state_dict'
        if checkpoint.get(key) is None:
            raise UserError(f'{path} has no {key}')
        state_dict = checkpoint[key]
    else:
        try:
            state_dict = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            raise UserError(f'cannot read checkpoint {path}: {type(e).__name__}: {e}'.splitlines()[0]) from None
        if use_ema:
            raise UserError(f'{path} is a bare state dict: it has no EMA weights')
    if any(True for _ in timm_dbp.decor_layers(model)):
        state_dict = timm_dbp.fill_decor_matrices(state_dict, model)  # a folded / plain checkpoint: R = I
    else:
        state_dict = timm_dbp.fold_state_dict(state_dict)  # a DBP checkpoint into the plain model: W R
    _load_model_state(model, state_dict, path)


def _classifier_shape(state_dict: dict, model: nn.Module):
    classifier = model.pretrained_cfg.get('classifier', 'fc') if hasattr(model, 'pretrained_cfg') else 'fc'
    weight = state_dict.get(f'{classifier}.weight')
    return None if weight is None else tuple(weight.shape)


def pinned_model_kwargs(checkpoint: dict, model_name: str, model_kwargs: dict, source: str) -> dict:
    """`model_kwargs` with the dbp_ model kwargs a train.py checkpoint pinned (`dbp_model_kwargs`: every one, defaults
    included), so its model is built again with the R's it was trained with whatever the model's defaults are now.
    A pinned kwarg given with another value is an error; a checkpoint of another model or without pins adds nothing."""
    pinned = checkpoint.get('dbp_model_kwargs')
    if not pinned or checkpoint.get('arch') != model_name:
        return model_kwargs
    given = {k: v for k, v in model_kwargs.items() if k in pinned}
    try:
        asked = dbp_model_kwargs(pop_dbp_args({**pinned, **given}))  # the form pinned, e.g. dbp_max_dim=None as 0
    except (TypeError, ValueError) as e:
        raise UserError(f'model {model_name!r}: bad argument value: {e}') from None
    differing = [f'{k}={given[k]!r} (it has {pinned[k]!r})' for k in given if asked[k] != pinned[k]]
    if differing:
        raise UserError(f'{source} holds a model built with other dbp_ model kwargs: {", ".join(differing)}; drop '
                        f'them (the checkpoint\'s are used), or start from its folded weights (R = I, any options)')
    return {**model_kwargs, **pinned}  # the pinned form: None (timm drops it) stays the value it names


def _load_model_state(model: nn.Module, state_dict: dict, source: str) -> None:
    """Load a full model state; a classifier of another size or other keys are clear errors."""
    ckpt_shape = _classifier_shape(state_dict, model)
    model_shape = _classifier_shape(model.state_dict(), model)
    if ckpt_shape is not None and model_shape is not None and ckpt_shape[0] != model_shape[0]:
        raise UserError(f'{source} has {ckpt_shape[0]} classes but the model has {model_shape[0]} '
                        f'(--num-classes {model_shape[0]}); use --num-classes {ckpt_shape[0]} or another checkpoint')
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        hint = r_mismatch_hint(state_dict, model)
        lines = str(e).splitlines()
        first = lines[1].strip() if len(lines) > 1 else e
        raise UserError(f'{source} does not fit model: {first}{hint}')


def main(argv=None):
    if not logging.getLogger().handlers:
        utils.setup_default_logging()
    args, args_text = _parse_args(argv)
    for module in args.device_modules or []:
        importlib.import_module(module)
    _check_args(args)

    device = utils.init_distributed_device(args)
    if args.decoupled is not None:
        if args.world_size != args.decoupled:
            raise UserError(f'--decoupled {args.decoupled} runs one pipeline stage per process: start it with torchrun '
                            f'--nproc_per_node={args.decoupled} (this run has {args.world_size} process(es))')
        args.distributed = False  # the ranks hold different stages of one model: no data parallelism
        _logger.info(f'Decoupled pipeline: process {args.rank} of {args.world_size} runs stage {args.rank}, '
                     f'device {args.device}.')
    elif args.distributed:
        _logger.info(f'Distributed: process {args.rank} of {args.world_size}, device {args.device}.')
    else:
        _logger.info(f'Single process on {args.device}.')
    is_main = args.rank == 0

    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext

    utils.random_seed(args.seed, args.rank)
    if args.fast_norm:
        set_fast_norm()

    # Resume: read (and check) the checkpoint before anything is built or written
    exp_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(args.img_size or 'def')])
    output_base = args.output or './output'
    resume_path, checkpoint = args.resume, None
    if resume_path == 'auto':
        if not args.experiment:
            raise UserError('--resume auto needs --experiment NAME (it continues <output>/<experiment>/last.pth.tar)')
        resume_path = os.path.join(output_base, 'train', args.experiment, 'last.pth.tar')
        if not os.path.isfile(resume_path):
            _logger.info(f'--resume auto: no {resume_path} yet, starting fresh')
            resume_path = ''
    if resume_path:
        try:
            checkpoint = load_checkpoint_file(resume_path)
        except CheckpointError as e:
            raise UserError(str(e)) from None

    apply_dataset_defaults(args)
    model_kwargs = dict(args.model_kwargs)
    if args.in_chans is not None:
        model_kwargs['in_chans'] = args.in_chans
    for name, value in (('drop_path_rate', args.drop_path), ('drop_block_rate', args.drop_block),
                        ('global_pool', args.gp), ('bn_momentum', args.bn_momentum), ('bn_eps', args.bn_eps)):
        if value is not None:
            model_kwargs[name] = value
    if checkpoint is not None:
        model_kwargs = pinned_model_kwargs(checkpoint, args.model, model_kwargs, resume_path)
    initial = read_training_checkpoint(args.initial_checkpoint) if args.initial_checkpoint else None
    if checkpoint is None and initial is not None:
        model_kwargs = pinned_model_kwargs(initial, args.model, model_kwargs, args.initial_checkpoint)
    pretrained_cfg_overlay = dict(file=args.pretrained_path) if args.pretrained_path else None
    try:
        model = create_model(
            args.model, pretrained=args.pretrained, num_classes=args.num_classes, drop_rate=args.drop,
            pretrained_cfg_overlay=pretrained_cfg_overlay, **model_kwargs)
    except TypeError as e:
        raise UserError(f'model {args.model!r} does not accept these arguments: {e}') from None
    except ValueError as e:  # a bad value among them (e.g. --model-kwargs dbp_structure=..., dbp_kron_max_dim=-1)
        raise UserError(f'model {args.model!r}: bad argument value: {e}') from None
    # pinned in every checkpoint: a resume rebuilds these R's under any later default (`pinned_model_kwargs`)
    pinned_kwargs = dbp_model_kwargs(model.dbp_args) if hasattr(model, 'dbp_args') else None
    if args.num_classes is None:
        assert hasattr(model, 'num_classes'), 'Model must have `num_classes` attr if not set on cmd line/config.'
        args.num_classes = model.num_classes
    if args.initial_checkpoint:
        load_weights(model, args.initial_checkpoint, checkpoint=initial)
    if args.analytic_head or args.analytic_head_only:
        try:
            analytic_classifier(model)
        except ValueError as e:
            raise UserError(f'--analytic-head: {e}') from None
    if args.sketch_probes is not None:
        try:
            timm_dbp.sketch_convs(model, probes=args.sketch_probes, seed=args.seed)
        except ValueError as e:
            raise UserError(f'--sketch-probes: {e}') from None
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if is_main:
        n_dbp = len(list(timm_dbp.decor_layers(model)))
        n_sketched = len(list(timm_dbp.sketched_layers(model)))
        _logger.info(f'Model {safe_model_name(args.model)} created, param count: '
                     f'{sum(m.numel() for m in model.parameters())}, DBP layers: {n_dbp}'
                     + (f', sketched convs: {n_sketched} ({args.sketch_probes} probes)' if n_sketched else ''))

    data_config = resolve_data_config(vars(args), model=model, verbose=is_main)

    model.to(device=device)
    trainer = _decoupled_trainer(model, data_config, args, device, checkpoint) if args.decoupled is not None else None
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        model = convert_sync_batchnorm(model)

    if args.lr is None:
        data_ranks = 1 if trainer is not None else args.world_size  # pipeline ranks all see the same batches
        global_batch_size = args.batch_size * data_ranks * args.grad_accum_steps
        batch_ratio = global_batch_size / args.lr_base_size
        if not args.lr_base_scale:
            on = args.opt.lower()
            args.lr_base_scale = 'sqrt' if any(o in on for o in ('ada', 'lamb')) else 'linear'
        if args.lr_base_scale == 'sqrt':
            batch_ratio = batch_ratio ** 0.5
        args.lr = args.lr_base * batch_ratio
        if is_main:
            _logger.info(f'Learning rate ({args.lr}) calculated from base learning rate ({args.lr_base}) '
                         f'and effective global batch size ({global_batch_size}) with {args.lr_base_scale} scaling.')

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', NoDecorLayersWarning)
            optimizer = create_optimizer_v2(trainer.stage if trainer else model, **_optimizer_kwargs(args))
    except NoDecorLayersWarning:
        raise UserError(f'optimizer {args.opt!r} is a DBP optimizer but model {args.model!r} has no decorrelated '
                        f'layers; use a dbp_ model ({", ".join(timm.list_models("dbp_*")[:4])}, ...) or a plain '
                        f'optimizer') from None
    except (ValueError, TypeError) as e:
        raise UserError(f'cannot create optimizer {args.opt!r}: {e}') from None
    dbp = dbp_optimizer_of(optimizer)  # also inside lookahead_
    if dbp is not None:  # args.yaml records the DBP settings the run used, not None for "the default of that day"
        for name in DBP_SHORTCUTS:
            setattr(args, name, dbp.param_groups[0][name])
        args_text = _args_yaml(args)
    if args.decor_warmup and dbp is None:
        raise UserError(f'--decor-warmup learns R before training and needs a DBP optimizer (--opt dbpsgd, ...), '
                        f'got --opt {args.opt}')
    if args.decor_epochs is not None:
        if dbp is None:
            raise UserError(f'--decor-epochs limits the R updates of a DBP optimizer (--opt dbpsgd, ...), '
                            f'got --opt {args.opt}')
        if 'decor_steps' in (args.opt_args or {}):
            raise UserError('give either --decor-epochs or --opt-kwargs decor_steps=..., not both')
    if trainer is not None:
        trainer.attach_optimizer(optimizer)

    loss_scaler = None
    if args.amp and amp_dtype == torch.float16:
        loss_scaler = utils.NativeScaler(device=device.type)
    if is_main:
        _logger.info(f'AMP: {"on, " + args.amp_dtype if args.amp else "off"}; optimizer {type(optimizer).__name__}'
                     f'{" (DBP)" if dbp is not None else ""}.')

    start_epoch, best_metric, best_epoch, train_time, kept_checkpoints = 0, None, None, 0.0, []
    if checkpoint is not None:
        _load_model_state(model, checkpoint['state_dict'], resume_path)
        if not args.no_resume_opt:
            optimizer.load_state_dict(_optimizer_state(checkpoint, trainer, args, resume_path))
            if loss_scaler is not None and 'scaler' in checkpoint:
                loss_scaler.load_state_dict(checkpoint['scaler'])
        start_epoch = checkpoint['epoch'] + 1
        calls = checkpoint.get('sketch_calls') or {}  # where each sketched conv's probe stream was: an exact resume
        for name, layer in timm_dbp.sketched_layers(model):
            layer.sketch_calls = calls.get(name, 0)
        best_metric, best_epoch = checkpoint.get('best_metric'), checkpoint.get('best_epoch')
        train_time = checkpoint.get('train_time', 0.0)
        kept_checkpoints = [tuple(item) for item in checkpoint.get('kept_checkpoints', [])]
        if is_main:
            _logger.info(f'Resumed {resume_path} at epoch {start_epoch}')

    model_ema = None
    if args.model_ema:
        model_ema = utils.ModelEmaV3(
            model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
            device='cpu' if args.model_ema_force_cpu else None)
        if checkpoint is not None and checkpoint.get('state_dict_ema') is not None:
            model_ema.module.load_state_dict(checkpoint['state_dict_ema'])

    # `model` stays the plain module, so checkpoints keep the model's own names (no `_orig_mod.`); `run_model` (the
    # compiled one with --torchcompile) runs the training steps and the evaluation
    run_model = model
    if args.torchcompile:
        run_model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    train_model = wrap_ddp(run_model, device, broadcast_buffers=not args.no_ddp_bb) if args.distributed else run_model

    # Data
    dataset_train = build_dataset(args, args.train_split, True, args.train_num_samples)
    dataset_eval = build_dataset(args, args.val_split, False, args.val_num_samples)

    collate_fn, mixup_fn = None, None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    use_prefetcher = device.type == 'cuda' and not args.no_prefetcher
    args.prefetcher_in_use = use_prefetcher
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes)
        if use_prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)

    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob or 0., gaussian_blur_prob=args.gaussian_blur_prob or 0.,
        auto_augment=args.aa, num_aug_repeats=args.aug_repeats, interpolation=train_interpolation,
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        collate_fn=collate_fn, pin_memory=args.pin_mem, device=device, use_prefetcher=use_prefetcher,
        use_multi_epochs_loader=args.use_multi_epochs_loader, worker_seeding=args.worker_seeding,
        persistent_workers=False,
    )
    loader_eval = _eval_loader(dataset_eval, args, data_config, device)
    loader_fit = None
    if args.analytic_head or args.analytic_head_only:  # the training images with eval transforms: no aug, no mixup
        loader_fit = _eval_loader(build_dataset(args, args.train_split, False, args.train_num_samples), args,
                                  data_config, device)

    # Loss
    if mixup_active:
        if args.bce_loss:
            train_loss_fn = BinaryCrossEntropy(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum,
                                               pos_weight=args.bce_pos_weight)
        else:
            train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        if args.bce_loss:
            train_loss_fn = BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh,
                                               sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
        else:
            train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    train_loss_fn = train_loss_fn.to(device=device)
    validate_loss_fn = nn.CrossEntropyLoss().to(device=device)

    # Scheduler
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    try:
        lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                       updates_per_epoch=updates_per_epoch)
    except (ValueError, AssertionError) as e:
        raise UserError(f'bad schedule --sched {args.sched}: {e}') from None
    if args.decor_epochs is not None:  # R's learning stops after this many optimizer steps (decor_steps)
        for group in dbp.param_groups:
            group['decor_steps'] = round(args.decor_epochs * updates_per_epoch)
        dbp.refresh_dbp()
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    if checkpoint is not None:
        saved = checkpoint.get('rng_state')
        if isinstance(saved, list):  # a --decoupled checkpoint: one state per stage
            saved = saved[args.rank] if len(saved) == args.world_size and trainer is not None else None
        set_rng_state(saved)

    stop_epoch = min(num_epochs, args.stop_after_epoch or num_epochs)  # a chunk of the schedule ends here
    train_epochs = range(0) if args.analytic_head_only else range(start_epoch, stop_epoch)
    meter = _energy_meter(args, checkpoint, resume_path, is_main, epochs_to_run=len(train_epochs) > 0)

    output_dir = None
    if is_main:
        output_dir = os.path.join(output_base, 'train', exp_name)
        os.makedirs(output_dir, exist_ok=True)
        args_file = os.path.join(output_dir, 'args.yaml')
        if checkpoint is None or not os.path.exists(args_file):  # a resumed run keeps its original args.yaml
            with open(args_file, 'w') as f:
                f.write(args_text)
        _logger.info(f'Output: {output_dir}; scheduled epochs: {num_epochs}')

    run_start = time.time()
    if args.decor_warmup and start_epoch == 0 and checkpoint is None and len(train_epochs):
        with meter if meter is not None else nullcontext():  # timed and metered as training
            train_time += warm_up_decorrelation(dbp, model, loader_train, args, device, amp_autocast, mixup_fn)
    eval_metrics = None  # of the last epoch trained in this run
    if start_epoch >= stop_epoch and not args.analytic_head_only and is_main:
        _logger.info(f'Nothing to do: checkpoint is at epoch {start_epoch - 1}, the run has {num_epochs} epochs'
                     + (f', this chunk stops after {stop_epoch}.' if stop_epoch < num_epochs else '.'))
    for epoch in train_epochs:
        if hasattr(dataset_train, 'set_epoch'):
            dataset_train.set_epoch(epoch)
        elif args.distributed and hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)

        with meter if meter is not None else nullcontext():  # energy: the training epochs only, like train_time
            if trainer is not None:
                train_metrics = train_decoupled_epoch(
                    epoch, trainer, loader_train, optimizer, train_loss_fn, args, device, lr_scheduler=lr_scheduler,
                    amp_autocast=amp_autocast, mixup_fn=mixup_fn, updates_per_epoch=updates_per_epoch)
            else:
                train_metrics = train_one_epoch(
                    epoch, num_epochs, train_model, loader_train, optimizer, train_loss_fn, args, device=device,
                    lr_scheduler=lr_scheduler, amp_autocast=amp_autocast, loss_scaler=loss_scaler,
                    model_ema=model_ema, mixup_fn=mixup_fn, num_updates_total=num_epochs * updates_per_epoch)
        train_time += train_metrics.pop('epoch_time')
        if dbp is not None:
            train_metrics.update(dbp.dbp_summary())
            train_metrics.pop('decor_layers', None)
        train_metrics['time'] = train_time  # cumulative training wall-clock: summary.csv column train_time
        if meter is not None:  # cumulative too: columns train_energy_kwh, train_co2_kg
            train_metrics.update(energy_kwh=meter.kwh, co2_kg=meter.co2_kg)

        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            utils.distribute_bn(model, args.world_size, args.dist_bn == 'reduce')

        last_epoch = epoch + 1 == num_epochs
        eval_metrics = None
        if trainer is not None and ((epoch + 1) % args.val_interval == 0 or last_epoch):
            eval_metrics = validate_decoupled(trainer, loader_eval, validate_loss_fn, args, device, amp_autocast)
        elif (epoch + 1) % args.val_interval == 0 or last_epoch:
            eval_metrics = validate(run_model, loader_eval, validate_loss_fn, args, device, amp_autocast)
            if model_ema is not None:
                if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                    utils.distribute_bn(model_ema, args.world_size, args.dist_bn == 'reduce')
                ema_metrics = validate(model_ema, loader_eval, validate_loss_fn, args, device, amp_autocast,
                                       log_suffix=' (EMA)')
                eval_metrics.update({f'ema_{k}': v for k, v in ema_metrics.items()})

        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric] if eval_metrics else None)

        gathered = _gather_decoupled(trainer, model, optimizer) if trainer is not None else None  # collective
        if is_main:
            lrs = [g['lr'] for g in optimizer.param_groups]
            summary_path = os.path.join(output_dir, 'summary.csv')
            if epoch == 0 and os.path.exists(summary_path):
                os.remove(summary_path)  # a fresh run in an existing --experiment folder starts a new summary
            append_summary(summary_path, dict(  # timm's columns: epoch, train_*, eval_*, lr
                epoch=epoch, **{f'train_{k}': v for k, v in train_metrics.items()},
                **{f'eval_{k}': v for k, v in (eval_metrics or {}).items()}, lr=sum(lrs) / len(lrs)))
            metric = eval_metrics[args.eval_metric] if eval_metrics else None
            if metric is not None and (best_metric is None or metric > best_metric):
                best_metric, best_epoch = metric, epoch
            state = dict(
                epoch=epoch, arch=args.model, args=args, state_dict=model.state_dict(),
                optimizer=optimizer.state_dict(), scaler=loss_scaler.state_dict() if loss_scaler else None,
                state_dict_ema=model_ema.module.state_dict() if model_ema is not None else None,
                metric=metric, best_metric=best_metric, best_epoch=best_epoch, train_time=train_time,
                train_energy_kwh=meter.kwh if meter is not None else None,
                train_co2_kg=meter.co2_kg if meter is not None else None,
                rng_state=rng_state(), kept_checkpoints=kept_checkpoints, version=2, dbp_model_kwargs=pinned_kwargs,
                sketch_calls={name: layer.sketch_calls for name, layer in timm_dbp.sketched_layers(unwrap_model(model))})
            if gathered is not None:  # every stage's tensors, and one optimizer / RNG state per stage
                state.update(gathered)
            _save_checkpoints(state, output_dir, best_epoch == epoch, args.checkpoint_hist)
            kept_checkpoints = state['kept_checkpoints']

    if is_main:
        best = f'{best_metric:.3f} (epoch {best_epoch})' if best_metric is not None else 'n/a'
        _logger.info(f'*** Best {args.eval_metric}: {best}; training time {train_time:.1f}s, '
                     f'wall-clock this run {time.time() - run_start:.1f}s')
        if meter is not None:
            _logger.info(f'*** Energy of the training epochs: {meter.kwh:.4g} kWh, {meter.co2_kg:.4g} kg CO2eq '
                         f'({meter.country_iso_code} grid; codecarbon, whole machine of rank 0; '
                         f'{meter.method or "no epoch measured in this process"})')
    if len(train_epochs) and stop_epoch < num_epochs and is_main:
        _logger.info(f'Stopped after epoch {stop_epoch} of {num_epochs} (--stop-after-epoch); continue with the same '
                     'command and --resume auto')
    if loader_fit is not None and (args.analytic_head_only or stop_epoch == num_epochs):  # at the schedule's end
        refit_analytic_head(model, loader_fit, loader_eval, validate_loss_fn, args, device, amp_autocast, output_dir,
                            epoch=start_epoch - 1 if args.analytic_head_only else num_epochs - 1, before=eval_metrics)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return best_metric


def _eval_loader(dataset, args, data_config, device):
    """timm's eval loader (no augmentation) of `dataset`: the validation set, and the analytic head's fit data."""
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        crop_pct=data_config['crop_pct'], pin_memory=args.pin_mem, device=device,
        use_prefetcher=args.prefetcher_in_use, persistent_workers=False,
    )


def refit_analytic_head(
        model, loader_fit, loader_eval, loss_fn, args, device, amp_autocast, output_dir, epoch, before=None):
    """--analytic-head(-only): evaluate (unless `before` has the last epoch's evaluation), set the classifier to the
    least-squares fit over `loader_fit`, evaluate again.

    Rank 0 writes both evaluations and the fit to analytic_head.json and the refitted model to analytic_head.pth.tar
    (atomic, loadable by validate.py / --initial-checkpoint). Every rank fits (the factors are merged across ranks).
    """
    if before is None:
        before = validate(model, loader_eval, loss_fn, args, device, amp_autocast, log_suffix=' (before analytic head)')
    fit = timm_dbp.fit_analytic_head(model, loader_fit, ridge=args.analytic_ridge, device=device,
                                     amp_autocast=amp_autocast, channels_last=args.channels_last)
    after = validate(model, loader_eval, loss_fn, args, device, amp_autocast, log_suffix=' (analytic head)')
    if args.rank != 0:
        return
    _logger.info(f'*** Analytic head (ridge {args.analytic_ridge:g}, {fit["num_samples"]} training images, '
                 f'{fit["seconds"]:.1f}s): {args.eval_metric} {before[args.eval_metric]:.3f} -> '
                 f'{after[args.eval_metric]:.3f}')
    report = dict(before=before, after=after, fit=fit, fit_data=f'{args.train_split} split, eval transforms',
                  head_only=args.analytic_head_only)
    path = os.path.join(output_dir, 'analytic_head.json')
    with open(f'{path}.tmp', 'w') as f:
        json.dump(report, f, indent=2)
    os.replace(f'{path}.tmp', path)
    save_atomic(dict(epoch=epoch, arch=args.model, args=args, state_dict=model.state_dict(),
                     metric=after[args.eval_metric], analytic_head=report, version=2),
                os.path.join(output_dir, 'analytic_head.pth.tar'))


def _energy_meter(args, checkpoint, source: str, is_main: bool, epochs_to_run: bool):
    """The EnergyMeter of this run's training epochs, or None (said once in the log). Only rank 0 measures:
    codecarbon measures the whole machine, so under torchrun the figure is rank 0's node (all of a one-node run).
    summary.csv keeps the same columns all through a run, so a resumed run measures exactly when its checkpoint did
    and continues its totals."""
    measured = checkpoint is not None and checkpoint.get('train_energy_kwh') is not None
    refuse = (f'{source} has measured energy (summary.csv columns train_energy_kwh, train_co2_kg): '
              'resuming it without energy would break those columns; ') if measured and epochs_to_run else None
    if checkpoint is not None and not measured:
        reason = f'energy not measured: {source} has no energy record (its epochs were not measured)'
    elif args.no_energy:
        if refuse:
            raise UserError(refuse + 'drop --no-energy')
        reason = 'energy not measured: --no-energy'
    elif not codecarbon_available():
        if refuse:
            raise UserError(refuse + 'pip install timm-dbp[energy]')
        reason = NOT_MEASURED
    else:
        reason = None
    if reason is not None:
        if is_main:
            _logger.info(reason)
        return None
    if not is_main:
        return None
    if measured:
        return EnergyMeter(args.energy_country, kwh=checkpoint['train_energy_kwh'], co2_kg=checkpoint['train_co2_kg'])
    return EnergyMeter(args.energy_country)


def wrap_ddp(model: nn.Module, device: torch.device, broadcast_buffers: bool = True) -> DistributedDataParallel:
    """DistributedDataParallel that never broadcasts DBP buffers: the optimizer keeps R equal on every rank
    (all-gathered samples), so re-sending hundreds of MiB of R from rank 0 every forward would be pure cost."""
    decor_buffers = [f'{n}.{b}' for n, layer in timm_dbp.decor_layers(model) for b, _ in layer.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, decor_buffers)
    kwargs = dict(device_ids=[device] if device.type == 'cuda' else None)
    if 'forward_sync_buffers' in inspect.signature(DistributedDataParallel).parameters:  # newer torch
        kwargs['forward_sync_buffers'] = broadcast_buffers
    else:
        kwargs['broadcast_buffers'] = broadcast_buffers
    return DistributedDataParallel(model, **kwargs)


def _decoupled_trainer(model: nn.Module, data_config: dict, args, device: torch.device,
                       checkpoint: Optional[dict] = None) -> DecoupledTrainer:
    """--decoupled: rank 0's initial weights on every rank, the model split at its stages, this rank's stage on
    `device`, the others on the CPU. The cuts: --decoupled-cuts, else those of the checkpoint being resumed (a resumed
    run continues the same split), else the ones that balance the time rank 0 measures, handed to every rank."""
    if args.world_size > 1:
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, 0)
    sample = torch.randn(args.batch_size, *data_config['input_size'], generator=torch.Generator().manual_seed(0))
    cuts = args.decoupled_cuts
    saved = (checkpoint or {}).get('decoupled')
    if cuts is None and saved and len(saved['stages']) == args.decoupled:
        cuts = [owned[-1] for owned in saved['stages'][:-1]]
    stages = None
    try:
        if cuts is None and args.world_size > 1:  # rank 0 times the stages (forward + backward), all use its cuts
            found = [None]
            if args.rank == 0:
                try:
                    stages = split_model(model, args.decoupled, sample.to(device), balance='time')
                    found = [[stage.owned[-1] for stage in stages[:-1]]]
                except ValueError as e:  # every rank must hear of it, or the others wait here for ever
                    found = [str(e)]
            torch.distributed.broadcast_object_list(found, 0)
            if isinstance(found[0], str):
                raise ValueError(found[0])
            cuts = found[0]
        if stages is None:
            stages = split_model(model, args.decoupled, sample.to(device), cuts=cuts)
        trainer = DecoupledTrainer(stages, args.rank, device, delay=args.decoupled_delay,
                                   accum=args.grad_accum_steps, shrink=args.decoupled_shrink)
    except ValueError as e:
        raise UserError(f'--decoupled {args.decoupled}: {e}') from None
    for k, stage in enumerate(stages):
        if k != args.rank:
            stage.to('cpu')
    if args.rank == 0:
        _logger.info('Pipeline stages: ' + ' | '.join(f'{k}: {", ".join(s.owned)}' for k, s in enumerate(stages))
                     + f'; delay {args.decoupled_delay} tick(s) per hop, accumulation {args.grad_accum_steps}, '
                       f'shrink {args.decoupled_shrink:g}')
    return trainer


def _decoupled_record(trainer: Optional[DecoupledTrainer]) -> Optional[dict]:
    """What a --decoupled checkpoint records of its pipeline (None without one)."""
    if trainer is None:
        return None
    return dict(stages=[s.owned for s in trainer.stages], delay=trainer.delay, accum=trainer.accum,
                shrink=trainer.shrink)


def _optimizer_state(checkpoint: dict, trainer: Optional[DecoupledTrainer], args, source: str) -> dict:
    """The optimizer state of this process in `checkpoint`: a --decoupled checkpoint holds one per stage and must
    come from the same split."""
    saved, current = checkpoint.get('decoupled'), _decoupled_record(trainer)
    if (saved is None) != (current is None) or (saved and saved['stages'] != current['stages']):
        def describe(record):
            return f'{len(record["stages"])} pipeline stages' if record else 'no pipeline'
        raise UserError(f'{source} was trained with {describe(saved)}, this run has {describe(current)}: the optimizer '
                        f'states do not match (resume with the same --decoupled, or add --no-resume-opt)')
    state = checkpoint['optimizer']
    return state[args.rank] if current is not None else state


def _gather_decoupled(trainer: DecoupledTrainer, model: nn.Module, optimizer) -> Optional[dict]:
    """Every stage's tensors, optimizer state and RNG state, collected on rank 0 (None elsewhere) for a checkpoint
    that loads like any other (state_dict of the whole model) and resumes the pipeline exactly."""
    own = dict(state_dict={k: v.detach().cpu() for k, v in model.state_dict().items() if trainer.stage.owns(k)},
               optimizer=optimizer.state_dict(), rng_state=rng_state())
    parts = [own]
    if trainer.num_stages > 1:
        parts = [None] * trainer.num_stages if trainer.rank == 0 else None
        torch.distributed.gather_object(own, parts, dst=0)
    if trainer.rank != 0:
        return None
    state_dict = {}  # the stages own every tensor of the model exactly once (checked by split_model)
    for part in parts:
        state_dict.update(part['state_dict'])
    return dict(state_dict=state_dict, optimizer=[p['optimizer'] for p in parts],
                rng_state=[p['rng_state'] for p in parts], decoupled=_decoupled_record(trainer))


def _save_checkpoints(state: dict, output_dir: str, is_best: bool, hist: int) -> None:
    """last.pth.tar every epoch; model_best.pth.tar and the `hist` best checkpoint-<epoch>.pth.tar, all atomic.

    The state is serialized once (last.pth.tar); the other files are atomic links to (or copies of) it. The kept
    files and their metrics travel in the checkpoint (`kept_checkpoints`), so a resumed run keeps pruning the same
    list.
    """
    metric = state['metric']
    name = f'checkpoint-{state["epoch"]}.pth.tar'
    dropped = []
    if metric is not None and hist > 0:
        ranked = sorted(state['kept_checkpoints'] + [(metric, name)], key=lambda item: -item[0])
        state['kept_checkpoints'], dropped = ranked[:hist], [n for _, n in ranked[hist:]]
    last = os.path.join(output_dir, 'last.pth.tar')
    save_atomic(state, last)
    if (metric, name) in state['kept_checkpoints']:
        copy_atomic(last, os.path.join(output_dir, name))
    if metric is not None and is_best:
        copy_atomic(last, os.path.join(output_dir, 'model_best.pth.tar'))
    for old in dropped:
        if old != name and os.path.exists(os.path.join(output_dir, old)):
            os.remove(os.path.join(output_dir, old))


def train_one_epoch(
        epoch, num_epochs, model, loader, optimizer, loss_fn, args, device, lr_scheduler=None,
        amp_autocast=nullcontext, loss_scaler=None, model_ema=None, mixup_fn=None, num_updates_total=None):
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch and mixup_fn is not None:
        mixup_fn.mixup_enabled = False
    model.train()
    accum = args.grad_accum_steps
    last_accum_steps = len(loader) % accum or accum
    updates_per_epoch = (len(loader) + accum - 1) // accum
    num_updates = epoch * updates_per_epoch
    last_batch_idx = len(loader) - 1
    last_batch_idx_to_accum = len(loader) - last_accum_steps
    losses_m = utils.AverageMeter()
    seen, epoch_start = 0, time.time()
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == last_batch_idx
        need_update = last_batch or (batch_idx + 1) % accum == 0
        update_idx = batch_idx // accum
        if batch_idx >= last_batch_idx_to_accum:
            accum = last_accum_steps
        input, target = _prepare_batch(input, target, args, device, mixup_fn)

        sync = need_update or not isinstance(model, DistributedDataParallel)
        with (nullcontext() if sync else model.no_sync()):
            with amp_autocast():
                loss = loss_fn(model(input), target) / accum
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=model.parameters(), need_update=need_update)
            else:
                loss.backward()
                if need_update:
                    if args.clip_grad is not None:
                        utils.dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        if need_update:
            optimizer.zero_grad()
            if model_ema is not None:
                model_ema.update(model.module if hasattr(model, 'module') else model, step=num_updates)
        losses_m.update(loss.item() * accum, input.size(0))
        seen += input.size(0)

        if not need_update:
            continue
        num_updates += 1
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)
        if args.rank == 0 and (update_idx % args.log_interval == 0 or last_batch):
            now = time.time()
            rate = seen * args.world_size / max(now - epoch_start, 1e-9)
            epoch_eta = (updates_per_epoch - update_idx - 1) * (now - epoch_start) / (update_idx + 1)
            run_eta = epoch_eta + (num_epochs - epoch - 1) * (now - epoch_start) * updates_per_epoch / (update_idx + 1)
            lr = optimizer.param_groups[0]['lr']
            _logger.info(
                f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} ({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
                f'Loss: {losses_m.val:#.3g} ({losses_m.avg:#.3g})  {rate:>7.1f} img/s  LR: {lr:.3e}  '
                f'ETA epoch {_hms(epoch_eta)}, run {_hms(run_eta)}')
    return dict(loss=losses_m.avg, epoch_time=time.time() - epoch_start)


def warm_up_decorrelation(dbp, model, loader, args, device, amp_autocast=nullcontext, mixup_fn=None) -> float:
    """--decor-warmup: R learned from the first args.decor_warmup training batches (forward only) before epoch 0;
    the RNGs are put back, so the epochs see the same batches as without it. Returns the seconds it took."""
    start, saved_rng = time.time(), rng_state()

    batches = (_prepare_batch(input, target, args, device, mixup_fn)[0]
               for _, (input, target) in zip(range(args.decor_warmup), loader))
    with amp_autocast():
        updates = dbp.warm_up_decorrelation(model, batches, lr=args.decor_warmup_lr)
    set_rng_state(saved_rng)
    seconds = time.time() - start
    if args.rank == 0:
        summary = dbp.dbp_summary()
        _logger.info(f'DBP warm-up: {updates} R updates at decor lr {args.decor_warmup_lr:g} in {seconds:.1f}s; '
                     f'RMS off-diagonal correlation of the last sample {summary["decor_corr"]:.3f}')
    return seconds


def train_decoupled_epoch(epoch, trainer, loader, optimizer, loss_fn, args, device, lr_scheduler=None,
                          amp_autocast=nullcontext, mixup_fn=None, updates_per_epoch=None):
    """One --decoupled epoch: rank 0 feeds the batches, every rank steps its stage's optimizer and LR schedule, the
    last rank (which sees the loss) logs. `staleness`: the mean number of optimizer steps between a batch's forward
    and its update in this rank's stage (rank 0's, the most delayed, goes to summary.csv)."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch and mixup_fn is not None:
        mixup_fn.mixup_enabled = False

    def on_update(updates: int) -> None:
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=epoch * updates_per_epoch + updates)

    def on_log(update_idx: int, loss: float, rate: float) -> None:
        _logger.info(f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                     f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  Loss (running mean): {loss:#.3g}  '
                     f'{rate:>7.1f} img/s  LR: {optimizer.param_groups[0]["lr"]:.3e}  (last stage)')

    metrics = trainer.train_epoch(
        loader if args.rank == 0 else None, len(loader), optimizer, loss_fn, on_update=on_update, on_log=on_log,
        log_interval=args.log_interval, autocast=amp_autocast,
        prepare=partial(_prepare_batch, args=args, device=device, mixup_fn=mixup_fn))
    counts = metrics['staleness']
    staleness = sum(s * n for s, n in counts.items()) / max(sum(counts.values()), 1)
    _logger.info(f'Stage {args.rank}: waited {metrics["wait_time"]:.1f}s of the epoch\'s {metrics["epoch_time"]:.1f}s '
                 f'for its neighbours; gradients {staleness:.2f} optimizer steps stale on average')
    return dict(loss=metrics['loss'], staleness=staleness, epoch_time=metrics['epoch_time'])


def validate_decoupled(trainer, loader, loss_fn, args, device, amp_autocast=nullcontext):
    """validate() through the pipeline: rank 0 feeds the batches, the last rank scores them; metrics on every rank."""
    metrics = trainer.evaluate(loader if args.rank == 0 else None, len(loader), loss_fn, autocast=amp_autocast,
                               prepare=partial(_prepare_batch, args=args, device=device))
    if args.rank == 0:
        _logger.info(f'Test: Loss: {metrics["loss"]:#.4g}  Acc@1: {metrics["top1"]:.3f}  Acc@5: {metrics["top5"]:.3f}')
    return metrics


def _prepare_batch(input, target, args, device, mixup_fn=None):
    """A loader batch as the model takes it: on the device (unless the prefetcher did it), mixed, channels_last."""
    if not args.prefetcher_in_use:
        input, target = input.to(device), target.to(device)
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
    if args.channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    return input, target


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


@torch.no_grad()
def validate(model, loader, loss_fn, args, device, amp_autocast=nullcontext, log_suffix=''):
    losses_m, top1_m, top5_m = utils.AverageMeter(), utils.AverageMeter(), utils.AverageMeter()
    model.eval()
    for input, target in loader:
        input, target = _prepare_batch(input, target, args, device)
        with amp_autocast():
            output = model(input)
            if isinstance(output, (tuple, list)):
                output = output[0]
            loss = loss_fn(output, target)
        acc1, acc5 = utils.accuracy(output, target, topk=(1, min(5, output.shape[-1])))
        if args.distributed:
            loss, acc1, acc5 = (utils.reduce_tensor(t, args.world_size) for t in (loss.data, acc1, acc5))
        losses_m.update(loss.item(), input.size(0))
        top1_m.update(acc1.item(), output.size(0))
        top5_m.update(acc5.item(), output.size(0))
    if args.rank == 0:
        _logger.info(f'Test{log_suffix}: Loss: {losses_m.avg:#.4g}  Acc@1: {top1_m.avg:.3f}  Acc@5: {top5_m.avg:.3f}')
    return dict(loss=losses_m.avg, top1=top1_m.avg, top5=top5_m.avg)


def run_cli(main_fn, prog: str, argv=None) -> int:
    """Run a script's main: bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        main_fn(argv)
    except UserError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    return 0


def run(argv=None) -> int:
    return run_cli(main, 'train.py', argv)


if __name__ == '__main__':
    sys.exit(run())
