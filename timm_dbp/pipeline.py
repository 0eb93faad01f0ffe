""" Decoupled pipeline training: one module of a timm model per rank, trained on delayed gradients (FDG / ADL)

Backpropagation locks every layer: with a model split over K devices, each waits for the others. Decoupled learning
(Zhuang et al., FDG: "Fully Decoupled Neural Network Learning Using Delayed Gradients", TNNLS 2021; ADL:
"Accumulated Decoupled Learning", arXiv 2012.03747) lets the K modules run at the same time on gradients that arrive
late. The schedule here, for rank k of K with hop latency D ticks (`delay`) and accumulation over M batches (`accum`):

    tick t:  forward   batch b = t - k D      (its input left rank k - 1 at tick t - D; rank 0 reads the loader)
             backward  batch b = t - (2K - 2 - k) D   (the gradient of its output left rank k + 1 at tick t - D)
             step      when that batch closes an accumulation window (windows are batches jM .. jM + M - 1)

so module k back-propagates batch b L_k = 2 D (K - 1 - k) ticks after it forwarded it, through the graph of that
forward: the gradient is evaluated at the weights (and DBP matrices R) the module had then, 2 D (K - 1 - k) ticks ago.
That is the delayed gradient; with M = 1 it is exactly that many optimizer steps stale (fewer at the start of an
epoch, while the pipeline fills). D = 0 is locked backpropagation over K ranks: bit-identical to ordinary training
with --grad-accum-steps M when R is updated layer by layer (DBP optimizer option decor_batch=False; the default
batches equal-shape R's of one rank's layers, which rounds differently from batching the whole model's). D = 1 is
FDG: every rank computes every tick. D > 1 only adds staleness (for studies).
ADL's accumulation M divides the staleness counted in optimizer steps by about M. FDG's gradient shrinking multiplies
the gradient a delayed module receives by `shrink` (beta <= 1) before back-propagating it.

Every epoch ends with the pipeline flushed (all gradients of its batches applied), so checkpoints hold no in-flight
state. Messages go through torch.distributed point-to-point calls (gloo on CPU, NCCL on GPU): one message per tick on
each link, so both ends always agree on which tick a message belongs to.

`split_model` cuts a timm model at its stage boundaries (feature_info) where the model's forward_features is the plain
sequence of its child modules (ResNet, ConvNeXt, EfficientNet, MobileNetV3, RegNet, ...); it checks that the pieces
compute exactly what the model computes and refuses models whose forward is not such a sequence (ViT: the class token
and position embedding are added between children).
"""
import collections
import contextlib
import copy
import itertools
import statistics
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from timm_dbp.layers import decor_layers

__all__ = ['PipelineStage', 'DecoupledTrainer', 'split_model', 'stage_boundaries']


@contextlib.contextmanager
def _evaluating(model: nn.Module):
    """`model` in eval mode without gradients; its training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class PipelineStage(nn.Module):
    """A run of a timm model's child modules (`body`); the last stage also owns the head and ends with the model's
    own forward_head. `owned` are the model's state_dict prefixes this stage holds."""

    def __init__(self, names: Sequence[str], body: Sequence[nn.Module], head: Sequence[Tuple[str, nn.Module]] = (),
                 forward_head: Optional[Callable] = None):
        super().__init__()
        self.body = nn.ModuleList(body)
        self.head = nn.ModuleList([module for _, module in head])
        self.owned = list(names) + [name for name, _ in head]
        self._forward_head = forward_head  # a bound method of the whole model: not a submodule, not in state_dict

    @property
    def is_last(self) -> bool:
        return self._forward_head is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.body:
            x = module(x)
        return self._forward_head(x) if self._forward_head is not None else x

    def owns(self, key: str) -> bool:
        """Whether the whole model's state_dict `key` belongs to this stage."""
        return any(key == name or key.startswith(name + '.') for name in self.owned)


def _flat_children(model: nn.Module, feature_modules: Sequence[str]) -> List[Tuple[str, nn.Module]]:
    """The model's children in order; a container child that holds feature modules (timm's `stages`, `blocks`) is
    replaced by its own children, as timm's feature extraction does."""
    flat = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and any(f.startswith(name + '.') for f in feature_modules):
            flat.extend((f'{name}.{sub}', module) for sub, module in child.named_children())
        else:
            flat.append((name, child))
    return flat


def stage_boundaries(
        model: nn.Module,
        sample_input: torch.Tensor,
) -> Tuple[List[Tuple[str, nn.Module]], List[int], int]:
    """Where `model` may be cut: (flattened children, cut positions, end of the feature children).

    A cut at position i puts children[:i] before it. Cuts follow the model's feature_info stages; the children from
    the end position on are the head (run by forward_head). Raises ValueError, saying why, for a model without stage
    information or one whose forward_features is not the sequence of its children (checked on `sample_input`)."""
    feature_info = getattr(model, 'feature_info', None)
    modules = [f.get('module', '') for f in feature_info] if isinstance(feature_info, (list, tuple)) else []
    if not modules or not all(modules) or not hasattr(model, 'forward_features') or not hasattr(model, 'forward_head'):
        raise ValueError(f'{type(model).__name__} has no stage information (feature_info with module names, '
                         f'forward_features and forward_head): it cannot be split into pipeline stages')
    children = _flat_children(model, modules)
    names = [name for name, _ in children]
    cuts = sorted({names.index(m) + 1 for m in modules if m in names})
    if not cuts:
        raise ValueError(f'{type(model).__name__}: none of its feature_info modules ({", ".join(modules)}) is a '
                         f'top-level stage, so it cannot be split at its stages')
    end, reason = None, ''
    try:
        with _evaluating(model):
            target = model.forward_features(sample_input)
            x = sample_input
            for i, (_, module) in enumerate(children):
                x = module(x)
                same = isinstance(x, torch.Tensor) and x.shape == target.shape and torch.equal(x, target)
                if i + 1 >= cuts[-1] and same:
                    end = i + 1
                    break
    except Exception as e:  # a child that cannot take its predecessor's output: not a sequence
        reason = f' ({type(e).__name__}: {e})'.splitlines()[0]
    if end is None:
        raise ValueError(f'{type(model).__name__} cannot be split into pipeline stages: its forward_features is not '
                         f'the sequence of its child modules{reason}')
    return children, [c for c in cuts if c <= end], end


def _child_costs(model: nn.Module, children: List[Tuple[str, nn.Module]], end: int, x: torch.Tensor,
                 balance: str) -> List[float]:
    """The cost of each feature child, then of the head (one number for children[end:])."""
    if balance not in ('macs', 'time'):
        raise ValueError(f"balance must be 'macs' or 'time', got {balance!r}")
    was_training = model.training
    costs = []
    try:
        for _, module in children[:end]:
            cost, x = _module_macs(module.eval(), x) if balance == 'macs' else _module_seconds(module, x)
            costs.append(cost)
        if balance == 'macs':
            costs.append(sum(_head_macs(m) for _, m in children[end:]))
        else:  # the head in eval mode (no BatchNorm statistics change), its gradients cleared after
            head_params = [p for _, m in children[end:] for p in m.parameters()]
            costs.append(_module_seconds(model.eval().forward_head, x, keep=False)[0])
            for p in head_params:
                p.grad = None
    finally:
        model.train(was_training)
    return costs


def _module_seconds(
        module: Callable,
        x: torch.Tensor,
        repeats: int = 3,
        keep: bool = True,
) -> Tuple[float, torch.Tensor]:
    """Median seconds of forward + backward of `module` (a training-mode deep copy unless keep=False) on x."""
    if keep:
        module = copy.deepcopy(module).train()
    x = x.detach().requires_grad_()
    seconds = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = module(x.clone())  # a non-leaf: the child may start with an in-place op (ReLU(inplace=True))
        out.float().sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), out.detach()


def _module_macs(module: nn.Module, x: torch.Tensor) -> Tuple[float, torch.Tensor]:
    """Multiply-accumulates of the Conv2d / Linear layers of a child run on x (a deterministic cost estimate)."""
    total = [0.0]

    def count(layer: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(layer, nn.Conv2d):
            total[0] += out.numel() * layer.weight[0].numel()
        elif isinstance(layer, nn.Linear):
            total[0] += out.numel() * layer.in_features

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            out = module(x)
    finally:
        for hook in hooks:
            hook.remove()
    return total[0], out


def split_model(model: nn.Module, num_stages: int, sample_input: torch.Tensor,
                cuts: Optional[Sequence[Union[int, str]]] = None, balance: str = 'macs') -> List[PipelineStage]:
    """Cut a timm model into `num_stages` PipelineStages at stage boundaries.

    `cuts`: where, as the names of the stage modules to cut after (e.g. ['layer2'] for a ResNet) or positions in the
    flattened children; by default the cuts that minimise the largest stage cost on `sample_input`: with
    balance='macs' the Conv2d / Linear multiply-accumulates (deterministic: every rank finds the same cuts), with
    'time' the measured forward + backward seconds (closer to the truth: a DBP layer's W R costs out * d^2 per step
    whatever the batch, which dominates late stages at small images; measure on one rank and hand its cuts to the
    others).
    The stages share the model's modules (the model's state_dict still names every tensor). Checked: chained, the
    stages compute exactly model(sample_input) in eval mode. Raises ValueError with the reason when the model cannot be
    split that way (no stage information, not a sequence, more stages than boundaries + 1)."""
    if num_stages < 1:
        raise ValueError(f'the number of pipeline stages must be >= 1, got {num_stages}')
    children, boundaries, end = stage_boundaries(model, sample_input)
    boundaries = [b for b in boundaries if 0 < b < len(children)]
    if num_stages > len(boundaries) + 1:
        raise ValueError(f'{type(model).__name__} has {len(boundaries) + 1} stages at most (cuts after '
                         f'{", ".join(children[b - 1][0] for b in boundaries)}); asked for {num_stages}')
    if cuts is None:
        costs = _child_costs(model, children, end, sample_input, balance)
        prefix = [0.0] + list(itertools.accumulate(costs))

        def largest(split: Tuple[int, ...]) -> float:
            edges = (0,) + split + (len(costs),)
            return max(prefix[b] - prefix[a] for a, b in zip(edges, edges[1:]))

        cuts = min(itertools.combinations(boundaries, num_stages - 1), key=largest)
    names = [name for name, _ in children]
    allowed = ', '.join(names[b - 1] for b in boundaries)
    unknown = [c for c in cuts if isinstance(c, str) and c not in names]
    if unknown:
        raise ValueError(f'cannot cut after {", ".join(unknown)}: the stages of {type(model).__name__} end at '
                         f'{allowed}')
    cuts = [names.index(c) + 1 if isinstance(c, str) else c for c in cuts]
    if sorted(set(cuts)) != cuts or any(c not in boundaries for c in cuts) or len(cuts) != num_stages - 1:
        raise ValueError(f'bad cuts {cuts}: need {num_stages - 1} increasing cut(s) after stages among {allowed}')
    edges = [0] + cuts + [end]
    stages = []
    for k, (a, b) in enumerate(zip(edges, edges[1:])):
        last = k == num_stages - 1
        body = children[a:b]
        stages.append(PipelineStage(
            [n for n, _ in body], [m for _, m in body], head=children[end:] if last else (),
            forward_head=model.forward_head if last else None))
    _check_split(model, stages, sample_input)
    return stages


def _head_macs(module: nn.Module) -> float:
    return float(sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))))


def _check_split(model: nn.Module, stages: List[PipelineStage], x: torch.Tensor) -> None:
    keys = list(model.state_dict().keys())
    owners = {key: [k for k, stage in enumerate(stages) if stage.owns(key)] for key in keys}
    stray = [key for key, owner in owners.items() if len(owner) != 1]
    if stray:
        raise ValueError(f'{type(model).__name__} cannot be split into pipeline stages: {len(stray)} tensor(s) belong '
                         f'to no stage or to several, e.g. {stray[0]}')
    with _evaluating(model):
        expected, y = model(x), x
        for stage in stages:
            y = stage(y)
    if not torch.equal(y, expected):
        raise ValueError(f'{type(model).__name__} cannot be split into pipeline stages: the chained stages differ from '
                         f'the model by {float((y - expected).abs().max()):.3g}')


# ---------------------------------------------------------------------------------------------------------------------
# Messages: one per tick on each link; a fixed-size int64 header says what follows

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool,
           torch.uint8]
_MAX_TENSORS, _MAX_DIMS = 4, 6
_HEADER = 2 + _MAX_TENSORS * (2 + _MAX_DIMS)  # present, batch index, then per tensor: dtype, ndim, dims


class _Link:
    """Messages to and from one neighbouring rank. A message is (batch index, tensors) or None (nothing this tick).
    Sends never block (isend); at most `window` sends are in flight before the oldest is waited on. Each direction
    has its own process group: NCCL runs the point-to-point calls of one communicator in order, so activations going
    one way and gradients coming back on one communicator would wait on each other (deadlock)."""

    def __init__(self, peer: int, device: torch.device, window: int, send_group=None, recv_group=None):
        self.peer, self.device, self.window = peer, device, window + 1
        self.send_group, self.recv_group = send_group, recv_group
        self.pending = collections.deque()
        self.wait_seconds = 0.0  # time blocked in recv: the neighbour was behind

    def send(self, batch: int, tensors: Optional[Sequence[torch.Tensor]]) -> None:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        if tensors is not None:
            header[0], header[1] = 1, batch
            for i, t in enumerate(tensors):
                if t.dim() > _MAX_DIMS or i >= _MAX_TENSORS:
                    raise ValueError(f'pipeline message too large: {len(tensors)} tensors, shapes '
                                     f'{[tuple(x.shape) for x in tensors]}')
                base = 2 + i * (2 + _MAX_DIMS)
                header[base], header[base + 1] = _DTYPES.index(t.dtype), t.dim()
                header[base + 2:base + 2 + t.dim()] = torch.tensor(t.shape)
            header[2 + len(tensors) * (2 + _MAX_DIMS)] = -1  # end marker (dtype slot of the next tensor)
        payload = [header.to(self.device)] + [t.detach().contiguous() for t in tensors or []]
        self.pending.append([dist.isend(t, self.peer, group=self.send_group) for t in payload] + payload)
        while len(self.pending) > self.window:
            self._wait_oldest()

    def recv(self) -> Optional[Tuple[int, List[torch.Tensor]]]:
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        start = time.perf_counter()
        dist.recv(header, self.peer, group=self.recv_group)
        header = header.cpu()
        self.wait_seconds += time.perf_counter() - start
        if header[0] == 0:
            return None
        tensors = []
        for i in range(_MAX_TENSORS):
            base = 2 + i * (2 + _MAX_DIMS)
            if header[base] < 0:
                break
            shape = header[base + 2:base + 2 + int(header[base + 1])].tolist()
            t = torch.empty(shape, dtype=_DTYPES[int(header[base])], device=self.device)
            dist.recv(t, self.peer, group=self.recv_group)
            tensors.append(t)
        return int(header[1]), tensors

    def _wait_oldest(self) -> None:
        for item in self.pending.popleft():
            if not isinstance(item, torch.Tensor):
                item.wait()

    def flush(self) -> None:
        while self.pending:
            self._wait_oldest()


def _link_groups(num_stages: int) -> Tuple[List[Any], List[Any]]:
    """Two process groups per neighbouring pair (k, k + 1): one for activations, one for gradients. Every rank makes
    every group, in the same order (new_group is collective). None without torch.distributed (one stage, tests)."""
    if num_stages == 1 or not (dist.is_available() and dist.is_initialized()):
        return [None] * num_stages, [None] * num_stages
    forward, backward = [], []
    for k in range(num_stages - 1):
        forward.append(dist.new_group([k, k + 1]))
        backward.append(dist.new_group([k, k + 1]))
    return forward, backward


# ---------------------------------------------------------------------------------------------------------------------
# The trainer

class DecoupledTrainer:
    """Runs this rank's PipelineStage in the decoupled schedule (see the module docstring).

    Args:
        stages: all K stages of the model (split_model); this rank trains stages[rank] (its parameters on `device`).
        rank: this process's place in the pipeline (0 reads the data, the last computes the loss).
        delay: D, hop latency in ticks (0: locked backpropagation, 1: FDG).
        accum: M, batches per optimizer step (ADL's accumulation; timm's --grad-accum-steps).
        shrink: FDG's gradient shrinking factor for delayed modules (1: none).
    """

    def __init__(self, stages: Sequence[PipelineStage], rank: int, device: torch.device, delay: int = 1,
                 accum: int = 1, shrink: float = 1.0):
        if delay < 0 or accum < 1 or not 0 < shrink <= 1:
            raise ValueError(f'need delay >= 0, accum >= 1, 0 < shrink <= 1; got {delay}, {accum}, {shrink}')
        if shrink != 1 and delay == 0:
            raise ValueError('gradient shrinking is for delayed gradients: it needs delay >= 1')
        num_stages, stage = len(stages), stages[rank]
        self.stages = list(stages)
        self.stage, self.rank, self.num_stages, self.device = stage, rank, num_stages, device
        self.decor_layer_offset = sum(len(list(decor_layers(s))) for s in stages[:rank])
        self.delay, self.accum, self.shrink = delay, accum, shrink
        self.lag = 2 * delay * (num_stages - 1 - rank)  # ticks between forward and backward of one batch here
        self.first, self.last = rank == 0, rank == num_stages - 1
        window = 2 * delay + 1
        forward, backward = _link_groups(num_stages)  # per neighbouring pair: activations, gradients
        self.to_next = None if self.last else _Link(rank + 1, device, window, forward[rank], backward[rank])
        self.to_prev = None if self.first else _Link(rank - 1, device, window, backward[rank - 1], forward[rank - 1])
        self.version = 0  # optimizer steps of this stage
        self.staleness = collections.Counter()  # optimizer steps between a batch's forward and its update -> batches
        self._params = [(n, p) for n, p in stage.named_parameters() if p.requires_grad]
        self._decor_buffers = [(f'{n}.{b}', t) for n, layer in decor_layers(stage)  # what a DBP forward reads
                               for b, t in layer.named_buffers(recurse=False) if b in ('decor_matrix', 'decor_spatial')]
        self._snapshot: Optional[Tuple[int, Dict[str, torch.Tensor]]] = None

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make a DBP optimizer of this stage sample like the whole model's optimizer would: the same seeds on every
        rank (rank 0's), layer numbers continuing across stages, no all-gather (ranks hold different layers)."""
        from timm_dbp.optim import dbp_optimizer_of  # the optimizer package imports the layers: import here
        dbp = dbp_optimizer_of(optimizer)
        if dbp is None:
            return
        seed = torch.tensor([dbp.dbp_seed], dtype=torch.int64, device=self.device)
        if self.num_stages > 1:
            dist.broadcast(seed, 0)
        dbp.dbp_pipeline_stage(self.decor_layer_offset, int(seed))

    # -- one stage's forward and backward -----------------------------------------------------------------------------
    def _weights(self) -> Optional[Dict[str, torch.Tensor]]:
        """The tensors the forward reads, as they are now: copies when the backward comes after an optimizer step
        (a delayed gradient is evaluated at the weights of its forward), None (the live tensors) when it never does."""
        if self.lag == 0:
            return None
        if self._snapshot is None or self._snapshot[0] != self.version:
            weights = {n: p.detach().clone().requires_grad_() for n, p in self._params}
            weights.update({n: b.detach().clone() for n, b in self._decor_buffers})
            self._snapshot = (self.version, weights)
        return self._snapshot[1]

    def _forward(self, x: torch.Tensor, autocast) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        weights = self._weights()
        if x.requires_grad:  # a received activation (a leaf): a stage may start with an in-place op
            x = x.clone()
        with autocast():
            if weights is None:
                return self.stage(x), None
            return torch.func.functional_call(self.stage, weights, (x,), strict=False), weights

    def _backward(
            self,
            record: dict,
            grad_output: Optional[torch.Tensor],
            loss: Optional[torch.Tensor],
    ) -> Optional[torch.Tensor]:
        """Gradients of one stored forward: accumulated into the live parameters' .grad; returns d/d(input)."""
        weights = record['weights']
        params = [p for _, p in self._params] if weights is None else [weights[n] for n, _ in self._params]
        x = record['input']
        inputs = ([x] if x.requires_grad else []) + params
        if loss is not None:
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        else:
            grads = torch.autograd.grad(record['output'], inputs, grad_output.to(record['output'].dtype),
                                        allow_unused=True)
        grad_input = grads[0] if x.requires_grad else None
        for (_, p), g in zip(self._params, grads[len(inputs) - len(params):]):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        return grad_input

    # -- epochs --------------------------------------------------------------------------------------------------------
    def _window(self, batch: int, num_batches: int) -> Tuple[int, bool]:
        """(size of the accumulation window holding `batch`, whether `batch` closes it)."""
        start = batch - batch % self.accum
        size = min(self.accum, num_batches - start)
        return size, batch == start + size - 1

    def train_epoch(self, batches: Optional[Iterable], num_batches: int, optimizer: torch.optim.Optimizer,
                    loss_fn: Callable, on_update: Optional[Callable[[int], None]] = None,
                    on_log: Optional[Callable[[int, float, float], None]] = None, log_interval: int = 50,
                    autocast=contextlib.nullcontext, prepare: Optional[Callable] = None) -> Dict[str, Any]:
        """One epoch of `num_batches` batches through the pipeline, flushed at the end.

        Only rank 0 passes `batches` (an iterable of (input, target)); `prepare(input, target)` may transform them
        there (device, mixup, channels_last). Every rank calls `on_update(num_updates_this_epoch)` after each of its
        optimizer steps (the LR schedule), the last rank `on_log(update, loss_avg, img/s)` every `log_interval`
        updates. Returns loss (the mean training loss, known on every rank), epoch_time, staleness (this stage's
        {optimizer steps between a batch's forward and its update: batches}, this epoch) and wait_time (seconds this
        rank sat waiting for a neighbour's message: the imbalance of the split)."""
        K, D, k = self.num_stages, self.delay, self.rank
        iterator: Optional[Iterator] = iter(batches) if self.first else None
        stored = collections.deque()  # forwards waiting for their gradient: dicts of batch, input, output, weights
        loss_sum, seen, updates, start = 0.0, 0, 0, time.time()
        staleness_before = collections.Counter(self.staleness)
        links = [link for link in (self.to_prev, self.to_next) if link is not None]
        wait_before = sum(link.wait_seconds for link in links)
        self.stage.train()
        optimizer.zero_grad()
        num_ticks = num_batches + 2 * D * (K - 1)
        for tick in range(num_ticks):
            # forward: batch tick - k D
            batch = tick - k * D
            message = None
            if self.first:
                if 0 <= batch < num_batches:
                    x, target = next(iterator)
                    if prepare is not None:
                        x, target = prepare(x, target)
                    message = (batch, [x, target])
            elif tick >= D:
                message = self.to_prev.recv()
            if message is not None:
                got, (x, target) = message
                if got != batch:
                    raise RuntimeError(f'pipeline out of step: rank {k} expected batch {batch} at tick {tick}, '
                                       f'got {got}')
                if not self.first:
                    x.requires_grad_()
                out, weights = self._forward(x, autocast)
                record = dict(batch=batch, input=x, output=out, weights=weights, version=self.version)
                if self.last:
                    size, _ = self._window(batch, num_batches)
                    with autocast():
                        loss = loss_fn(out, target)
                    loss_sum += float(loss.detach()) * x.shape[0]
                    seen += x.shape[0]
                    grad_input = self._backward(record, None, loss / size)
                    if not self.first:
                        self.to_prev.send(batch, [grad_input])
                    updates += self._after_backward(record, num_batches, optimizer, on_update, updates)
                    if on_log is not None and self._window(batch, num_batches)[1] and (
                            (updates - 1) % log_interval == 0 or batch == num_batches - 1):
                        on_log(updates - 1, loss_sum / seen, seen / max(time.time() - start, 1e-9))
                else:
                    stored.append(record)
                    self.to_next.send(batch, [out, target])
            elif not self.last:
                self.to_next.send(batch, None)
            elif not self.first:
                self.to_prev.send(batch, None)

            # backward: batch tick - (2K - 2 - k) D, for every rank but the last (which did it with its forward)
            if self.last:
                continue
            batch = tick - (2 * K - 2 - k) * D
            message = self.to_next.recv() if tick >= D else None
            if message is None:
                if not self.first:
                    self.to_prev.send(batch, None)
                continue
            got, (grad_output,) = message
            record = stored.popleft()
            if got != batch or record['batch'] != batch:
                raise RuntimeError(f'pipeline out of step: rank {k} expected the gradient of batch {batch} at tick '
                                   f'{tick}, got {got} (stored {record["batch"]})')
            if self.lag > 0 and self.shrink != 1:
                grad_output = grad_output * self.shrink
            grad_input = self._backward(record, grad_output, None)
            if not self.first:
                self.to_prev.send(batch, [grad_input])
            updates += self._after_backward(record, num_batches, optimizer, on_update, updates)

        # the messages of the last D ticks are still on the links: all empty, read them so the next epoch starts clean
        for _ in range(D):
            for link in (self.to_prev, self.to_next):
                if link is not None and link.recv() is not None:
                    raise RuntimeError(f'pipeline out of step: rank {k} found a message after the epoch')
        for link in (self.to_prev, self.to_next):
            if link is not None:
                link.flush()
        if stored:
            raise RuntimeError(f'pipeline out of step: rank {k} ends the epoch with {len(stored)} unapplied batches')
        loss = self._from_last([loss_sum / max(seen, 1)])[0]
        staleness = dict(sorted((self.staleness - staleness_before).items()))  # this epoch's
        return dict(loss=loss, epoch_time=time.time() - start, staleness=staleness,
                    wait_time=sum(link.wait_seconds for link in links) - wait_before)

    def _after_backward(self, record: dict, num_batches: int, optimizer, on_update, updates: int) -> int:
        """Step when the batch closes its window; returns the number of steps taken (0 or 1)."""
        _, closes = self._window(record['batch'], num_batches)
        self.staleness[self.version - record['version']] += 1
        if not closes:
            return 0
        optimizer.step()
        optimizer.zero_grad()
        self.version += 1
        if on_update is not None:
            on_update(updates + 1)
        return 1

    @torch.no_grad()
    def evaluate(
            self,
            batches: Optional[Iterable],
            num_batches: int,
            loss_fn: Callable,
            autocast=contextlib.nullcontext,
            prepare: Optional[Callable] = None,
    ) -> Dict[str, float]:
        """Forward-only pass of `num_batches` batches (rank 0 passes them); loss, top1, top5 on every rank."""
        self.stage.eval()
        iterator = iter(batches) if self.first else None
        totals = torch.zeros(4, dtype=torch.float64)  # loss * n, correct@1, correct@5, n
        for batch in range(num_batches):
            if self.first:
                x, target = next(iterator)
                if prepare is not None:
                    x, target = prepare(x, target)
            else:
                got, (x, target) = self.to_prev.recv()
                assert got == batch
            with autocast():
                out = self.stage(x)
            if not self.last:
                self.to_next.send(batch, [out, target])
                continue
            if isinstance(out, (tuple, list)):
                out = out[0]
            with autocast():
                loss = loss_fn(out, target)
            top = out.topk(min(5, out.shape[-1]), dim=-1).indices
            hits = top.eq(target.view(-1, 1))
            totals += torch.tensor([float(loss) * x.shape[0], float(hits[:, :1].sum()), float(hits.sum()),
                                    x.shape[0]], dtype=torch.float64)
        if self.to_next is not None:
            self.to_next.flush()
        loss, top1, top5, n = self._from_last(totals.tolist())
        n = max(n, 1)
        return dict(loss=loss / n, top1=100 * top1 / n, top5=100 * top5 / n)

    def _from_last(self, values: List[float]) -> List[float]:
        """`values` of the last rank, on every rank."""
        if self.num_stages == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(t, self.num_stages - 1)
        return t.tolist()
