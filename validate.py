#!/usr/bin/env python3
""" timm-dbp validation: top-1 / top-5 of a checkpoint, a folded checkpoint or an `hf-hub:` model

    python validate.py --dataset fashion_mnist --model dbp_test_resnet --checkpoint output/train/x/model_best.pth.tar
    python validate.py ... --fold          # validate the folded plain model (W R in ordinary layers): same accuracy
    python validate.py ... --use-ema       # the EMA weights of a training checkpoint

Data and model flags follow timm's validate.py; bad input is one line on stderr and exit code 2.
"""
import argparse
import json
import logging
import sys
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn as nn

from timm import utils
from timm.data import create_loader, resolve_data_config
from timm.models import create_model

import timm_dbp
from train import (
    UserError, apply_dataset_defaults, build_dataset, check_model_name, load_weights, pinned_model_kwargs,
    read_training_checkpoint, run_cli, validate,
)

_logger = logging.getLogger('validate')

parser = argparse.ArgumentParser(description='timm-dbp validation (timm flags)')
parser.add_argument('data', nargs='?', metavar='DIR', help='path to dataset (positional is *deprecated*)')
parser.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
parser.add_argument('--dataset', metavar='NAME', default='', help='dataset type + name ("" = ImageFolder / ImageTar)')
parser.add_argument('--split', metavar='NAME', default='validation', help='dataset split (default: validation)')
parser.add_argument('--num-samples', default=None, type=int, metavar='N', help='use only N samples')
parser.add_argument('--class-map', default='', type=str, metavar='FILENAME', help='path to class to idx mapping file')
parser.add_argument('--dataset-download', action='store_true', default=False, help='allow dataset download')
parser.add_argument('--model', '-m', metavar='NAME', default='dbp_resnet18', help='model architecture or hf-hub:org/name')
parser.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                    help='model kwargs (a train.py checkpoint adds the dbp_ ones it was built with)')
parser.add_argument('--checkpoint', default='', type=str, metavar='PATH', help='checkpoint to validate')
parser.add_argument('--use-ema', action='store_true', default=False, help='use the EMA weights of the checkpoint')
parser.add_argument('--fold', action='store_true', default=False, help='validate the folded plain model (W R)')
parser.add_argument('--pretrained', action='store_true', default=False, help='use pretrained weights')
parser.add_argument('--num-classes', type=int, default=None, help='Number classes in dataset')
parser.add_argument('--in-chans', type=int, default=None, metavar='N', help='Image input channels')
parser.add_argument('--img-size', default=None, type=int, metavar='N', help='Input image dimension')
parser.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N', help='Input dimensions')
parser.add_argument('--crop-pct', default=None, type=float, metavar='N', help='Input image center crop pct')
parser.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='Override mean pixel value')
parser.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='Override std deviation')
parser.add_argument('--interpolation', default='', type=str, metavar='NAME', help='Image resize interpolation type')
parser.add_argument('-b', '--batch-size', default=256, type=int, metavar='N', help='mini-batch size (default: 256)')
parser.add_argument('-j', '--workers', default=4, type=int, metavar='N', help='number of data loading workers')
parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str, help='Device')
parser.add_argument('--amp', action='store_true', default=False, help='use mixed precision (torch.autocast)')
parser.add_argument('--amp-dtype', default='float16', type=str, choices=('float16', 'bfloat16'), help='AMP dtype')
parser.add_argument('--channels-last', action='store_true', default=False, help='Use channels_last memory layout')
parser.add_argument('--results-file', default='', type=str, metavar='FILENAME', help='write the results as JSON')


def main(argv=None):
    if not logging.getLogger().handlers:
        utils.setup_default_logging()
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or args.data
    check_model_name(args.model)
    device = torch.device(args.device)
    apply_dataset_defaults(args)
    model_kwargs = dict(args.model_kwargs, **({'in_chans': args.in_chans} if args.in_chans else {}))
    from_hub = args.model.startswith(('hf-hub:', 'hf_hub:', 'local-dir:'))
    checkpoint = read_training_checkpoint(args.checkpoint) if args.checkpoint else None
    if checkpoint is not None:  # the dbp_ model kwargs a train.py checkpoint pinned: its R's under any later default
        model_kwargs = pinned_model_kwargs(checkpoint, args.model, model_kwargs, args.checkpoint)
    pretrained = args.pretrained or (from_hub and not args.checkpoint)  # a hub / local-dir model brings its weights
    try:
        model = create_model(args.model, pretrained=pretrained, num_classes=args.num_classes, **model_kwargs)
    except (TypeError, RuntimeError, OSError, ValueError) as e:
        raise UserError(f'cannot create model {args.model!r}: {e}'.splitlines()[0]) from None
    if args.checkpoint:
        load_weights(model, args.checkpoint, args.use_ema, checkpoint)
    if args.fold:
        model = timm_dbp.fold(model)
    n_dbp = len(list(timm_dbp.decor_layers(model)))
    _logger.info(f'Model {args.model}: {sum(p.numel() for p in model.parameters())} params, {n_dbp} DBP layers'
                 f'{" (folded)" if args.fold else ""}')

    data_config = resolve_data_config(vars(args), model=model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    dataset = build_dataset(args, args.split, False, args.num_samples)
    use_prefetcher = device.type == 'cuda'
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, crop_pct=data_config['crop_pct'], device=device, use_prefetcher=use_prefetcher,
        persistent_workers=False)
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    args.distributed, args.rank, args.world_size, args.prefetcher_in_use = False, 0, 1, use_prefetcher
    metrics = validate(model, loader, nn.CrossEntropyLoss().to(device), args, device, amp_autocast)
    results = dict(model=args.model, checkpoint=args.checkpoint, fold=args.fold, ema=args.use_ema,
                   top1=round(metrics['top1'], 4), top5=round(metrics['top5'], 4), loss=round(metrics['loss'], 6),
                   num_images=len(dataset), dbp_layers=n_dbp)
    print(json.dumps(results))
    if args.results_file:
        with open(args.results_file, 'w') as f:
            json.dump(results, f, indent=2)
    return results


def run(argv=None) -> int:
    return run_cli(main, 'validate.py', argv)


if __name__ == '__main__':
    sys.exit(run())
