""" Low-memory convolution weight gradients by multi-channel randomized trace estimation (XConv)

Louboutin, Siahkoohi, Wang, Herrmann, "Low-memory stochastic backpropagation with multi-channel randomized trace
estimation", arXiv 2106.06998 (later versions: "XConv").

A conv y = conv(x, A) has the weight gradient, for output channel o, input channel c and kernel offset k,

    dA[o, c, k] = sum_b  g_b,o^T  S_k x_b,c          g = dL/dy, S_k picks the input pixel under offset k

which is a trace: tr(S_k x_b,c g_b,o^T) = tr(x_b,c g_b,o^T S_k). With r random probe vectors z_1..z_r over the N
input pixels (Rademacher +-1, so E[z z^T] = I), Hutchinson's estimator tr(M) ~ (1/r) sum_i z_i^T M z_i gives

    dA[o, c, k] ~ (1/r) sum_b sum_i  (x_b,c^T z_i) (g_b,o^T S_k z_i)

an unbiased estimate (its error falls like 1/sqrt(r)). The forward pass keeps only the sketch x^T Z (B x C x r
numbers instead of B x C x N) and the probes' seed; the backward pass regenerates Z and computes g^T S_k z_i for
every offset at once as the weight gradient of a conv whose "input" is the probes (one image, r channels) and whose
"output gradient" is g with the batch folded into the channels. The input gradient dL/dx = conv_transpose(g, A) is
exact, so every activation gradient and every gradient of a non-conv parameter stays exact; only conv kernels get
estimated gradients.

With DBP (a DecorConv2d: A = W R) the sketched tensor is the conv's own input x, and the estimate of dA reaches W
through A = W R by ordinary autograd (dW = dA R^T): unbiased as well. With a kron R whose channel factor is applied
to a small input first (x' = R_c x), x' is the conv input and is what gets sketched.

Memory: a conv keeps B C r numbers for its weight gradient instead of its input (B C N). Sketching saves nothing
where N <= r (a 1 x 1 map, e.g. squeeze-excite convs): such calls run the exact conv. A conv input that another
layer keeps anyway is not freed by sketching the conv: in conv-BN-ReLU networks the conv input is the ReLU's
output, which torch's ReLU keeps for its own backward. So `sketch_convs` also gives every nn.ReLU a backward that
keeps the mask y > 0 (1 byte a number instead of 4; the same outputs and gradients): without it a sketched
ResNet keeps as much as an exact one (measured in docs/BENCHMARKS.md).
"""
from fnmatch import fnmatch
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .decor_layers import DecorConv2d

__all__ = [
    'MaskedReLU', 'SketchedConvMixin', 'SketchedConv2d', 'SketchedDecorConv2d', 'sketched_conv2d', 'sketch_convs',
    'sketched_layers', 'rademacher_probes']


def rademacher_probes(num_pixels: int, probes: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Z (num_pixels x probes) of independent +-1 entries drawn from `seed` (E[Z Z^T] = probes I)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    bits = torch.randint(0, 2, (num_pixels, probes), generator=generator, device=device)
    return (bits * 2 - 1).to(dtype)


class _SketchedConv2dFunction(torch.autograd.Function):
    """y = conv2d(x, weight, bias); backward: exact dx and db, trace-estimated dW from the sketch x^T Z."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, probes, seed):
        batch, channels, height, width = x.shape
        z = rademacher_probes(height * width, probes, seed, x.device, x.dtype)
        ctx.save_for_backward(torch.matmul(x.reshape(batch, channels, height * width), z), weight)
        ctx.conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        ctx.input_shape, ctx.probes, ctx.seed, ctx.has_bias = x.shape, probes, seed, bias is not None
        return F.conv2d(x, weight, bias, **ctx.conv)

    @staticmethod
    def backward(ctx, grad_out):
        sketch, weight = ctx.saved_tensors
        batch, channels, height, width = ctx.input_shape
        out_channels, groups = weight.shape[0], ctx.conv['groups']
        grad_out = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad_out, **ctx.conv)
        if ctx.needs_input_grad[1]:
            z = rademacher_probes(height * width, ctx.probes, ctx.seed, grad_out.device, grad_out.dtype)
            probe_images = z.t().reshape(1, ctx.probes, height, width)
            # projected[b, o, i, k] = g_b,o^T S_k z_i: the weight gradient of conv(probes, .) against g, batch in channels
            projected = torch.nn.grad.conv2d_weight(
                probe_images, (batch * out_channels, ctx.probes, *weight.shape[2:]),
                grad_out.reshape(1, batch * out_channels, *grad_out.shape[2:]),
                stride=ctx.conv['stride'], padding=ctx.conv['padding'], dilation=ctx.conv['dilation'])
            projected = projected.reshape(batch, groups, out_channels // groups, ctx.probes, -1)
            sketch = sketch.reshape(batch, groups, channels // groups, ctx.probes)
            grad_w = torch.einsum('bgci,bgoik->gock', sketch, projected).reshape(weight.shape) / ctx.probes
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def sketched_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        probes: int = 16,
        seed: int = 0,
) -> torch.Tensor:
    """F.conv2d(x, weight, bias, ...) whose weight gradient is the trace estimate from `probes` Rademacher probes
    drawn from `seed` (the input gradient is exact). `padding` as in F.conv2d ('same', 'valid' or numbers)."""
    _check_probes(probes)
    if x.dim() != 4:
        raise ValueError(f'sketched_conv2d takes a (B, C, H, W) input, got shape {tuple(x.shape)}')
    x, padding = _explicit_padding(x, weight, padding, dilation)
    if torch.is_autocast_enabled(x.device.type):  # autocast skips custom Functions: cast as it would for a conv
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        return _SketchedConv2dFunction.apply(
            x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups, probes, seed)


def _explicit_padding(x: torch.Tensor, weight: torch.Tensor, padding, dilation) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Turn F.conv2d's string padding into numbers (padding x first where 'same' is asymmetric)."""
    if padding == 'valid':
        return x, (0, 0)
    if padding != 'same':
        return x, _pair(padding)
    totals = [d * (k - 1) for d, k in zip(_pair(dilation), weight.shape[2:])]
    if all(t % 2 == 0 for t in totals):
        return x, (totals[0] // 2, totals[1] // 2)
    (th, tw) = totals
    return F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2)), (0, 0)


class SketchedConvMixin:
    """Makes an nn.Conv2d (or DecorConv2d) compute its weight gradient by trace estimation while training.

    `sketch_probes` (r) is the knob: more probes, less gradient noise, more memory (B C r numbers per conv).
    Each training forward draws new probes from `sketch_seed` and a call counter (never from torch's global RNG,
    so data order and dropout are those of exact training). Evaluation and no-grad forwards are the plain conv.
    """
    sketch_probes: int = 16
    sketch_seed: int = 0
    sketch_calls: int = 0

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()) or input.shape[-1] * input.shape[-2] <= self.sketch_probes:
            return super()._conv_forward(input, weight, bias)
        if self.padding_mode != 'zeros':  # pad as nn.Conv2d does, then convolve unpadded
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        self.sketch_calls += 1
        seed = (self.sketch_seed * 1_000_003 + self.sketch_calls) % (2 ** 63)
        return sketched_conv2d(
            input, weight, bias, self.stride, padding, self.dilation, self.groups, self.sketch_probes, seed)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', sketch_probes={self.sketch_probes}'


class SketchedConv2d(SketchedConvMixin, nn.Conv2d):
    """nn.Conv2d with trace-estimated weight gradients (same parameters and state dict as nn.Conv2d)."""


class SketchedDecorConv2d(SketchedConvMixin, DecorConv2d):
    """DecorConv2d (y = conv(x, W R)) with trace-estimated gradients of the fused kernel W R (same state dict)."""


class _MaskedReLUFunction(torch.autograd.Function):
    """y = max(x, 0); backward keeps only the mask y > 0: dL/dx = dL/dy * [y > 0]."""

    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        ctx.save_for_backward(y > 0)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        mask, = ctx.saved_tensors
        return grad_y * mask


class MaskedReLU(nn.ReLU):
    """nn.ReLU that keeps a bool mask for backward instead of its output (never in place: the input it would
    overwrite is not kept by anyone, so the peak is the same)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return torch.relu(x)
        return _MaskedReLUFunction.apply(x)


_SKETCHED = {nn.Conv2d: SketchedConv2d, DecorConv2d: SketchedDecorConv2d}


def make_sketched(conv: nn.Conv2d, probes: int, seed: int) -> SketchedConvMixin:
    """Turn an nn.Conv2d / DecorConv2d (or a sketched one) into its sketched class in place, probe stream at 0."""
    conv.__class__ = _SKETCHED.get(type(conv), type(conv))
    conv.sketch_probes, conv.sketch_seed, conv.sketch_calls = probes, seed, 0
    return conv


def _check_probes(probes) -> None:
    if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
        raise ValueError(f'probes must be an integer >= 1, got {probes!r}')


def sketch_convs(
        model: nn.Module,
        probes: int = 16,
        seed: int = 0,
        exclude: Sequence[str] = (),
        mask_relus: bool = True,
) -> nn.Module:
    """Give every nn.Conv2d and DecorConv2d of `model` trace-estimated weight gradients with `probes` probe vectors,
    in place (setting `probes` again on a sketched model changes it); returns the model. With `mask_relus`, every
    nn.ReLU becomes a MaskedReLU (exact; it frees the conv inputs that a ReLU would otherwise keep).

    Parameters, buffers and the state dict are unchanged (checkpoints load either way, `fold` folds DBP layers as
    usual). Conv subclasses with their own forward (timm's Conv2dSame, StdConv2d, ...) stay exact; `exclude` takes
    fnmatch patterns of module names to leave exact as well. Layer i draws its probes from seed `seed` + i.
    """
    _check_probes(probes)
    found = 0
    for index, (name, module) in enumerate(model.named_modules()):
        cls = type(module)
        if any(fnmatch(name, pattern) for pattern in exclude):
            continue
        if mask_relus and cls is nn.ReLU:
            module.__class__ = MaskedReLU
        if cls not in _SKETCHED and cls not in _SKETCHED.values():
            continue
        make_sketched(module, probes, seed + index)
        found += 1
    if found == 0:
        raise ValueError(f'{type(model).__name__} has no nn.Conv2d or DecorConv2d to sketch')
    return model


def sketched_layers(model: nn.Module) -> Iterator[Tuple[str, SketchedConvMixin]]:
    """(name, layer) for every conv of `model` with trace-estimated weight gradients."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, SketchedConvMixin))
