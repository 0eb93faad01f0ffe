""" Does `decorrelate()` work on this model? One check, used by the tests and by scripts/sweep_timm_models.py

`check_decorrelate(model, x)` converts the model and verifies the three promises of a DBP conversion:
    identity  at R = I the converted model computes exactly what the plain model computed (max |difference| == 0)
    step      one dbpsgd step updates the R of every DBP layer (a layer whose forward never runs, because the model
              reads its weight directly, would keep an R that changes nothing: listed as `unreached`)
    fold      `fold()` of the stepped model computes what the stepped DBP model computes (relative 1e-4). Some
              randomly initialised timm models are chaotic in eval mode: efficientnetv2_rw_m turns a 1e-15 relative
              change of its weights into a 0.4 relative change of its output, even in float64, so no end-to-end
              comparison can pass. When the end-to-end difference misses the tolerance, every DBP layer is checked
              on its own (its folded twin on the input it saw), and the fold passes if every layer is exact and the
              model is shown to be chaotic (its output moves by more than the tolerance when its weights get
              float32 round-off noise, 1e-7 relative).
"""
import copy
import dataclasses
import time
from typing import Any, List

import torch
from torch import nn

from timm_dbp.layers import decor_layers, decorrelate, fold

__all__ = ['DecorrelateCheck', 'check_decorrelate', 'output_tensors', 'small_input']


FOLD_TOLERANCE = 1e-4  # max |folded - DBP| / max |DBP| over the outputs


@dataclasses.dataclass
class DecorrelateCheck:
    """The result of `check_decorrelate`; `ok` when every promise holds."""
    decor_layers: int = 0
    identity_max_diff: float = float('nan')
    fold_rel_diff: float = float('nan')
    layer_fold_rel_diff: float = float('nan')  # the worst DBP layer on its own; measured when fold_rel_diff fails
    round_off_sensitivity: float = float('nan')  # output change under 1e-7 relative weight noise; measured then too
    updated_layers: int = 0
    unreached: List[str] = dataclasses.field(default_factory=list)
    error: str = ''
    seconds: float = 0.0

    @property
    def chaotic(self) -> bool:
        """The model amplifies float32 round-off beyond the tolerance, and every layer folds exactly on its own."""
        return self.round_off_sensitivity > FOLD_TOLERANCE and self.layer_fold_rel_diff <= FOLD_TOLERANCE

    @property
    def ok(self) -> bool:
        return not self.problems()

    def problems(self) -> str:
        """What failed, in words ('' when ok)."""
        found = [self.error] if self.error else []
        if not self.error:
            if self.decor_layers == 0:
                found.append('no Conv2d / Linear layer to decorrelate')
            if self.identity_max_diff != 0:
                found.append(f'at R = I the output differs by {self.identity_max_diff:.3g}')
            if self.unreached:
                found.append(f'{len(self.unreached)} DBP layer(s) never run by forward: {", ".join(self.unreached[:4])}')
            if not (self.fold_rel_diff <= FOLD_TOLERANCE or self.chaotic):
                found.append(f'folded model differs by {self.fold_rel_diff:.3g} (relative; worst layer on its own: '
                             f'{self.layer_fold_rel_diff:.3g}, output change under round-off noise: '
                             f'{self.round_off_sensitivity:.3g})')
        return '; '.join(found)


def output_tensors(output: Any) -> List[torch.Tensor]:
    """The floating-point tensors in a model output (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in output_tensors(item)]
    return []


def small_input(name: str, model: nn.Module, batch_size: int = 2, small: int = 64) -> torch.Tensor:
    """A random batch the plain timm `model` (architecture `name`) runs on: `small` px unless its input size is fixed
    or it cannot run that small (then the pretrained cfg's size). Raises the plain model's error if neither runs."""
    import timm
    cfg = timm.models.get_pretrained_cfg(name)
    size = cfg.input_size[-1] if cfg is not None else 224
    sizes = [size] if (cfg is not None and cfg.fixed_input_size) or size == small else [small, size]

    def runs(size: int) -> torch.Tensor:
        x = torch.randn(batch_size, 3, size, size)
        with torch.no_grad():
            model.eval()(x)
        return x

    for size in sizes[:-1]:
        try:
            return runs(size)
        except Exception:  # too small for this architecture: try the next size
            pass
    return runs(sizes[-1])


def _max_abs_diff(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float('inf')
    return max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


def _fold_rel_diff(model: nn.Module, x: torch.Tensor) -> float:
    """max |fold(model)(x) - model(x)| / max |model(x)|, in eval mode (`model` is not changed)."""
    model.eval()
    with torch.no_grad():
        return _rel_diff(output_tensors(fold(copy.deepcopy(model))(x)), output_tensors(model(x)))


def _rel_diff(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    scale = max((float(t.abs().max()) for t in b if t.numel()), default=1.0) or 1.0
    return _max_abs_diff(a, b) / scale


def _layer_fold_rel_diff(model: nn.Module, x: torch.Tensor) -> float:
    """The worst relative difference between a DBP layer and its folded twin on the input the layer saw."""
    worst = [0.0]

    def compare(layer: nn.Module, args: tuple, out: torch.Tensor) -> None:
        worst[0] = max(worst[0], _rel_diff([fold(copy.deepcopy(layer))(*args)], [out]))

    hooks = [layer.register_forward_hook(compare) for _, layer in decor_layers(model)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    return worst[0]


def _round_off_sensitivity(model: nn.Module, x: torch.Tensor, noise: float = 1e-7) -> float:
    """Relative change of the output of `model` when every weight is multiplied by (1 + noise * N(0, 1))."""
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.mul_(1 + noise * torch.randn(p.shape, generator=generator).to(p))
        return _rel_diff(output_tensors(noisy.eval()(x)), output_tensors(model.eval()(x)))


def check_decorrelate(model: nn.Module, x: torch.Tensor, **decorrelate_args) -> DecorrelateCheck:
    """Convert `model` in place with `decorrelate(model, **decorrelate_args)` and check it (see the module docstring).

    Errors raised by the model or the conversion are caught and reported in `error`."""
    from timm_dbp.optim import with_dbp  # the optimizer package imports the layers: import here, not at the top

    result = DecorrelateCheck()
    start = time.perf_counter()
    try:
        model.eval()
        with torch.no_grad():
            plain_out = output_tensors(model(x))
        model = decorrelate(model, **decorrelate_args)
        layers = dict(decor_layers(model))
        result.decor_layers = len(layers)
        with torch.no_grad():
            result.identity_max_diff = _max_abs_diff(output_tensors(model(x)), plain_out)

        model.train()
        opt = with_dbp(torch.optim.SGD)(model.parameters(), lr=1e-3, decor_lr=1e-2)
        loss = sum(t.float().square().mean() for t in output_tensors(model(x)))
        loss.backward()
        opt.step()
        counts = {name: int(layer.decor_updates + layer.decor_skipped) for name, layer in layers.items()}
        result.updated_layers = sum(counts.values())
        result.unreached = [name for name, count in counts.items() if count == 0]

        result.fold_rel_diff = _fold_rel_diff(model, x)
        if not result.fold_rel_diff <= FOLD_TOLERANCE:
            result.layer_fold_rel_diff = _layer_fold_rel_diff(model, x)
            result.round_off_sensitivity = _round_off_sensitivity(fold(copy.deepcopy(model)), x)
    except Exception as e:  # reported, not raised: a sweep goes on to the next model
        result.error = f'{type(e).__name__}: {e}'.strip().splitlines()[0][:300]
    result.seconds = time.perf_counter() - start
    return result
