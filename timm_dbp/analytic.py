""" Analytic least-squares classifier head: a one-pass, bounded-memory solver and a timm-model fitter

Analytic learning (H. Zhuang, "Analytic learning", NTU thesis 2021, and its block-wise recursive Moore-Penrose
inverse, BRMP) trains a linear layer in closed form: with features X (N x d, a column of ones appended for the bias)
and targets Y (N x c, one-hot labels), the head is the least-squares solution

    W* = argmin_W ||X W - Y||_F^2 + ridge ||W_features||_F^2   (the bias row is not regularised)
       = X^+ Y                                 (ridge = 0: the minimum-norm solution, rank-deficient X allowed)
       = (X^T X + ridge I')^-1 X^T Y           (ridge > 0; I' = I with a zero for the bias)

computed block by block over the data, so memory never depends on N and the result equals the whole-data solution.

`RecursiveLeastSquares` does this in orthogonal-factor (QR) form: it keeps only the upper-triangular factor T
((d + c) x (d + c)) of the augmented matrix A = [X | Y] of every row seen so far (A = Q T, Q with orthonormal
columns). A new block [X_k | Y_k] is stacked under T and re-triangularised with one QR, which gives the factor of
all rows. Since Q is orthonormal, with T = [[T_xx, T_xy], [0, T_yy]]:

    X^+ Y = T_xx^+ T_xy,    ||X W - Y||_F^2 = ||T [W; -I]||_F^2

This is the same recursion as BRMP / recursive least squares and gives their result and the whole-batch
pseudo-inverse's, but it never forms X^T X (no squared condition number) and handles rank-deficient blocks without
the Woodbury inverse. The ridge enters only at solve time, as rows [sqrt(ridge) I' | 0] stacked under T, so one
pass over the data serves every ridge value, and two factors merge exactly (stack them, one QR): that is the
reduction across ranks of a distributed run.
"""
import time
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, Iterable, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .layers.decor_layers import DecorLinear

__all__ = ['LeastSquaresSolution', 'RecursiveLeastSquares', 'fit_analytic_head', 'analytic_classifier']

MIN_BLOCK_ROWS = 1024  # rows buffered before a QR at least (cost per row ~ 2 (d + c)^2 flops once blocks >= d + c)


class LeastSquaresSolution(NamedTuple):
    """A solved linear map `targets ~ features @ weight.T + bias`.

    Attributes:
        weight: Shape (c, d), the layout of nn.Linear.weight.
        bias: Shape (c,), or None for a solver without bias.
        residual: ||X W^T + b - Y||_F^2 + ridge ||W||_F^2 over every row seen (the penalty is included when ridge > 0).
    """
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    residual: torch.Tensor


class RecursiveLeastSquares:
    """Block-wise recursive least squares (QR form of BRMP): one pass, O((d + c)^2) memory, any number of rows.

    Args:
        num_features: Feature width d (without the bias column).
        num_outputs: Target width c.
        ridge: Default L2 penalty on the weight (not the bias) in `solution()`; 0 = minimum-norm least squares.
        bias: Fit a bias (a column of ones appended to the features).
        block_size: Rows buffered before one QR (default: max(2 (d + 1 + c), 1024)); state is
            (block_size + D) x D numbers, D = d + bias + c, whatever the number of rows.
        dtype: Working precision (float64 by default: the factor is exact to ~1e-15 relative).
        device: Where the factor lives (features and targets are moved there).

    Examples:
        >>> solver = RecursiveLeastSquares(512, 10, ridge=1e-3)
        >>> for features, labels in batches:
        ...     solver.update(features, F.one_hot(labels, 10))
        >>> weight, bias, residual = solver.solution()
    """

    def __init__(
            self,
            num_features: int,
            num_outputs: int,
            ridge: float = 0.0,
            bias: bool = True,
            block_size: Optional[int] = None,
            dtype: torch.dtype = torch.float64,
            device=None,
    ):
        if num_features < 1 or num_outputs < 1:
            raise ValueError(f'num_features and num_outputs must be >= 1, got {num_features} and {num_outputs}')
        _check_ridge(ridge)
        self.num_features, self.num_outputs, self.ridge, self.bias = num_features, num_outputs, ridge, bias
        self.num_inputs = num_features + int(bias)  # columns of X (with the ones column)
        width = self.num_inputs + num_outputs
        self.block_size = max(2 * width, MIN_BLOCK_ROWS) if block_size is None else block_size
        if self.block_size < 1:
            raise ValueError(f'block_size must be >= 1, got {block_size}')
        # rows [0, width): the factor T; rows [width, width + pending): buffered rows of A not yet folded into T
        self._rows = torch.zeros(width + self.block_size, width, dtype=dtype, device=device)
        self._pending = 0
        self.num_samples = 0

    @property
    def width(self) -> int:
        """D = d + bias + c, the columns of A = [X | 1 | Y]."""
        return self._rows.shape[1]

    @property
    def state_bytes(self) -> int:
        """Bytes the solver holds (independent of the number of rows seen)."""
        return self._rows.numel() * self._rows.element_size()

    @torch.no_grad()
    def update(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """Add rows: features (n, d) and targets (n, c). Non-finite values are refused."""
        if features.ndim != 2 or targets.ndim != 2:
            raise ValueError(f'features and targets must be 2-D (n, d) and (n, c), got shapes '
                             f'{tuple(features.shape)} and {tuple(targets.shape)}')
        if features.shape[0] != targets.shape[0]:
            raise ValueError(f'{features.shape[0]} feature rows but {targets.shape[0]} target rows')
        if features.shape[1] != self.num_features or targets.shape[1] != self.num_outputs:
            raise ValueError(f'expected features (n, {self.num_features}) and targets (n, {self.num_outputs}), got '
                             f'{tuple(features.shape)} and {tuple(targets.shape)}')
        rows = self._rows
        features, targets = (t.to(device=rows.device, dtype=rows.dtype) for t in (features, targets))
        if not (torch.isfinite(features).all() and torch.isfinite(targets).all()):
            raise ValueError('features or targets contain NaN or inf')
        d, width, start = self.num_features, self.width, 0
        while start < features.shape[0]:
            take = min(features.shape[0] - start, self.block_size - self._pending)
            block = rows[width + self._pending:width + self._pending + take]
            block[:, :d] = features[start:start + take]
            if self.bias:
                block[:, d] = 1.0
            block[:, self.num_inputs:] = targets[start:start + take]
            self._pending += take
            start += take
            if self._pending == self.block_size:
                self._fold_pending()
        self.num_samples += features.shape[0]

    def _fold_pending(self) -> None:
        """T <- R factor of [T; buffered rows] (one QR), emptying the buffer."""
        if self._pending:
            width = self.width
            self._rows[:width] = torch.linalg.qr(self._rows[:width + self._pending], mode='r').R
            self._pending = 0

    @torch.no_grad()
    def factor(self) -> torch.Tensor:
        """T (D x D, upper triangular): A^T A = T^T T for A = [X | 1 | Y], every row seen so far."""
        self._fold_pending()
        return self._rows[:self.width].clone()

    @torch.no_grad()
    def merge(self, other: 'RecursiveLeastSquares') -> None:
        """Fold another solver's rows into this one: the factor of [A_self; A_other] is the QR of [T_self; T_other]."""
        if (other.num_features, other.num_outputs, other.bias) != (self.num_features, self.num_outputs, self.bias):
            raise ValueError(f'cannot merge a solver of (features, outputs, bias) = '
                             f'{(other.num_features, other.num_outputs, other.bias)} into one of '
                             f'{(self.num_features, self.num_outputs, self.bias)}')
        stacked = torch.cat([self.factor(), other.factor().to(self._rows)])
        self._rows[:self.width] = torch.linalg.qr(stacked, mode='r').R
        self.num_samples += other.num_samples

    @torch.no_grad()
    def all_reduce(self, group=None) -> None:
        """Merge the rows of every rank of a torch.distributed group, so every rank holds the solver of all rows.

        A collective: every rank of the group must call it. The factors (D x D each) are all-gathered, not the rows.
        """
        world_size = dist.get_world_size(group)
        if world_size == 1:
            return
        own = self.factor()
        factors = [torch.empty_like(own) for _ in range(world_size)]
        dist.all_gather(factors, own, group=group)
        counts = [torch.zeros(1, dtype=torch.long, device=own.device) for _ in range(world_size)]
        dist.all_gather(counts, torch.tensor([self.num_samples], device=own.device), group=group)
        self._rows[:self.width] = torch.linalg.qr(torch.cat(factors), mode='r').R  # own factor is one of them
        self.num_samples = sum(int(n) for n in counts)

    @torch.no_grad()
    def solution(self, ridge: Optional[float] = None) -> LeastSquaresSolution:
        """Weight (c, d), bias (c,) and residual of the least-squares fit over every row seen.

        W = T_xx^+ T_xy, with T the factor of the rows stacked over [sqrt(ridge) I' | 0] (I': no bias entry).
        With ridge = 0 this is the minimum-norm solution X^+ Y (pinv: exact for rank-deficient X).

        Args:
            ridge: L2 penalty on the weight; default: the constructor's.
        """
        ridge = self.ridge if ridge is None else ridge
        _check_ridge(ridge)
        if self.num_samples == 0:
            raise ValueError('no samples seen: call update() with at least one row before solution()')
        factor, n_in = self.factor(), self.num_inputs
        if ridge > 0:
            penalty = torch.zeros(self.num_features, self.width, dtype=factor.dtype, device=factor.device)
            penalty.diagonal().fill_(ridge ** 0.5)
            factor = torch.linalg.qr(torch.cat([factor, penalty]), mode='r').R
        coef = torch.linalg.pinv(factor[:n_in, :n_in]) @ factor[:n_in, n_in:]  # (d + bias, c)
        residual = (factor[:, :n_in] @ coef - factor[:, n_in:]).square().sum()  # ||T [W; -I]||_F^2
        weight = coef[:self.num_features].T.contiguous()
        bias = coef[self.num_features] if self.bias else None
        return LeastSquaresSolution(weight, bias, residual)


def _check_ridge(ridge: float) -> None:
    if not ridge >= 0:  # also NaN
        raise ValueError(f'ridge must be >= 0, got {ridge}')


def analytic_classifier(model: nn.Module) -> nn.Linear:
    """The nn.Linear (or DecorLinear) classifier of a timm model, or a ValueError saying why it has none."""
    missing = [name for name in ('get_classifier', 'forward_features', 'forward_head') if not hasattr(model, name)]
    if missing:
        raise ValueError(f'{type(model).__name__} is not a timm model: it has no {", ".join(missing)}')
    head = model.get_classifier()
    if isinstance(head, (tuple, list)):
        raise ValueError(f'{type(model).__name__} has {len(head)} classifiers (a distilled model): '
                         f'fit one head at a time is not supported')
    if not isinstance(head, nn.Linear):
        hint = ' (num_classes=0: the model has no classifier)' if isinstance(head, nn.Identity) else ''
        raise ValueError(f'the classifier of {type(model).__name__} is a {type(head).__name__}{hint}; '
                         f'an analytic head needs an nn.Linear')
    return head


@torch.no_grad()
def fit_analytic_head(
        model: nn.Module,
        loader: Iterable,
        ridge: float = 1e-3,
        device=None,
        amp_autocast: Callable[[], ContextManager] = nullcontext,
        channels_last: bool = False,
) -> Dict[str, Any]:
    """Set a timm model's linear classifier to the least-squares fit of one-hot labels on its pooled features.

    Features are `model.forward_head(model.forward_features(x), pre_logits=True)` in eval mode (the classifier's
    input); the head becomes W, b = argmin ||F W^T + b - Y||^2 + ridge ||W||^2 over every (x, y) the loader yields,
    in one pass with `RecursiveLeastSquares`. Targets are integer labels (n,) (one-hot over the classifier's
    outputs) or soft targets (n, num_classes). A DBP classifier (DecorLinear, effective weight W R) gets R = I and
    W = the solution. Under torch.distributed every rank must call this with its shard of the data: the factors are
    merged across ranks, so every rank gets the same head, fitted on all shards. The model's train / eval mode is
    restored afterwards; nothing else in it changes.

    Args:
        model: A timm model whose `get_classifier()` is an nn.Linear.
        loader: Yields (input, target) batches.
        ridge: L2 penalty on the weight (not the bias); 0 = minimum-norm least squares.
        device: Where inputs go (default: the model's device).
        amp_autocast: Context manager for the feature forward (features are solved in float64 anyway).
        channels_last: Feed inputs in channels-last memory format.

    Returns:
        num_samples, num_features, num_classes, ridge, residual (sum of squares over all samples, penalty
        included) and seconds (wall-clock of the whole fit).
    """
    start = time.perf_counter()
    head = analytic_classifier(model)
    device = device or head.weight.device
    solver = RecursiveLeastSquares(
        head.in_features, head.out_features, ridge=ridge, bias=head.bias is not None, device=device)
    was_training = model.training
    model.eval()
    try:
        for input, target in loader:
            input, target = input.to(device), target.to(device)
            if channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                features = model.forward_head(model.forward_features(input), pre_logits=True)
            solver.update(features.float(), _target_matrix(target, head.out_features))
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        solver.all_reduce()
    if solver.num_samples == 0:
        raise ValueError('the loader yielded no samples: nothing to fit the head on')
    weight, bias, residual = solver.solution()
    if isinstance(head, DecorLinear):
        head.reset_decorrelation()  # R = I, so the effective weight W R is W
    head.weight.copy_(weight)
    if bias is not None:
        head.bias.copy_(bias)
    return dict(
        num_samples=solver.num_samples, num_features=head.in_features, num_classes=head.out_features, ridge=ridge,
        residual=residual.item(), seconds=time.perf_counter() - start)


def _target_matrix(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(n, num_classes) regression targets: one-hot of integer labels (n,), or soft targets as they are."""
    if target.ndim == 1 and not target.is_floating_point():
        if len(target) and (target.min() < 0 or target.max() >= num_classes):
            raise ValueError(f'labels must be in [0, {num_classes}), got {target.min().item()}..{target.max().item()}')
        return F.one_hot(target, num_classes)
    if target.ndim == 2 and target.shape[1] == num_classes:
        return target
    raise ValueError(f'targets must be integer labels (n,) or soft targets (n, {num_classes}), '
                     f'got {target.dtype} of shape {tuple(target.shape)}')
