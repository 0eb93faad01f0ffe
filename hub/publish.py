""" Publish a train.py run to the Hugging Face Hub as timm publishes its own weights

    python -m hub.publish RUN_DIR_OR_CHECKPOINT --repo-id ORG/NAME [--fold] [--private] [--dry-run --out DIR]

writes a Hub model folder and uploads it with huggingface_hub's API (create_repo, upload_folder; the token comes
from $HF_TOKEN or `hf auth login`):

    model.safetensors   the weights (safetensors only, never pickle): DBP form with R, or folded with --fold
    config.json         timm's format (architecture, num_classes, num_features, global_pool, model_args,
                        pretrained_cfg), so `timm.create_model('hf-hub:ORG/NAME', pretrained=True)` rebuilds the
                        same model (model_args carry dbp_structure & co, hence the same R buffer shapes)
    README.md           the model card (hub/card.py): Hub metadata, results, DBP settings, R statistics, command
    summary.csv, *.png  the run's per-epoch log and its accuracy-vs-time plot (made from summary.csv if the run
                        folder has no PNG and matplotlib is installed)

Before anything is uploaded, the folder is loaded back through timm (`local-dir:`) and its outputs are compared
with the checkpoint's model. `--dry-run` writes the folder and uploads nothing. A model card already on the Hub is
kept unless `--overwrite-card`. Bad input is one line on stderr and exit code 2.
"""
import argparse
import csv
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)  # train.py lives at the repository root, next to hub/

import timm
from huggingface_hub import HfApi
from timm.data import resolve_data_config
from timm.models import PretrainedCfg, split_model_name_tag

import timm_dbp
import train
from timm_dbp.data import FASHION_MNIST_CLASSES
from timm_dbp.layers import identity_factor
from timm_dbp.models import DBP_MODEL_KWARGS, dbp_model_kwargs, pop_dbp_args, r_mismatch_hint
from timm_dbp.optim import DBP_DEFAULTS
from timm_dbp.utils.checkpoint import CheckpointError, load_checkpoint_file
from train import UserError

from .card import CardFacts, render_card
from .load import HubLoadError, load_model

__all__ = ['export_folder', 'upload', 'read_checkpoint', 'find_checkpoint', 'main', 'run']

_logger = logging.getLogger('hub.publish')

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
CARD_FILE = 'README.md'
PLOT_FILE = 'accuracy_vs_time.png'
_OUR_FILES = {WEIGHTS_FILE, CONFIG_FILE, CARD_FILE, 'summary.csv'}
_SOURCE_KEYS = ('url', 'file', 'state_dict', 'hf_hub_id', 'hf_hub_filename', 'source')
_PATH_ARGS = {'data_dir': 'DATA_DIR', 'data': 'DATA_DIR', 'output': 'OUTPUT', 'initial_checkpoint': 'CHECKPOINT',
              'resume': 'CHECKPOINT', 'pretrained_path': 'CHECKPOINT', 'class_map': 'CLASS_MAP'}
_RUNTIME_ARGS = ('device', 'local_rank', 'device_modules')  # facts of the machine, not of the recipe
_DBP_KWARGS = tuple(kwarg for kwarg, _ in DBP_MODEL_KWARGS.values())
_REPO_ID = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*')

parser = argparse.ArgumentParser(
    prog='python -m hub.publish', description='Publish a timm-dbp training run to the Hugging Face Hub')
parser.add_argument('source', metavar='RUN_DIR_OR_CHECKPOINT',
                    help='a train.py output folder (model_best.pth.tar, else last.pth.tar) or a checkpoint file')
parser.add_argument('--repo-id', required=True, metavar='ORG/NAME', help='the Hub model repository')
parser.add_argument('--fold', action='store_true', help='publish the folded plain twin (W R; no DBP buffers)')
parser.add_argument('--use-ema', action='store_true', help='publish the EMA weights of the checkpoint')
parser.add_argument('--private', action='store_true', help='create the repository as private')
parser.add_argument('--dry-run', action='store_true', help='write the folder (--out) and upload nothing')
parser.add_argument('--out', metavar='DIR', help='write the Hub folder here (needed with --dry-run)')
parser.add_argument('--overwrite-card', action='store_true', help='replace a model card (README.md) already on the Hub')
parser.add_argument('--license', default=None, help='license of the weights (default: apache-2.0, or the license of '
                                                     'the pretrained weights the run started from)')
parser.add_argument('--dataset-id', default=None, metavar='HUB_ID',
                    help='Hub id of the training dataset for the card metadata (default: from the run\'s --dataset)')
parser.add_argument('--revision', default=None, help='branch to upload to (default: main)')
parser.add_argument('--commit-message', default=None, help='commit message (default: "Add <architecture> weights")')


# --- reading the run -----------------------------------------------------------------------------------------------

def find_checkpoint(source: str) -> Tuple[Path, Optional[Path]]:
    """(checkpoint file, run folder or None) for a run folder or a checkpoint file."""
    path = Path(source)
    if path.is_dir():
        for name in ('model_best.pth.tar', 'last.pth.tar'):
            if (path / name).is_file():
                return path / name, path
        raise UserError(f'no checkpoint in {path} (expected model_best.pth.tar or last.pth.tar from train.py)')
    if path.is_file():
        run_dir = path.parent if (path.parent / 'summary.csv').is_file() or (path.parent / 'args.yaml').is_file() \
            else None
        return path, run_dir
    raise UserError(f'not found: {source} (give a train.py output folder or a checkpoint file)')


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """A train.py (or timm train.py) checkpoint, read with torch.load(weights_only=True): never runs pickled code."""
    try:
        return load_checkpoint_file(str(path))
    except CheckpointError as e:
        raise UserError(str(e)) from None


def _read_summary(run_dir: Optional[Path]) -> List[Dict[str, str]]:
    path = run_dir / 'summary.csv' if run_dir else None
    if path is None or not path.is_file():
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def _float(row: Optional[Dict[str, str]], key: str) -> Optional[float]:
    value = (row or {}).get(key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _train_args(checkpoint: Dict[str, Any], run_dir: Optional[Path]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(resolved args of the run, as given on the command line): the checkpoint's args (after train.py filled in the
    dataset defaults) and args.yaml (before), each standing in for the other when missing."""
    resolved = checkpoint.get('args')
    resolved = vars(resolved) if isinstance(resolved, argparse.Namespace) else dict(resolved or {})
    given = None
    if run_dir is not None and (run_dir / 'args.yaml').is_file():
        try:
            given = yaml.safe_load((run_dir / 'args.yaml').read_text())
        except yaml.YAMLError as e:
            raise UserError(f'cannot read {run_dir / "args.yaml"}: {e}'.splitlines()[0]) from None
    given = given if isinstance(given, dict) else dict(resolved)
    if not resolved and given:
        namespace = argparse.Namespace(**{'input_size': None, 'in_chans': None, **given})
        train.apply_dataset_defaults(namespace)  # what train.py filled in before building the model
        resolved = vars(namespace)
    if not resolved:
        raise UserError('the checkpoint has no training args and there is no args.yaml next to it')
    return resolved, given


# --- the model -----------------------------------------------------------------------------------------------------

def _model_kwargs(args: Dict[str, Any]) -> Dict[str, Any]:
    """The architecture kwargs train.py built the model with (drop rates left out, as timm leaves them out)."""
    kwargs = dict(args.get('model_kwargs') or {})
    if args.get('in_chans') is not None:
        kwargs['in_chans'] = args['in_chans']
    for name, key in (('global_pool', 'gp'), ('bn_momentum', 'bn_momentum'), ('bn_eps', 'bn_eps')):
        if args.get(key) is not None:
            kwargs[name] = args[key]
    return kwargs


def _build_model(checkpoint: Dict[str, Any], args: Dict[str, Any], path: Path, use_ema: bool):
    """(model with the checkpoint's weights, registered architecture, model kwargs)."""
    name = checkpoint.get('arch') or args.get('model')
    if not isinstance(name, str) or not name:
        raise UserError(f'{path} names no architecture (no arch, no args.model)')
    try:
        train.check_model_name(name)
    except UserError as e:
        raise UserError(f'{path}: {e} (import the library that registers it; timm-dbp registers dbp_*)') from None
    kwargs = train.pinned_model_kwargs(checkpoint, name, _model_kwargs(args), str(path))
    try:
        model = timm.create_model(name, num_classes=args.get('num_classes'), **kwargs)
    except Exception as e:
        raise UserError(f'cannot build {name!r} with {kwargs}: {type(e).__name__}: {e}'.splitlines()[0]) from None
    key = 'state_dict_ema' if use_ema else 'state_dict'
    state_dict = checkpoint.get(key)
    if not isinstance(state_dict, dict):
        raise UserError(f'{path} has no {key}' + (' (trained without --model-ema)' if use_ema else ''))
    target = model.state_dict()
    for k, v in state_dict.items():
        if k in target and tuple(v.shape) != tuple(target[k].shape):
            raise UserError(f'{path}: {k} is {tuple(v.shape)} in the checkpoint but {tuple(target[k].shape)} in '
                            f'{name} built with {kwargs} (model kwargs differ from the training run?)'
                            f'{r_mismatch_hint(state_dict, model)}')
    missing, unexpected = sorted(set(target) - set(state_dict)), sorted(set(state_dict) - set(target))
    if missing or unexpected:
        raise UserError(f'{path} does not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}'
                        f'{r_mismatch_hint(state_dict, model)}')
    model.load_state_dict(state_dict)
    architecture = model.pretrained_cfg.get('architecture') or split_model_name_tag(name)[0]
    return model.eval(), architecture, kwargs


def _json_value(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    return value


def _config(model: torch.nn.Module, architecture: str, model_args: Dict[str, Any], data_config: Dict[str, Any],
            label_names: Optional[List[str]], description: str, weights_license: str) -> Dict[str, Any]:
    """config.json in timm's format: architecture, num_classes, num_features, global_pool, model_args and a
    pretrained_cfg (PretrainedCfg fields only, no weight location) describing these weights' preprocessing."""
    fields = set(PretrainedCfg.__dataclass_fields__)
    base = dict(model.pretrained_cfg)
    cfg = {k: v for k, v in base.items() if k in fields and k not in _SOURCE_KEYS and v is not None}
    for key in ('architecture', 'tag', 'origin_url', 'paper_name', 'paper_ids', 'notes', 'label_offset'):
        cfg.pop(key, None)  # these describe timm's published weights of the twin, not these
    input_size = tuple(data_config['input_size'])
    if tuple(base.get('input_size') or ())[1:] != input_size[1:]:
        for key in ('pool_size', 'test_input_size', 'test_pool_size', 'test_crop_pct', 'min_input_size'):
            cfg.pop(key, None)
    cfg.update(
        input_size=input_size, interpolation=data_config['interpolation'], mean=tuple(data_config['mean']),
        std=tuple(data_config['std']), crop_pct=data_config['crop_pct'],
        crop_mode=data_config.get('crop_mode', 'center'), num_classes=model.num_classes, license=weights_license, description=description, custom_load=False)
    cfg.setdefault('pool_size', None)
    if base.get('num_classes') != model.num_classes:
        cfg.pop('label_names', None)
        cfg.pop('label_descriptions', None)
    cfg.pop('label_names', None)  # at the top level, where timm writes (and reads) them
    config = dict(architecture=architecture, num_classes=model.num_classes, num_features=model.num_features)
    pool = getattr(getattr(model, 'global_pool', None), 'pool_type', None)
    if isinstance(pool, str) and pool:
        config['global_pool'] = pool
    if label_names:
        config['label_names'] = list(label_names)
    config['model_args'] = {k: _json_value(v) for k, v in model_args.items()}
    config['pretrained_cfg'] = {k: _json_value(v) for k, v in cfg.items()}
    return config


def _r_stats(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Size of R and its distance from the identity, ||R - I||_F / ||I||_F, per layer (per factor for kron)."""
    dists, entries, nbytes = {}, 0, 0
    for key, R in state_dict.items():
        if not key.endswith(('.decor_matrix', '.decor_spatial')) or R.numel() == 0:
            continue
        eye = identity_factor(R.shape, dtype=torch.float64)
        dists[key] = float((R.double() - eye).norm() / eye.norm())
        entries += R.numel()
        nbytes += R.numel() * R.element_size()
    if not dists:
        return dict(layers=0, entries=0, mib=0.0)
    worst = max(dists, key=dists.get)
    return dict(layers=sum(k.endswith('.decor_matrix') for k in dists), entries=entries, mib=nbytes / 2 ** 20,
                mean_dist=sum(dists.values()) / len(dists), max_dist=dists[worst], max_layer=worst)


# --- the card facts ------------------------------------------------------------------------------------------------

def _dataset(args: Dict[str, Any], dataset_id: Optional[str]) -> Tuple[str, Optional[str], str]:
    """(display name, Hub dataset id or None, name of the evaluation split)."""
    dataset = (args.get('dataset') or '').lower()
    split = args.get('val_split') or 'validation'
    if train._is_fashion_mnist(argparse.Namespace(dataset=dataset)):
        return 'Fashion-MNIST', dataset_id or 'zalando-datasets/fashion_mnist', 'test'
    if dataset.startswith(('hfds/', 'hfids/')):
        name = dataset.split('/', 1)[1]
        return name, dataset_id or name, split
    imagenet = dataset in ('tfds/imagenet2012', 'torch/imagenet', 'wds/imagenet') or (
        not dataset and args.get('num_classes') == 1000 and 'imagenet' in str(args.get('data_dir') or '').lower())
    if imagenet:
        return 'ImageNet-1k', dataset_id or 'imagenet-1k', split
    return (args.get('dataset') or 'an image folder dataset'), dataset_id, split


# what runs from before an option existed did: no step cap (the plain rule), one vector per sampled patch, float32
_SETTINGS_OF_OLDER_RUNS = {'decor_max_step': None, 'decor_vectors_per_patch': 1, 'decor_matmul_dtype': 'float32'}


def _dbp_settings(args: Dict[str, Any], dbp_args: Dict[str, Any]) -> Dict[str, Any]:
    """The card's DBP settings: the optimizer's (train.py's flags and --opt-kwargs, else their defaults) and the
    model's `decorrelate()` arguments `dbp_args`."""
    opt_args = dict(args.get('opt_args') or {})
    settings = {}
    for name in train.DBP_SHORTCUTS:  # the settings train.py takes as --decor-* / --kappa flags
        value = args.get(name)
        settings[name] = value if value is not None else opt_args.get(name, DBP_DEFAULTS[name])
    for name, before in _SETTINGS_OF_OLDER_RUNS.items():  # args.yaml from before the option existed
        if name not in args and name not in opt_args:
            settings[name] = before
    epochs, steps = args.get('decor_epochs'), opt_args.get('decor_steps')  # R learned only that long, then fixed
    settings['decor_learns'] = (f'the first {epochs:g} epochs' if epochs is not None else
                                f'the first {steps} optimizer steps' if steps is not None else 'all of training')
    settings.update(dbp_args)
    return settings


def training_command(args: Dict[str, Any]) -> str:
    """`python train.py ...` with the flags whose values differ from train.py's defaults (local paths replaced by
    placeholders), in the parser's order."""
    import shlex
    parts = ['python', 'train.py']
    for action in train.parser._actions:
        dest = action.dest
        if not action.option_strings or dest not in args or dest in _RUNTIME_ARGS or dest == 'help':
            continue
        value, default = args[dest], action.default
        if value == default or (isinstance(value, (list, tuple)) and isinstance(default, (list, tuple))
                                and list(value) == list(default)):
            continue
        flag = max(action.option_strings, key=len)
        if dest in _PATH_ARGS and value:
            parts += [flag, _PATH_ARGS[dest]]
        elif isinstance(action, argparse._StoreTrueAction):
            parts += [flag] if value else []
        elif isinstance(value, dict):
            parts += [flag, *(f'{k}={v}' for k, v in value.items())]
        elif isinstance(value, (list, tuple)):
            parts += [flag, *(str(v) for v in value)]
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _redacted(args: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (_PATH_ARGS[k] if k in _PATH_ARGS and v else v) for k, v in sorted(args.items())}


def _plot(rows: List[Dict[str, str]], out: Path, title: str, ema: bool, epoch: Optional[int]) -> Tuple[List[str], str]:
    """([PNG file names in `out`], note): top-1 vs cumulative training time from summary.csv, with matplotlib."""
    points = [(_float(r, 'train_time'), _float(r, 'eval_top1'), _float(r, 'eval_ema_top1'), r.get('epoch'))
              for r in rows]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    if not points:
        return [], 'No plot: summary.csv has no train_time / eval_top1 values.'
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ('No plot: matplotlib was not installed when this was published '
                    '(`pip install \'timm-dbp[examples]\'`); the numbers are in summary.csv.')
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker='o', label='top-1')
    if ema and any(p[2] is not None for p in points):
        ax.plot([p[0] for p in points if p[2] is not None], [p[2] for p in points if p[2] is not None],
                marker='s', label='top-1 (EMA)')
    published = [p for p in points if epoch is not None and p[3] == str(epoch)]
    if published:
        ax.scatter([published[0][0]], [published[0][2] if ema and published[0][2] is not None else published[0][1]],
                   s=150, facecolors='none', edgecolors='k', label='published weights', zorder=3)
    ax.set_xlabel('cumulative training time (s)')
    ax.set_ylabel('eval top-1 (%)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOT_FILE)
    plt.close(fig)
    return [PLOT_FILE], ''


# --- the folder ----------------------------------------------------------------------------------------------------

def _prepare_out(out: Path) -> None:
    """`out` is created, or holds nothing but files this command writes (everything in it gets uploaded)."""
    if out.exists() and not out.is_dir():
        raise UserError(f'--out {out} exists and is not a folder')
    out.mkdir(parents=True, exist_ok=True)
    others = sorted(p.name for p in out.iterdir() if p.name not in _OUR_FILES and p.suffix != '.png')
    if others:
        raise UserError(f'--out {out} holds other files ({", ".join(others[:3])}); everything in it would be '
                        f'uploaded: use an empty folder')
    for p in out.iterdir():
        if p.suffix == '.png':
            p.unlink()


def export_folder(
        source: str,
        out: str,
        repo_id: str,
        fold: bool = False,
        use_ema: bool = False,
        weights_license: Optional[str] = None,
        dataset_id: Optional[str] = None,
) -> Dict[str, Any]:
    """Write the Hub folder of a run (weights, config.json, model card, log, plot) to `out` and check it.

    Returns:
        dict(out=folder, architecture=..., files=[names], folded=bool, max_abs_diff=float).
    """
    from safetensors.torch import save_file
    checkpoint_path, run_dir = find_checkpoint(source)
    checkpoint = read_checkpoint(checkpoint_path)
    args, given_args = _train_args(checkpoint, run_dir)
    model, trained_arch, model_args = _build_model(checkpoint, args, checkpoint_path, use_ema)
    dbp_state = model.state_dict()  # before any folding: R statistics
    has_dbp = any(True for _ in timm_dbp.decor_layers(model))
    data_config = resolve_data_config(dict(args), model=model)
    dataset_name, hub_dataset, split = _dataset(args, dataset_id)

    x = torch.randn(2, *data_config['input_size'], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
    architecture, published_args = trained_arch, dict(model_args)
    # what the model was built with (its entrypoint's defaults included), pinned in the DBP form's config.json
    dbp_args = getattr(model, 'dbp_args', None) or pop_dbp_args(dict(model_args))
    if has_dbp and not fold:
        published_args = {k: v for k, v in model_args.items() if k not in _DBP_KWARGS}
        published_args.update(dbp_model_kwargs(dbp_args))
    if fold and not has_dbp:
        _logger.info(f'--fold: {trained_arch} has no DBP layers, nothing to fold; published as it is')
    if fold and has_dbp:
        twin = trained_arch[len('dbp_'):] if trained_arch.startswith('dbp_') else ''
        if not twin or not timm.is_model(twin):
            raise UserError(f'--fold: {trained_arch!r} has no plain timm twin (expected {twin or "a dbp_ name"!r} '
                            f'to be a timm model); publish it unfolded')
        model = timm_dbp.fold(model)
        architecture = twin
        published_args = {k: v for k, v in model_args.items() if k not in _DBP_KWARGS}
    published_args.update(num_classes=model.num_classes, in_chans=data_config['input_size'][0])
    pool = getattr(getattr(model, 'global_pool', None), 'pool_type', None)
    if isinstance(pool, str) and pool:
        published_args['global_pool'] = pool
    start = None
    if args.get('initial_checkpoint') or args.get('pretrained_path'):
        start = 'a local checkpoint (--initial-checkpoint / --pretrained-path)'
    elif args.get('pretrained') and model.pretrained_cfg.get('hf_hub_id'):
        start = f'timm\'s published weights `{model.pretrained_cfg["hf_hub_id"]}`' + (
            ' (BP-trained, loaded with R = I)' if has_dbp else '')
    weights_license = weights_license or (model.pretrained_cfg.get('license') if start else None) or 'apache-2.0'
    label_names = list(FASHION_MNIST_CLASSES) if dataset_name == 'Fashion-MNIST' and model.num_classes == 10 else None
    form = 'folded (plain layers holding W R)' if fold and has_dbp else 'DBP form (W and R)' if has_dbp else 'plain'
    description = f'{trained_arch} trained with timm-dbp on {dataset_name}; weights in {form}'

    out_dir = Path(out)
    _prepare_out(out_dir)
    tensors = {k: v.detach().to('cpu').contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={'format': 'pt'})
    config = _config(model, architecture, published_args, data_config, label_names, description,
                     weights_license)
    (out_dir / CONFIG_FILE).write_text(_json_dump(config), encoding='utf-8')

    rows = _read_summary(run_dir)
    epoch = checkpoint.get('epoch')
    row = next((r for r in rows if r.get('epoch') == str(epoch)), None)
    prefix = 'eval_ema_' if use_ema else 'eval_'
    last = rows[-1] if rows and rows[-1] is not row else None
    if rows:
        shutil.copyfile(run_dir / 'summary.csv', out_dir / 'summary.csv')
    pngs = sorted(run_dir.glob('*.png')) if run_dir else []
    for png in pngs:
        shutil.copyfile(png, out_dir / png.name)
    plots, plot_note = [p.name for p in pngs], ''
    if not plots:
        plots, plot_note = _plot(rows, out_dir, f'{trained_arch} on {dataset_name}', use_ema, epoch)

    facts = CardFacts(
        repo_id=repo_id, architecture=architecture, trained_architecture=trained_arch, folded=fold and has_dbp,
        dbp=has_dbp, params=sum(p.numel() for p in model.parameters()), num_classes=model.num_classes,
        input_size=tuple(data_config['input_size']), mean=tuple(data_config['mean']), std=tuple(data_config['std']),
        interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], dataset_name=dataset_name,
        dataset_id=hub_dataset, eval_split=split, eval_images=args.get('val_num_samples'), license=weights_license,
        ema=use_ema, epoch=epoch, epochs=args.get('epochs'), top1=_float(row, prefix + 'top1'),
        top5=_float(row, prefix + 'top5'), train_time=_float(row, 'train_time'),
        last=None if last is None else dict(epoch=last.get('epoch'), top1=_float(last, prefix + 'top1'),
                                            top5=_float(last, prefix + 'top5'), train_time=_float(last, 'train_time')),
        total_train_time=_float(rows[-1], 'train_time') if rows else checkpoint.get('train_time'),
        energy_kwh=_float(rows[-1], 'train_energy_kwh') if rows else None,
        co2_kg=_float(rows[-1], 'train_co2_kg') if rows else None,
        dbp_settings=_dbp_settings(args, dbp_args) if has_dbp else {},
        recipe={k: args.get(k) for k in ('opt', 'lr', 'momentum', 'weight_decay', 'batch_size', 'sched', 'epochs',
                                          'device', 'world_size')},
        corr_first=_float(rows[0], 'train_decor_corr') if rows else None,
        corr_published=_float(row, 'train_decor_corr'), r_stats=_r_stats(dbp_state),
        command=training_command(given_args), args_yaml=yaml.safe_dump(_redacted(given_args), sort_keys=True),
        plots=plots, plot_note=plot_note, init_from=start, validate_args=_validate_args(args),
        versions={'timm-dbp': timm_dbp.__version__, 'timm': timm.__version__, 'torch': torch.__version__.split('+')[0]},
    )
    (out_dir / CARD_FILE).write_text(render_card(facts), encoding='utf-8')

    max_diff = _verify(out_dir, x, reference, exact=not facts.folded)
    return dict(out=out_dir, architecture=architecture, files=sorted(p.name for p in out_dir.iterdir()),
                folded=facts.folded, max_abs_diff=max_diff)


def _validate_args(args: Dict[str, Any]) -> str:
    """The data flags of `validate.py` for the card (the run's dataset and image size)."""
    parts = []
    if args.get('dataset'):
        parts += ['--dataset', args['dataset']]
    parts += ['--data-dir', 'DATA_DIR']
    if args.get('img_size'):
        parts += ['--img-size', str(args['img_size'])]
    return ' ' + ' '.join(parts)


def _json_dump(config: Dict[str, Any]) -> str:
    return json.dumps(config, indent=2) + '\n'


def _verify(out_dir: Path, x: torch.Tensor, reference: torch.Tensor, exact: bool) -> float:
    """Load the folder back through timm (`local-dir:`) and compare its outputs with the checkpoint's model."""
    try:
        loaded = load_model(f'local-dir:{out_dir}').eval()
    except HubLoadError as e:
        raise UserError(f'the written folder does not load back: {e}') from None
    with torch.no_grad():
        output = loaded(x)
    diff = float((output - reference).abs().max())
    ok = torch.equal(output, reference) if exact else torch.allclose(output, reference, rtol=1e-4, atol=1e-4)
    if not ok:
        raise UserError(f'the written folder {out_dir} loads back with other outputs (max |diff| {diff:.3g}); '
                        f'nothing uploaded')
    return diff


# --- the upload ----------------------------------------------------------------------------------------------------

def check_repo_id(repo_id: str) -> str:
    """ORG/NAME as the Hub accepts it, or a UserError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if not _REPO_ID.fullmatch(repo_id or ''):
        raise UserError(f'bad --repo-id {repo_id!r}: expected ORG/NAME (letters, digits, -, _, .)')
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f'bad --repo-id {repo_id!r}: {e}'.splitlines()[0]) from None
    return repo_id


def upload(
        folder: Path,
        repo_id: str,
        private: bool = False,
        overwrite_card: bool = False,
        revision: Optional[str] = None,
        commit_message: str = 'Add model',
) -> Any:
    """Create the repo if needed (exist_ok) and upload `folder` with huggingface_hub's API; a README.md already
    in the repo is kept unless `overwrite_card`. Returns upload_folder's CommitInfo."""
    api = HfApi(library_name='timm-dbp', library_version=timm_dbp.__version__)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model').repo_id
        has_card = api.file_exists(repo_id, CARD_FILE, revision=revision)
        ignore = None
        if has_card and not overwrite_card:
            ignore = [CARD_FILE]
            _logger.info(f'{repo_id} already has a model card: kept (--overwrite-card replaces it)')
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=commit_message, ignore_patterns=ignore)
    except Exception as e:  # no token, no permission, no network, ...
        detail = f'{type(e).__name__}: {e}'.strip().splitlines()[0]
        raise UserError(f'upload to {repo_id} failed: {detail} (token: $HF_TOKEN or `hf auth login`)') from None


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parser.parse_args(argv)
    repo_id = check_repo_id(args.repo_id)
    if args.dry_run and not args.out:
        raise UserError('--dry-run needs --out DIR (the folder to write)')
    with tempfile.TemporaryDirectory(prefix='hub-publish-') as tmp:
        result = export_folder(args.source, args.out or tmp, repo_id, fold=args.fold, use_ema=args.use_ema,
                               weights_license=args.license, dataset_id=args.dataset_id)
        _logger.info(f'Wrote {result["out"]}: {", ".join(result["files"])} ({result["architecture"]}, '
                     f'{"folded" if result["folded"] else "as trained"}; reloads with max |diff| '
                     f'{result["max_abs_diff"]:.3g})')
        if args.dry_run:
            _logger.info('Dry run: nothing uploaded.')
            return result
        message = args.commit_message or f'Add {result["architecture"]} weights (timm-dbp)'
        result['commit'] = upload(result['out'], repo_id, private=args.private, overwrite_card=args.overwrite_card,
                                  revision=args.revision, commit_message=message)
        _logger.info(f'Uploaded to https://huggingface.co/{repo_id}')
    return result


def run(argv: Optional[List[str]] = None) -> int:
    """main() as a command: bad input is one line on stderr and exit code 2."""
    return train.run_cli(main, 'hub.publish', argv)


if __name__ == '__main__':
    sys.exit(run())
