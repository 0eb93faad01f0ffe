""" The model card (README.md) of a published run: Hub metadata plus the facts a user needs, from a template

`render_card(facts)` fills CARD_TEMPLATE from a `CardFacts` (gathered by hub.publish from the checkpoint, args.yaml
and summary.csv). The metadata block is written with huggingface_hub's ModelCardData, so the Hub reads it as it
reads any card (library_name timm, tags, license, datasets, metrics, model-index with the top-1 / top-5 results).
"""
import dataclasses
from string import Template
from typing import Any, Dict, List, Optional, Sequence

__all__ = ['CardFacts', 'CARD_TEMPLATE', 'card_metadata', 'render_card']

CARD_TEMPLATE = Template("""\
---
$metadata
---
# Model card for $model_name

$summary

## Model details
- **Model type:** image classification / feature backbone
- **Architecture:** $architecture
- **Weights:** $weights
- **Params (M):** $params_m
- **Input:** $image
- **Dataset:** $dataset
- **Papers:**
  - Efficient Deep Learning with Decorrelated Backpropagation: https://arxiv.org/abs/2405.02385
$arch_paper- **Trained with:** $versions

## Results
$results

## DBP settings
$dbp_settings

## R statistics
$r_stats

## Accuracy vs training time
$plot

## Training
$training

## How to use
$usage

## Citation
```bibtex
@article{dalm2024dbp,
  title={Efficient Deep Learning with Decorrelated Backpropagation},
  author={Dalm, Sander and Offergeld, Joshua and Ahmad, Nasir and van Gerven, Marcel},
  journal={arXiv preprint arXiv:2405.02385},
  year={2024}
}
```
""")

_USAGE_DBP = Template("""\
The weights are in DBP form: `import timm_dbp` (the timm-dbp package) registers `$architecture` with timm first.

```python
import timm
import timm_dbp  # registers the dbp_ architectures with timm

model = timm.create_model('hf-hub:$repo_id', pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)
# logits = model(transform(image).unsqueeze(0))

plain = timm_dbp.fold(model)  # W R folded into ordinary layers: same outputs, the inference cost of $twin
```

Continue training with DBP (R keeps learning inside the optimizer step):
`timm.optim.create_optimizer_v2(model, opt='dbpsgd', lr=..., decor_lr=...)`.
Evaluate: `python validate.py --model hf-hub:$repo_id$validate_args`.""")

_USAGE_PLAIN = Template("""\
The weights are folded (every layer holds W R): an ordinary timm `$architecture`, no timm-dbp needed.

```python
import timm

model = timm.create_model('hf-hub:$repo_id', pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)
# logits = model(transform(image).unsqueeze(0))
```

To train on with DBP, `timm_dbp.decorrelate(model)` turns it into DBP form with R = I (same outputs).
Evaluate: `python validate.py --model hf-hub:$repo_id$validate_args`.""")


@dataclasses.dataclass
class CardFacts:
    """Everything the card states, gathered from the run (None: not known, and said so on the card)."""
    repo_id: str
    architecture: str  # the published architecture (the plain twin when folded)
    trained_architecture: str  # the architecture that was trained
    folded: bool
    dbp: bool  # the trained model has DBP layers
    params: int
    num_classes: int
    input_size: Sequence[int]
    mean: Sequence[float]
    std: Sequence[float]
    interpolation: str
    crop_pct: float
    dataset_name: str
    dataset_id: Optional[str]
    eval_split: str
    eval_images: Optional[int]
    license: str
    ema: bool = False
    epoch: Optional[int] = None  # epoch of the published weights
    epochs: Optional[int] = None  # epochs of the run
    top1: Optional[float] = None
    top5: Optional[float] = None
    last: Optional[Dict[str, Any]] = None  # last epoch's row, when it is not the published one
    train_time: Optional[float] = None  # cumulative training seconds at the published epoch
    total_train_time: Optional[float] = None
    energy_kwh: Optional[float] = None
    co2_kg: Optional[float] = None
    dbp_settings: Dict[str, Any] = dataclasses.field(default_factory=dict)
    recipe: Dict[str, Any] = dataclasses.field(default_factory=dict)
    corr_first: Optional[float] = None
    corr_published: Optional[float] = None
    r_stats: Dict[str, Any] = dataclasses.field(default_factory=dict)
    command: str = ''
    args_yaml: str = ''
    plots: List[str] = dataclasses.field(default_factory=list)
    plot_note: str = ''
    init_from: Optional[str] = None
    validate_args: str = ''
    versions: Dict[str, str] = dataclasses.field(default_factory=dict)


def _num(value: Optional[float], digits: int = 2) -> str:
    return 'n/a' if value is None else f'{value:.{digits}f}'


def _sci(value: Optional[float]) -> str:
    return 'n/a' if value is None else f'{value:.4g}'


def card_metadata(facts: CardFacts) -> str:
    """The YAML metadata block (without the --- fences), written by huggingface_hub's ModelCardData."""
    from huggingface_hub import EvalResult, ModelCardData
    tags = ['image-classification', 'timm', 'timm-dbp', 'dbp', 'decorrelated-backpropagation']
    tags.append('folded' if facts.folded else 'dbp-form')
    results = []
    if facts.top1 is not None:
        for metric, value in (('top-1', facts.top1), ('top-5', facts.top5)):
            if value is None:
                continue
            results.append(EvalResult(
                task_type='image-classification', dataset_type=facts.dataset_id or facts.dataset_name,
                dataset_name=facts.dataset_name, dataset_split=facts.eval_split,
                metric_type='accuracy' if metric == 'top-1' else 'top_5_accuracy',
                metric_name=f'{metric} accuracy (%)', metric_value=round(value, 3)))
    data = ModelCardData(
        library_name='timm', license=facts.license, tags=tags, pipeline_tag='image-classification',
        datasets=[facts.dataset_id] if facts.dataset_id else None, metrics=['accuracy'],
        model_name=facts.repo_id.split('/')[-1], eval_results=results or None)
    return data.to_yaml()


def _summary(f: CardFacts) -> str:
    trained = ('trained with Decorrelated Backpropagation (DBP) using timm-dbp' if f.dbp
               else 'trained with plain backpropagation (no DBP layers) using timm-dbp\'s train.py')
    text = f'A `{f.trained_architecture}` image classifier {trained} on {f.dataset_name}.'
    if f.init_from:
        text += f' Training started from {f.init_from}.'
    if f.top1 is not None:
        text += f' Top-1 {f.top1:.2f}% / top-5 {_num(f.top5)}% on {_eval_set(f)}.'
    if f.folded:
        text += (f' Published **folded**: every DBP layer\'s W R is stored as an ordinary weight, so this is a plain '
                 f'timm `{f.architecture}` with the same outputs and no DBP overhead.')
    elif f.dbp:
        text += (' Published in **DBP form**: every decorrelated layer stores W and R (the `decor_matrix` buffers'
                 + (', and `decor_spatial` for kron R' if f.dbp_settings.get('structure') == 'kron' else '')
                 + '), so training can continue with DBP.')
    return text


def _eval_set(f: CardFacts) -> str:
    size = f'{f.eval_images} images of ' if f.eval_images else ''
    return f'{size}the {f.dataset_name} {f.eval_split} split'


def _architecture(f: CardFacts) -> str:
    if f.folded:
        return f'`{f.architecture}` (timm), folded from `{f.trained_architecture}`'
    if f.dbp:
        twin = f.architecture[len('dbp_'):] if f.architecture.startswith('dbp_') else None
        return f'`{f.architecture}`' + (f' (timm\'s `{twin}` with DBP layers)' if twin else ' (with DBP layers)')
    return f'`{f.architecture}`'


def _weights(f: CardFacts) -> str:
    which = 'EMA weights' if f.ema else 'weights'
    epoch = f' of epoch {f.epoch}' if f.epoch is not None else ''
    form = ('folded (plain layers holding W R; no DBP buffers)' if f.folded
            else 'DBP form (W and R per decorrelated layer)' if f.dbp else 'plain')
    return f'{which}{epoch}, {form}; `model.safetensors` (safetensors only, no pickle)'


def _image(f: CardFacts) -> str:
    c, h, w = f.input_size
    mean = ', '.join(f'{m:.4g}' for m in f.mean)
    std = ', '.join(f'{s:.4g}' for s in f.std)
    return (f'{c} channel{"s" if c != 1 else ""}, {h} x {w}; mean ({mean}), std ({std}), {f.interpolation} '
            f'interpolation, crop_pct {f.crop_pct:g} (recorded in config.json pretrained_cfg)')


def _dataset(f: CardFacts) -> str:
    hub = f' ([{f.dataset_id}](https://huggingface.co/datasets/{f.dataset_id}))' if f.dataset_id else ''
    return f'{f.dataset_name}{hub}, {f.num_classes} classes; evaluated on {_eval_set(f)}'


def _results(f: CardFacts) -> str:
    if f.top1 is None:
        return 'No evaluation results: the run folder has no summary.csv row for these weights.'
    lines = [
        f'Evaluated by train.py on {_eval_set(f)} (summary.csv' + (', EMA columns' if f.ema else '') + '):',
        '',
        '| weights | epoch | top-1 (%) | top-5 (%) | training time (s) |',
        '| --- | ---: | ---: | ---: | ---: |',
        f'| published | {f.epoch} | {f.top1:.2f} | {_num(f.top5)} | {_num(f.train_time, 1)} |',
    ]
    if f.last:
        lines.append(f'| last epoch (not published) | {f.last["epoch"]} | {_num(f.last.get("top1"))} | '
                     f'{_num(f.last.get("top5"))} | {_num(f.last.get("train_time"), 1)} |')
    lines.append('')
    lines.append(f'Training time is the cumulative wall-clock of the training epochs (evaluation excluded)'
                 f'{"; the whole run: " + _num(f.total_train_time, 1) + " s" if f.total_train_time else ""}.')
    if f.energy_kwh is not None:
        lines.append(f'Energy of the training epochs: {_sci(f.energy_kwh)} kWh, {_sci(f.co2_kg)} kg CO2eq '
                     f'(codecarbon, summary.csv train_energy_kwh / train_co2_kg).')
    return '\n'.join(lines)


def _dbp_settings(f: CardFacts) -> str:
    if not f.dbp:
        return 'None: the trained model has no DBP layers.'
    s = f.dbp_settings
    rows = [
        ('decor_lr', s.get('decor_lr'), 'learning rate of R'),
        ('kappa', s.get('kappa'), '0 = decorrelate only, 1 = normalise variances only, auto = per layer'),
        ('decor_samples', s.get('decor_samples'), 'inputs sampled per layer per R update'),
        ('decor_interval', s.get('decor_interval'), 'R updated every k optimizer steps'),
        ('R learned in', s.get('decor_learns', 'all of training'),
         'then fixed: no sampling, no R update (train.py --decor-epochs, optimizer decor_steps)'),
        ('decor_vectors_per_patch', s.get('decor_vectors_per_patch'),
         'kron R: vectors per factor from each sampled patch'),
        ('decor_max_step', 'off' if s.get('decor_max_step') in (None, float('inf')) else s.get('decor_max_step'),
         'step cap: decor_lr * |lambda|_max of the update kept <= this (off: the paper\'s plain rule)'),
        ('decor_matmul_dtype', s.get('decor_matmul_dtype'), 'operand dtype of the R update\'s matrix products'),
        ('R structure (dbp_structure)', s.get('structure'), 'full: (c·s)² per conv; channel: c²; kron: c² and s²'),
        ('dbp_exclude', list(s.get('exclude') or []) or 'none', 'layers kept plain'),
        ('dbp_max_dim', s.get('max_dim') or 'none', 'layers with a larger input dimension kept plain'),
        ('dbp_kron_max_dim', s.get('kron_max_dim') or 'none', 'kron: wider convs take a channel R'),
        ('dbp_block_size', s.get('block_size') or 'none', 'R over more channels is block-diagonal, blocks of at most '
         'this many'),
        ('dbp_linear', s.get('linear'), 'classifier decorrelated too'),
    ]
    lines = ['| setting | value | meaning |', '| --- | --- | --- |']
    lines += [f'| {name} | {value} | {meaning} |' for name, value, meaning in rows]
    r = f.recipe
    lines += ['', f'Optimizer `{r.get("opt")}` (lr {r.get("lr")}, momentum {r.get("momentum")}, weight decay '
                  f'{r.get("weight_decay")}), batch size {r.get("batch_size")} x {r.get("world_size", 1)} '
                  f'process(es), `{r.get("sched")}` schedule, {r.get("epochs")} epoch(s), on {r.get("device")}.']
    return '\n'.join(lines)


def _r_stats(f: CardFacts) -> str:
    if not f.dbp:
        return 'None: the trained model has no DBP layers.'
    r = f.r_stats
    lines = [f'- DBP layers: {r.get("layers")}; R holds {r.get("entries"):,} numbers ({r.get("mib", 0):.2f} MiB)'
             + (' (folded into the weights here)' if f.folded else '')]
    if f.corr_published is not None:
        first = f'{f.corr_first:.4f} after the first epoch, ' if f.corr_first is not None and f.epoch else ''
        lines.append(
            f'- Mean off-diagonal correlation of the decorrelated layer inputs z = R x: {first}'
            f'{f.corr_published:.4f} at the published epoch (summary.csv `train_decor_corr`: the RMS off-diagonal '
            f'correlation of the last sampled inputs, averaged over the DBP layers; independent inputs give about '
            f'1/sqrt(samples))')
    else:
        lines.append('- Mean off-diagonal correlation: not recorded (no summary.csv `train_decor_corr`)')
    lines.append(f'- Distance of R from the identity, ||R - I||_F / ||I||_F: mean {r.get("mean_dist", 0):.4f}, '
                 f'max {r.get("max_dist", 0):.4f} (`{r.get("max_layer")}`) over the '
                 f'{"R factors" if f.dbp_settings.get("structure") == "kron" else "layers"}')
    return '\n'.join(lines)


def _plot(f: CardFacts) -> str:
    if f.plots:
        return '\n\n'.join(f'![accuracy vs training time]({name})' for name in f.plots)
    return f.plot_note or 'No plot.'


def _training(f: CardFacts) -> str:
    return '\n'.join([
        'Trained with timm-dbp\'s `train.py` (timm\'s flags). The command, from the run\'s args.yaml (flags at '
        'their defaults left out, local paths replaced by placeholders):',
        '',
        '```bash',
        f.command,
        '```',
        '',
        '<details><summary>All training arguments (args.yaml)</summary>',
        '',
        '```yaml',
        f.args_yaml.rstrip(),
        '```',
        '',
        '</details>',
    ])


def _usage(f: CardFacts) -> str:
    template = _USAGE_PLAIN if f.folded or not f.dbp else _USAGE_DBP
    twin = f.architecture[len('dbp_'):] if f.architecture.startswith('dbp_') else f.architecture
    return template.substitute(
        architecture=f.architecture, repo_id=f.repo_id, twin=f'a plain `{twin}`', validate_args=f.validate_args)


def render_card(facts: CardFacts) -> str:
    """The README.md of a published run."""
    f = facts
    versions = ', '.join(f'{name} {version}' for name, version in f.versions.items())
    arch_paper = ('  - Deep Residual Learning for Image Recognition: https://arxiv.org/abs/1512.03385\n'
                  if 'resnet' in f.architecture else '')
    return CARD_TEMPLATE.substitute(
        metadata=card_metadata(f).rstrip(), model_name=f.repo_id.split('/')[-1], summary=_summary(f),
        architecture=_architecture(f), weights=_weights(f), params_m=f'{f.params / 1e6:.2f}', image=_image(f),
        dataset=_dataset(f), arch_paper=arch_paper, versions=versions, results=_results(f),
        dbp_settings=_dbp_settings(f), r_stats=_r_stats(f), plot=_plot(f), training=_training(f), usage=_usage(f))
