""" DBP optimizers: any torch optimizer plus the decorrelation update of R

`with_dbp(SGD)` returns a subclass of SGD whose `step()` first does SGD's weight update, then the local
DBP update of the decorrelation matrix R of every DBP layer whose weight it optimizes (the paper's order:
weight update, then R update). So an unmodified training loop, GradScaler (a skipped step skips the R
update too), gradient accumulation (R updates once per optimizer step) and timm's upstream train.py
(`--device-modules timm_dbp --opt dbpsgd`) all learn R.

Routing follows timm's Muon: per parameter, decided once and cached. A param group with `use_dbp=False`
never updates R; otherwise a parameter is routed to the DBP update when it is the `weight` of a
DecorConv2d / DecorLinear. DBP hyperparameters are param group entries, so groups can differ:

    decor_lr          learning rate of R (>= 0)
    kappa             0 = decorrelate, 1 = normalise variances, in between towards whitening; 'auto' = chosen per
                      layer and update from the measured errors (timm_dbp.layers.decorrelation.auto_kappa)
    decor_samples     inputs (conv patches / linear rows) sampled per layer per update, without replacement; for a
                      kron R the vectors each factor learns from
    decor_vectors_per_patch  kron R: its decor_samples vectors per factor come from decor_samples / this many patches
                      (gathering patches is the costly part of sampling); 1 = one vector per patch
    decor_interval    update R every k optimizer steps; unarmed layers sample nothing on the other steps
    decor_steps       R learns in the first k optimizer steps only, then stays fixed (no sampling, no update: the
                      step then costs only the fusion W R); None = throughout training
    decor_max_step    step cap: lr * |lambda|_max of the update's matrix is kept <= decor_max_step by shrinking the
                      step (timm_dbp.layers.decorrelation), so one decor_lr suits narrow and wide layers; None or
                      inf = off (the paper's plain rule)
    decor_max_change  updates with ||dR|| > decor_max_change * ||R|| are refused (counted as skipped)
    decor_matmul_dtype  'float32', 'bfloat16' or 'auto': operand dtype of the large products of the R update and
                      of the sample z = R x (float32 results, R kept in float32; R's narrower than 128 always multiply
                      in float32); bfloat16 products run about 4x faster where the hardware has them and round far
                      below the sample's noise (BENCHMARKS section 32); 'auto' = bfloat16 where the device multiplies
                      it natively, float32 elsewhere (timm_dbp.layers.matmul_dtype_named)
    decor_batch       update equal-shape R's (and kron factors) of all layers as one batch, up to 512 x 512 (fewer,
                      larger tensor operations; the same rule per layer, rounded differently); False updates layer
                      by layer, so each layer's R is bitwise independent of which other layers this optimizer holds

Under torch.distributed the sampled inputs are all-gathered, so every rank applies the identical update
and R stays equal across ranks without broadcasting it.
"""
import inspect
import logging
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from timm_dbp.layers import (
    DEFAULT_VECTORS_PER_PATCH, MATMUL_DTYPE_NAMES, DecorLayer, find_decor_layer, grouped_decorrelation_update_,
    matmul_dtype_named, record_decorrelation)

__all__ = ['with_dbp', 'is_dbp_optimizer', 'dbp_optimizer_of', 'NoDecorLayersWarning', 'DBP_DEFAULTS']

_logger = logging.getLogger(__name__)

DBP_DEFAULTS: Dict[str, Any] = dict(
    decor_lr=3e-3,  # BENCHMARKS sections 21, 24: 1e-2 is better on a small ResNet, worse on a short resnet50 run
    kappa=0.0,
    decor_samples=1024,
    decor_vectors_per_patch=DEFAULT_VECTORS_PER_PATCH,  # BENCHMARKS section 25: 2 or 4 gained no measurable time
    decor_interval=1,
    decor_steps=None,
    decor_max_step=0.5,  # BENCHMARKS section 24: binds only on the widest layers' first updates, keeps 1e-2 stable
    decor_max_change=1.0,
    decor_matmul_dtype='auto',  # BENCHMARKS section 32: bfloat16 products halve the update where native, same accuracy
    decor_batch=True,
)


_SEED_MOD = 2 ** 62


class NoDecorLayersWarning(UserWarning):
    """A DBP optimizer found no decorrelated layer among its parameters: it only does plain BP."""


def _validate_dbp_args(args: Dict[str, Any]) -> None:
    decor_lr, kappa = args['decor_lr'], args['kappa']
    if not (isinstance(decor_lr, (int, float)) and decor_lr >= 0):
        raise ValueError(f'decor_lr must be a number >= 0, got {decor_lr!r}')
    if not (kappa == 'auto' or (isinstance(kappa, (int, float)) and not isinstance(kappa, bool) and 0 <= kappa <= 1)):
        raise ValueError(f"kappa must be a number in [0, 1] or 'auto', got {kappa!r}")
    for name in ('decor_samples', 'decor_interval', 'decor_vectors_per_patch'):
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be an integer >= 1, got {value!r}')
    steps = args['decor_steps']
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f'decor_steps must be an integer >= 0 or None (R learns throughout), got {steps!r}')
    if not (isinstance(args['decor_matmul_dtype'], str) and args['decor_matmul_dtype'] in MATMUL_DTYPE_NAMES):
        raise ValueError(f"decor_matmul_dtype must be one of {', '.join(MATMUL_DTYPE_NAMES)}, "
                         f"got {args['decor_matmul_dtype']!r}")
    if not isinstance(args['decor_batch'], bool):
        raise ValueError(f"decor_batch must be True or False, got {args['decor_batch']!r}")
    for name in ('decor_max_step', 'decor_max_change'):
        value = args[name]
        if (value is None and name == 'decor_max_step') or (
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            continue
        off = " (or None / inf: no cap)" if name == 'decor_max_step' else ''
        raise ValueError(f'{name} must be a number > 0{off}, got {value!r}')


def _all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (n, ...) sample, truncated to the smallest n so all ranks agree."""
    n = torch.tensor([rows.shape[0]], device=rows.device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    rows = rows[:int(n.item())].contiguous()
    gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, rows)
    return torch.cat(gathered)


def _updates_at(step: int, group: Dict[str, Any]) -> bool:
    """Whether optimizer step number `step` (0-based) of a param group updates R: every decor_interval-th step,
    before decor_steps."""
    steps = group['decor_steps']
    return step % group['decor_interval'] == 0 and (steps is None or step < steps)


class DBPMixin:
    """Adds the DBP update of R to a torch optimizer. Use through `with_dbp(base_class)`."""

    def _init_dbp(self, dbp_args: Dict[str, Any], verbose: bool) -> None:
        _validate_dbp_args(dbp_args)
        self.defaults.update(dbp_args)
        self.defaults.setdefault('use_dbp', True)
        for group in self.param_groups:
            self._fill_group(group)
        self.dbp_verbose = verbose
        self.dbp_step = 0  # optimizer steps taken (saved in state_dict)
        # seed of the sampling stream (saved in state_dict); from the process seed, no draw from the global RNG
        self.dbp_seed = (torch.initial_seed() * 0x9E3779B1 + 12345) % _SEED_MOD
        self.dbp_layer_offset = 0  # index of this optimizer's first DBP layer in the whole model (pipeline stages)
        self.dbp_all_gather: Optional[bool] = None  # all-gather samples across ranks; None: when data-parallel
        self._routes: Optional[List[Tuple[DecorLayer, Dict[str, Any]]]] = None
        self._arm_layers()

    def _fill_group(self, group: Dict[str, Any]) -> None:
        for key, value in self.defaults.items():
            if key in DBP_DEFAULTS or key == 'use_dbp':
                group.setdefault(key, value)
        _validate_dbp_args(group)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, '_routes'):  # base __init__ adds its groups before DBP is set up
            self._fill_group(self.param_groups[-1])
            self._routes = None
            self._arm_layers()

    def dbp_routes(self) -> List[Tuple[DecorLayer, Dict[str, Any]]]:
        """(layer, param group) for every DBP layer whose R this optimizer updates (cached)."""
        if self._routes is None:
            routes = []
            for group in self.param_groups:
                for p in group['params']:
                    layer = find_decor_layer(p)
                    if layer is None:
                        continue
                    if not group['use_dbp']:
                        reason = 'group has use_dbp=False'
                    else:
                        routes.append((layer, group))
                        reason = f'DBP layer weight, d={layer.decor_dim}'
                    if self.dbp_verbose:
                        _logger.info(f'{type(self).__name__}: param {tuple(p.shape)} -> {reason}')
            if not routes:
                warnings.warn(
                    f'{type(self).__name__} found no decorrelated layer among its parameters and will do plain '
                    f'backprop. Build the model with a dbp_ name (timm.create_model("dbp_resnet18")) or convert it '
                    f'with timm_dbp.decorrelate(model) before creating the optimizer.',
                    NoDecorLayersWarning,
                    stacklevel=3,
                )
            self._routes = routes
        return self._routes

    def _arm_layers(self, warm_up_step: Optional[int] = None) -> None:
        """Ask layers to sample their inputs in the coming forward iff the next step updates their R (every layer
        with decor_lr > 0 for a warm-up step, see `warm_up_decorrelation`).

        Each sample gets its own seed from (dbp_seed, step, layer), so sampling is reproducible on resume and
        never draws from torch's global RNG (a DBP run sees the same data order as its BP twin). Warm-up step k
        counts as step -1 - k: its samples differ from every training step's.
        """
        step = self.dbp_step if warm_up_step is None else -1 - warm_up_step
        for index, (layer, group) in enumerate(self.dbp_routes()):
            updates_next = warm_up_step is not None or _updates_at(self.dbp_step, group)
            layer.decor_samples = group['decor_samples'] if updates_next and group['decor_lr'] > 0 else 0
            layer.decor_vectors_per_patch = group['decor_vectors_per_patch']
            layer.decor_matmul_dtype = group['decor_matmul_dtype']
            layer.decor_seed = (self.dbp_seed + 1_000_003 * step + 7919 * (self.dbp_layer_offset + index)
                                ) % _SEED_MOD

    def refresh_dbp(self) -> None:
        """Check the param groups' DBP options again and re-arm the layers for the next step: call it after changing
        an option in `param_groups` between steps (train.py's --decor-epochs sets decor_steps this way)."""
        for group in self.param_groups:
            _validate_dbp_args(group)
        self._arm_layers()

    def dbp_pipeline_stage(self, layer_offset: int, seed: int) -> None:
        """Make this the optimizer of one pipeline stage (timm_dbp.pipeline): its layers are the whole model's DBP
        layers from number `layer_offset` on, sampled with the whole model's seeds (`seed` is the same on every
        stage), and samples are never all-gathered (the other ranks hold other layers)."""
        self.dbp_layer_offset, self.dbp_seed, self.dbp_all_gather = layer_offset, seed % _SEED_MOD, False
        self._arm_layers()

    @torch.no_grad()
    def _update_decorrelation(self, warm_up_lr: Optional[float] = None) -> None:
        """One R update of every layer that sampled in the last forward: with its group's decor_lr when the group's
        interval is due, or with `warm_up_lr` in every group with decor_lr > 0 (a warm-up step)."""
        distributed = self.dbp_all_gather
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        # every layer's R (and kron factors) with the same settings in one grouped update: equal shapes are batched
        work: Dict[tuple, List[Tuple[DecorLayer, list]]] = {}
        for layer, group in self.dbp_routes():
            inputs = layer.take_decor_inputs()
            due = warm_up_lr is not None or _updates_at(self.dbp_step - 1, group)
            if inputs is None or group['decor_lr'] == 0 or not due:
                continue
            if distributed:  # a kron layer's sample is a pair of vector sets
                inputs = _all_gather_rows(inputs) if isinstance(inputs, torch.Tensor) else tuple(
                    _all_gather_rows(part) for part in inputs)
            max_step = float('inf') if group['decor_max_step'] is None else group['decor_max_step']
            decor_lr = group['decor_lr'] if warm_up_lr is None else warm_up_lr
            settings = (decor_lr, group['kappa'], group['decor_max_change'], max_step,
                        matmul_dtype_named(group['decor_matmul_dtype'], layer.decor_matrix.device))
            if not group['decor_batch']:
                settings += (layer,)  # a group of its own
            work.setdefault(settings, []).append((layer, layer.decorrelation_problems(inputs)))
        for (lr, kappa, max_change, max_step, matmul_dtype, *_), layers in work.items():
            step = grouped_decorrelation_update_(
                [problem for _, problems in layers for problem in problems], lr=lr, kappa=kappa,
                max_rel_change=max_change, max_step=max_step, decorrelated=True, matmul_dtype=matmul_dtype)
            record_decorrelation([layer for layer, _ in layers], step)

    def step(self, closure=None):
        loss = super().step(closure)
        self.dbp_step += 1
        self._update_decorrelation()
        self._arm_layers()
        return loss

    @torch.no_grad()
    def warm_up_decorrelation(self, model: nn.Module, batches: Iterable[torch.Tensor], lr: float = 0.5) -> int:
        """Learn R before training: per batch of inputs, one training-mode forward of `model` without gradients and
        one R update of every DBP layer with learning rate `lr` (each step kept <= decor_max_step by the cap, the
        other guards as in training). Weights, optimizer state and the model's other buffers (BatchNorm's running
        statistics) are left as they were; the training steps' sampling seeds are unchanged. Returns the number
        of warm-up updates.

        R starts at I and decor_lr moves it slowly (3e-3 per step), so in a short schedule the early steps train W
        on inputs that are hardly decorrelated yet; a few large capped steps on the first batches get R there first.
        """
        if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < float('inf')):
            raise ValueError(f'warm-up lr must be a finite number > 0, got {lr!r}')
        decor_state = {id(t) for layer, _ in self.dbp_routes() for t in layer.buffers()}
        others = [t for t in model.buffers() if id(t) not in decor_state]
        saved = [t.clone() for t in others]
        was_training = model.training
        model.train()
        updates = 0
        try:
            for updates, inputs in enumerate(batches, 1):
                self._arm_layers(warm_up_step=updates - 1)
                model(inputs)
                self._update_decorrelation(warm_up_lr=lr)
        finally:
            for layer, _ in self.dbp_routes():
                layer.take_decor_inputs()  # an interrupted warm-up leaves no sample behind
            for t, value in zip(others, saved):
                t.copy_(value)
            model.train(was_training)
            self._arm_layers()
        return updates

    @torch.no_grad()
    def dbp_summary(self) -> Dict[str, float]:
        """Logging summary over this optimizer's DBP layers (one host sync).

        Keys: `decor_corr`, `decor_loss` and `decor_kappa` (means over layers of the last sample's RMS
        off-diagonal correlation, decorrelation loss and kappa used, NaN before any update), `decor_updates`,
        `decor_skipped` and `decor_capped` (totals), `decor_layers` (count).
        """
        layers = [layer for layer, _ in self.dbp_routes()]
        if not layers:
            return dict(decor_corr=float('nan'), decor_loss=float('nan'), decor_kappa=float('nan'), decor_updates=0,
                        decor_skipped=0, decor_capped=0, decor_layers=0)
        means = torch.stack([torch.stack([getattr(layer, key).float() for layer in layers]).nanmean()
                             for key in ('decor_corr', 'decor_loss', 'decor_kappa')])
        counts = torch.stack([torch.stack([layer.decor_updates, layer.decor_skipped, layer.decor_capped])
                              for layer in layers]).sum(0)
        corr, loss, kappa, updates, skipped, capped = torch.cat([means.cpu(), counts.float().cpu()]).tolist()
        return dict(decor_corr=corr, decor_loss=loss, decor_kappa=kappa, decor_updates=int(updates),
                    decor_skipped=int(skipped), decor_capped=int(capped), decor_layers=len(layers))

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state['dbp'] = dict(
            step=self.dbp_step,
            seed=self.dbp_seed,
            counters=[(int(layer.decor_updates), int(layer.decor_skipped), int(layer.decor_capped))
                      for layer, _ in self.dbp_routes()],
        )
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        dbp_state = state_dict.pop('dbp', None)
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # checkpoints from a plain optimizer or an older version
            self._fill_group(group)
        self._routes = None
        if dbp_state is not None:
            self.dbp_step = int(dbp_state['step'])
            self.dbp_seed = int(dbp_state.get('seed', self.dbp_seed))
            routes = self.dbp_routes()
            if len(dbp_state['counters']) == len(routes):
                for (layer, _), (updates, skipped, *capped) in zip(routes, dbp_state['counters']):
                    layer.decor_updates.fill_(updates)
                    layer.decor_skipped.fill_(skipped)
                    layer.decor_capped.fill_(capped[0] if capped else 0)  # older checkpoints: 2 counters
        self._arm_layers()

    def __getstate__(self) -> Dict[str, Any]:
        # torch keeps only defaults / state / param_groups; layers are found again from the (copied) parameters
        return dict(super().__getstate__(), dbp_step=self.dbp_step, dbp_seed=self.dbp_seed,
                    dbp_verbose=self.dbp_verbose, dbp_layer_offset=self.dbp_layer_offset,
                    dbp_all_gather=self.dbp_all_gather)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault('dbp_step', 0)
        self.__dict__.setdefault('dbp_seed', 0)
        self.__dict__.setdefault('dbp_layer_offset', 0)
        self.__dict__.setdefault('dbp_all_gather', None)
        self.__dict__.setdefault('dbp_verbose', False)
        self._routes = None


_DBP_CLASSES: Dict[Type[Optimizer], Type[Optimizer]] = {}


def with_dbp(base_class: Type[Optimizer]) -> Type[Optimizer]:
    """The DBP version of a torch optimizer class (cached; `with_dbp(SGD) is with_dbp(SGD)`).

    The class takes the base class's arguments plus the DBP options of DBP_DEFAULTS and `verbose` (keyword-only), and
    its `__init__` signature says so (timm's factory and tests read it).

    Examples:
        >>> DBPAdamW = with_dbp(torch.optim.AdamW)
        >>> opt = DBPAdamW(model.parameters(), lr=1e-3, decor_lr=1e-4, kappa=0.5)
    """
    if not (isinstance(base_class, type) and issubclass(base_class, Optimizer)):
        raise TypeError(f'with_dbp expects a torch.optim.Optimizer subclass, got {base_class!r}')
    if issubclass(base_class, DBPMixin):
        return base_class
    if base_class in _DBP_CLASSES:
        return _DBP_CLASSES[base_class]

    base_signature = inspect.signature(base_class.__init__)
    base_names = set(base_signature.parameters)
    clashes = base_names & (set(DBP_DEFAULTS) | {'verbose'})
    dbp_names = [name for name in DBP_DEFAULTS if name not in clashes]

    def __init__(self, params, *args, verbose: bool = False, **kwargs):
        dbp_args = {name: kwargs.pop(name, DBP_DEFAULTS[name]) for name in dbp_names}
        if 'verbose' in base_names:
            kwargs['verbose'] = verbose
        base_class.__init__(self, params, *args, **kwargs)
        self._init_dbp(dbp_args, verbose)

    dbp_params = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=DBP_DEFAULTS[name]) for name in dbp_names]
    if 'verbose' not in base_names:
        dbp_params.append(inspect.Parameter('verbose', inspect.Parameter.KEYWORD_ONLY, default=False))
    base_params = list(base_signature.parameters.values())
    var_kw = [p for p in base_params if p.kind == p.VAR_KEYWORD]
    plain = [p for p in base_params if p.kind != p.VAR_KEYWORD]
    __init__.__signature__ = base_signature.replace(parameters=plain + dbp_params + var_kw)
    __init__.__doc__ = f'{base_class.__name__} arguments, plus the DBP options of timm_dbp.optim.dbp.'

    name = f'DBP{base_class.__name__}'
    if name in globals():  # two bases with one __name__: keep every class importable by name
        name = f'{name}_{base_class.__module__.replace(".", "_")}'
    cls = type(name, (DBPMixin, base_class), {'__init__': __init__, '__module__': __name__, '__qualname__': name})
    _DBP_CLASSES[base_class] = cls
    globals()[name] = cls  # picklable by qualified name
    return cls


def dbp_optimizer_of(optimizer: Any) -> Optional[DBPMixin]:
    """The DBP optimizer itself (also inside timm's Lookahead), or None for a plain optimizer."""
    base = getattr(optimizer, '_base_optimizer', optimizer)  # timm's Lookahead
    return base if isinstance(base, DBPMixin) else None


def is_dbp_optimizer(optimizer: Any) -> bool:
    """True for optimizers built by `with_dbp` (also when wrapped by timm's Lookahead)."""
    return dbp_optimizer_of(optimizer) is not None
