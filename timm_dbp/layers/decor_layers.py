""" Decorrelated Conv2d and Linear layers

DecorConv2d / DecorLinear keep the original `weight` and `bias` (same names and shapes as nn.Conv2d /
nn.Linear, so timm and torchvision checkpoints fit) and add the decorrelation matrix R as persistent
buffers, initialised to the identity, so a fresh layer computes exactly what the plain layer computes.
R's structure (`decor_structure`, see `timm_dbp.layers.decorrelation`):
    full     `decor_matrix` is d x d, d = C_in / groups * kh * kw (linear: d = in_features)
    channel  `decor_matrix` is c x c, c = C_in / groups: R_c on every input pixel (linear: same as full)
    kron     `decor_matrix` is c x c and `decor_spatial` s x s, s = kh * kw (a 1x1 conv: same as channel)
With `decor_block_size` b, a `decor_matrix` over channels (channel, kron, any 1x1 conv or linear layer) wider than b
is block-diagonal: G equal blocks of at most b channels, held as (G, c / G, c / G) (`block_count`).

Forward: A = W R is fused into one ordinary conv / linear with the layer's own stride, padding, dilation,
groups and bias. With a channel factor (channel, kron, and the R of any 1x1 conv), R_c is applied to the input
instead (a 1x1 conv) whenever the input has fewer elements than the kernel, which is cheaper (costs B H W C c
against C_out c^2 s) and gives the same output. Either way the gradient for W equals backprop on the decorrelated
input z = R x.

R is never trained by autograd. A DBP optimizer arms a layer (`decor_samples > 0`) for the forward of
a step that updates R; that forward keeps a reference to its input (`decor_input`: no copy, the conv saves that
tensor for its backward anyway; overwritten by a later armed forward, so a gradient-checkpoint re-run is harmless).
The optimizer's `step()` takes a random sample of decorrelated inputs z = R x from it (`take_decor_inputs`: patches or
rows drawn without replacement, computed with R as it is then, which is the R of that forward: R only changes in the
step) and consumes it with `update_decorrelation()`. Where R_c is applied to the input, the kept input is that
product's output (R_c x is not computed twice). A kron layer draws decor_samples / decor_vectors_per_patch patches
and returns the decor_samples vectors each of its factors learns from (`kron_factor_inputs`): decor_samples (c + s)
numbers (all-gathered under DDP), not c s per patch. Unarmed forwards cost nothing. The forward itself holds no
data-dependent work, so torch.compile traces an armed forward whole (the kept input is one more graph output) and
the sampling runs eagerly in the step.

Paper: https://arxiv.org/abs/2405.02385
"""
import functools
import weakref
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import register_notrace_module

from .decorrelation import (
    DecorrelationStep, _index_tensor, block_count, check_block_size, combine_kron_steps, factor_problem,
    factor_product, factor_rows, factor_size, fused_weight, grouped_decorrelation_update_, kron_factor_inputs,
    kron_vector_positions, matmul_dtype_named, off_diagonal_pairs, operand_dtype)

__all__ = [
    'DecorConv2d', 'DecorLinear', 'DecorLayer', 'DECOR_LAYERS', 'DECOR_STRUCTURES', 'find_decor_layer',
    'DEFAULT_STRUCTURE', 'DEFAULT_VECTORS_PER_PATCH', 'patch_pixel_table', 'record_decorrelation',
    'sample_conv_patches', 'sample_indices', 'sample_kron_factor_inputs', 'sample_pixels', 'sample_rows']

DECOR_STRUCTURES = ('full', 'channel', 'kron')
DEFAULT_STRUCTURE = 'kron'  # of decorrelate() and the dbp_ models: chosen by docs/BENCHMARKS.md, section 12
DEFAULT_VECTORS_PER_PATCH = 1  # of a kron layer's sample (`decor_vectors_per_patch`): BENCHMARKS section 25


def sample_indices(
        total: int,
        num_samples: int,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
) -> torch.Tensor:
    """min(num_samples, total) distinct indices into range(total), uniformly without replacement, in random order.

    A CPU sample of n from total > 8 n (a large conv input) is drawn in O(n) instead of a randperm of `total`: the
    distinct values of 1.25 n + 8 draws with replacement (redrawn in the rare case of fewer than n), of which a random
    n in random order. Their set is uniform: its law is invariant under every permutation of range(total). On other
    devices, and for smaller totals, randperm.
    """
    n = min(num_samples, total)
    device = torch.device('cpu') if device is None else torch.device(device)
    if device.type == 'cpu' and total > 8 * n:
        while True:
            drawn = torch.randint(total, (n + n // 4 + 8,), generator=generator).unique()
            if drawn.numel() >= n:
                return drawn[torch.randperm(drawn.numel(), generator=generator)[:n]]
    return torch.randperm(total, device=device, generator=generator)[:n]


_OUTSIDE = 1 << 40  # patch_pixel_table's entry for a kernel position in the zero padding


@functools.lru_cache(maxsize=256)
def patch_pixel_table(
        height: int,
        width: int,
        kernel_size: Tuple[int, int],
        stride: Tuple[int, int],
        dilation: Tuple[int, int],
        padding: Tuple[int, int, int, int],
        device: torch.device,
) -> torch.Tensor:
    """Where each patch of a conv reads its input: shape (H_out * W_out, kh * kw), entry [p, k] = the index
    row * W + col into one image's H * W pixels of kernel position k of output position p, or 2^40 when that position
    lies in the zero padding (left, right, top, bottom). Cached per geometry: sampling then costs a few tensor
    operations whatever the kernel."""
    kh, kw = kernel_size
    pad_left, pad_right, pad_top, pad_bottom = padding
    Ho = (height + pad_top + pad_bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (width + pad_left + pad_right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    arange = functools.partial(torch.arange, device=device)
    rows = arange(Ho)[:, None] * stride[0] + arange(kh) * dilation[0] - pad_top  # (Ho, kh), unpadded coordinates
    cols = arange(Wo)[:, None] * stride[1] + arange(kw) * dilation[1] - pad_left  # (Wo, kw)
    pixel = rows[:, None, :, None] * width + cols[None, :, None, :]  # (Ho, Wo, kh, kw)
    inside = ((rows >= 0) & (rows < height))[:, None, :, None] & ((cols >= 0) & (cols < width))[None, :, None, :]
    return torch.where(inside, pixel, _OUTSIDE).reshape(Ho * Wo, kh * kw)


def _draw_patches(
        x: torch.Tensor,
        conv: nn.Conv2d,
        num_samples: int,
        generator: Optional[torch.Generator],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, padded for a non-zero padding mode; image b, group g, pixel table rows (n, kh * kw)) of
    min(num_samples, B * groups * H_out * W_out) patches of `conv` drawn uniformly without replacement."""
    padding = conv._reversed_padding_repeated_twice
    if conv.padding_mode != 'zeros':
        x = F.pad(x, padding, mode=conv.padding_mode)
        padding = (0, 0, 0, 0)
    B, _, H, W = x.shape
    table = patch_pixel_table(H, W, conv.kernel_size, conv.stride, conv.dilation, tuple(padding), x.device)
    per_image = conv.groups * table.shape[0]
    idx = sample_indices(B * per_image, min(num_samples, B * per_image), generator, x.device)
    b, rest = idx // per_image, idx % per_image
    return x, b, rest // table.shape[0], table[rest % table.shape[0]]


def _pixel_rows(
        x: torch.Tensor, b: torch.Tensor, pixel: torch.Tensor, dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(pixels as rows of C channels, the row of each (image b, table entry pixel) or None), so that a patch's
    channel vectors are contiguous rows and padded positions read zeros. When the n x s entries are fewer than half
    of x's pixels (a 1x1 conv's sample, a large input), the rows are those entries' pixels alone, gathered in order
    (padded ones zeroed; rows None: entry k is row k); otherwise one copy of all of x's pixels with a zero row last,
    which padded positions index."""
    B, C, H, W = x.shape
    dtype = dtype or x.dtype
    if 2 * pixel.numel() < B * H * W:
        inside = pixel.clamp_max(H * W - 1)
        pixels = x.flatten(2).permute(0, 2, 1)[b[:, None].expand_as(pixel).reshape(-1), inside.reshape(-1)]
        return pixels.to(dtype).masked_fill_((pixel >= H * W).reshape(-1, 1), 0), None
    pixels = torch.empty(B * H * W + 1, C, dtype=dtype, device=x.device)
    pixels[:-1].view(B, H, W, C).copy_(x.permute(0, 2, 3, 1))
    pixels[-1].zero_()
    return pixels, (pixel + (b * (H * W))[:, None]).clamp_max_(B * H * W)


def sample_conv_patches(
        x: torch.Tensor,
        conv: nn.Conv2d,
        num_samples: int,
        generator: Optional[torch.Generator] = None,
        flat: bool = True,
) -> torch.Tensor:
    """Draw receptive-field patches of `conv` from input x, uniformly without replacement.

    A patch is indexed by (image, group, output row, output column); its entries are ordered
    (channel, kernel row, kernel column), the same order as `conv.weight[o].flatten()`.

    Cost: the sampled group's channel vectors are gathered for the n * kh * kw sampled pixels (`patch_pixel_table`);
    without groups by one `index_select` of pixel rows (C channels each) from one copy of the input with a zero row
    appended, which the pixels in the zero padding index (other padding modes pad the input first), so the n x d
    result is written once; `flat=False` skips reordering it to (channel, kernel position) order.

    Args:
        x: Conv input, shape (B, C, H, W).
        conv: The convolution whose patches are drawn (padding, stride, dilation, groups).
        num_samples: How many patches; capped at the number of patches in x.
        generator: Random generator on x's device (default: torch's global one).
        flat: Return (n, d) rows; False returns the same patches as an (n, C / groups, kh * kw) view whose memory
            is ordered (kernel position, channel), as a Kronecker-factored update reads them.

    Returns:
        Patches, shape (n, C / groups * kh * kw) (or (n, C / groups, kh * kw)), n = min(num_samples, B * groups *
        H_out * W_out).
    """
    x, b, g, pixel = _draw_patches(x, conv, num_samples, generator)
    n, s = pixel.shape
    C, H, W = x.shape[1:]
    cg = C // conv.groups
    if conv.groups > 1:  # gather only the sampled group's channels (a depthwise conv has one of C)
        channel = (g * cg)[:, None, None] + torch.arange(cg, device=x.device)  # (n, 1, cg)
        patches = x.flatten(2)[b[:, None, None], channel, pixel.clamp_max(H * W - 1)[..., None]]  # (n, s, cg)
        patches.masked_fill_((pixel >= H * W)[..., None], 0)
    else:  # one fast row gather
        pixels, rows = _pixel_rows(x, b, pixel)
        patches = (pixels if rows is None else pixels.index_select(0, rows.reshape(-1))).view(n, s, C)
    patches = patches.transpose(1, 2)  # (n, channel, kernel position), a view
    return patches.reshape(n, cg * s) if flat else patches


def sample_kron_factor_inputs(
        x: torch.Tensor,
        conv: nn.Conv2d,
        R_channel: torch.Tensor,
        R_spatial: torch.Tensor,
        num_patches: int,
        num_vectors: int,
        generator: Optional[torch.Generator] = None,
        channel_mixed: bool = False,
        matmul_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`kron_factor_inputs(R_channel, R_spatial, sample_conv_patches(x, conv, num_patches, generator, flat=False),
    num_vectors, channel_mixed, matmul_dtype)`: the same vectors up to float rounding, with one pass over the
    patches fewer.
    Without groups the vectors sum_k R_s[j, k] x[pixel k] are one `embedding_bag` over the pixel rows (summed
    while gathering); the rows R_c[i] x[pixel k] read the gathered n x s x c patches, or, when x is R_c x already
    (channel_mixed), are gathered as they are (n x s x q numbers)."""
    if conv.groups > 1:
        patches = sample_conv_patches(x, conv, num_patches, generator, flat=False)
        return kron_factor_inputs(R_channel, R_spatial, patches, num_vectors, channel_mixed, matmul_dtype)
    x, b, _, pixel = _draw_patches(x, conv, num_patches, generator)
    n, s = pixel.shape
    pixels, rows = _pixel_rows(x, b, pixel, torch.float32)
    in_order = rows is None  # the entries' own pixels, entry k in row k
    if in_order:
        rows = torch.arange(n * s, device=x.device).view(n, s)
    positions_s, positions_c = (kron_vector_positions(n, size, num_vectors, x.device)
                                for size in (s, factor_size(R_channel)))
    R_c, R_s = R_channel.float(), R_spatial.float()
    channel_vectors = F.embedding_bag(  # columns of P R_s^T
        rows.repeat_interleave(positions_s.shape[1], 0), pixels,
        per_sample_weights=R_s[positions_s.reshape(-1)], mode='sum')
    if channel_mixed:  # rows of R_c P as drawn: pixels[row of kernel position k, channel i]
        spatial_vectors = pixels[rows[:, None, :], positions_c[:, :, None]]
    else:
        channel_vectors = factor_product(channel_vectors, R_c.mT, operand_dtype(R_c.shape[-1], matmul_dtype))
        patches = (pixels if in_order else pixels.index_select(0, rows.reshape(-1))).view(n, s, -1)
        spatial_vectors = torch.einsum('nqc,nsc->nqs', factor_rows(R_c, positions_c), patches)
    return channel_vectors, spatial_vectors.reshape(-1, s) @ R_s.mT


def sample_pixels(
        x: torch.Tensor,
        groups: int,
        num_samples: int,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Draw per-pixel channel vectors of one group from x (B, C, H, W), uniformly without replacement.

    Returns:
        Shape (min(num_samples, B * H * W * groups), C / groups): the inputs a channel factor R_c acts on.
    """
    B, C, H, W = x.shape
    n = min(num_samples, B * H * W * groups)
    idx = sample_indices(B * H * W * groups, n, generator, x.device)
    pixel, g = idx // groups, idx % groups
    rows = x.flatten(2)[pixel // (H * W), :, pixel % (H * W)]  # (n, C)
    if groups > 1:
        rows = rows.view(n, groups, C // groups)[torch.arange(n, device=x.device), g]
    return rows


def sample_rows(x: torch.Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw rows of x (..., d) uniformly without replacement: shape (min(num_samples, rows), d)."""
    rows = x.reshape(-1, x.shape[-1])
    n = min(num_samples, rows.shape[0])
    return rows[sample_indices(rows.shape[0], n, generator, x.device)]


# id(weight) -> (weakref(weight), weakref(layer)): lets an optimizer, which only sees parameters, find the
# DBP layer a weight belongs to. Ids, not WeakKeyDictionary, because tensors compare elementwise.
_LAYER_OF_WEIGHT: Dict[int, Tuple[weakref.ref, weakref.ref]] = {}


class KeptInput(NamedTuple):
    """What an armed training forward of a DBP layer keeps for the optimizer step's sample."""
    x: torch.Tensor  # the layer's input, detached (no copy: the conv saves it for its backward anyway)
    channel_mixed: bool  # x is R_c x_in, the output of the input-side channel factor
    num_samples: int  # the layer's decor_samples at that forward


def _register_weight(layer: nn.Module) -> None:
    key = id(layer.weight)

    def _forget(ref: weakref.ref, key: int = key) -> None:
        entry = _LAYER_OF_WEIGHT.get(key)
        if entry is not None and entry[0] is ref:
            del _LAYER_OF_WEIGHT[key]

    _LAYER_OF_WEIGHT[key] = (weakref.ref(layer.weight, _forget), weakref.ref(layer))


def find_decor_layer(param: torch.Tensor) -> Optional['DecorLayer']:
    """The DBP layer whose `weight` is `param`, or None."""
    entry = _LAYER_OF_WEIGHT.get(id(param))
    if entry is None:
        return None
    weight, layer = entry[0](), entry[1]()
    if weight is not param or layer is None or layer.weight is not param:
        return None
    return layer


@functools.lru_cache(maxsize=64)
def _factor_pairs(pairs: Tuple[Tuple[int, int], ...], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The `off_diagonal_pairs` of (R_c, R_s) of a list of kron layers as two tensors on `device`, made once (no
    host-to-device copy per step)."""
    channel, spatial = torch.tensor(pairs, device=device).unbind(1)
    return channel, spatial


@torch.no_grad()
def record_decorrelation(layers: Sequence['DecorLayer'], step: DecorrelationStep) -> List[torch.Tensor]:
    """Count and log, for each layer, the steps of its `decorrelation_problems` (one per factor of its R; a kron R's
    two combined by `combine_kron_steps`) in its counters and statistics buffers; returns whether each R was updated
    (every factor). `step` holds the steps of all the layers' problems in order (fields of shape (P,), as
    `grouped_decorrelation_update_` returns them). Layers are handled together, a few tensor operations per device
    and factor count whatever the number of layers (per layer, a dozen small operations cost a DBP step of a small
    model several ms on a CPU)."""
    groups: Dict[tuple, List[int]] = {}
    first_problem, num_problems = [], 0
    for i, layer in enumerate(layers):
        factors = 1 if layer._spatial_factor() is None else 2  # as in `decorrelation_problems`
        groups.setdefault((layer.decor_updates.device, factors), []).append(i)
        first_problem.append(num_problems)
        num_problems += factors
    if step.applied.shape != (num_problems,):
        raise ValueError(f'expected the steps of {num_problems} problems for these {len(layers)} layers, got '
                         f'fields of shape {tuple(step.applied.shape)}')
    applied: List[Optional[torch.Tensor]] = [None] * len(layers)
    for (device, factors), members in groups.items():
        group = [layers[i] for i in members]
        per_factor = [DecorrelationStep(*(field[where].to(device) for field in step)) for where in (
            _index_tensor(tuple(first_problem[i] + f for i in members), step.applied.device) for f in range(factors))]
        if factors == 1:
            group_step = per_factor[0]
        else:
            pairs = tuple((off_diagonal_pairs(l.decor_matrix), off_diagonal_pairs(l.decor_spatial)) for l in group)
            group_step = combine_kron_steps(*per_factor, *_factor_pairs(pairs, device))
        for name, value in (('decor_updates', group_step.applied), ('decor_skipped', ~group_step.applied),
                            ('decor_capped', group_step.capped & group_step.applied)):
            torch._foreach_add_([getattr(l, name) for l in group], list(value.long().unbind()))
        for name, value in (('decor_loss', group_step.loss), ('decor_corr', group_step.correlation),
                            ('decor_kappa', group_step.kappa)):
            torch._foreach_copy_([getattr(l, name) for l in group], list(value.unbind()))
        for i, layer_applied in zip(members, group_step.applied.unbind()):
            applied[i] = layer_applied
    return applied


class DecorLayer:
    """State and update shared by DecorConv2d and DecorLinear (a mixin).

    Buffers: `decor_matrix` and, for a kron conv, `decor_spatial` (persistent, R's factors; an unused
    `decor_spatial` is an empty non-persistent buffer), and non-persistent `decor_updates`, `decor_skipped` (updates
    applied / refused by a stability guard), `decor_capped` (updates shrunk by the step cap), `decor_loss`,
    `decor_corr` and `decor_kappa` (decorrelation loss and RMS off-diagonal correlation of the last sample before its
    update, and the kappa used; NaN before the first).
    """
    __jit_unused_properties__ = ['decor_dim', 'decor_blocks', 'decor_state_bytes']
    decor_matrix: torch.Tensor
    decor_spatial: torch.Tensor
    decor_structure: str
    decor_samples: int
    decor_vectors_per_patch: int
    decor_seed: int
    decor_matmul_dtype: str
    decor_input: Optional[KeptInput]

    def _init_decor(self, structure: str = 'full', block_size: Optional[int] = None, device=None, dtype=None) -> None:
        if structure not in DECOR_STRUCTURES:
            raise ValueError(f'decor_structure must be one of {DECOR_STRUCTURES}, got {structure!r}')
        check_block_size(block_size, 'decor_block_size')
        channels, positions = self._decor_factor_dims()
        if positions == 1:
            structure = 'full'  # one position (linear, 1x1 conv): channel and kron R are the full R
        self.decor_structure = structure
        dd = {'device': device, 'dtype': dtype}
        d = channels * positions if structure == 'full' else channels
        s = positions if structure == 'kron' else 0
        blocks = block_count(d, block_size) if d == channels else 1  # blocks only for a factor over channels
        shape = (d, d) if blocks == 1 else (blocks, d // blocks, d // blocks)
        self.register_buffer('decor_matrix', torch.empty(shape, **dd))
        self.register_buffer('decor_spatial', torch.empty(s, s, **dd), persistent=s > 0)
        self.register_buffer('decor_updates', torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.register_buffer('decor_skipped', torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.register_buffer('decor_capped', torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.register_buffer('decor_loss', torch.full((), float('nan'), device=device), persistent=False)
        self.register_buffer('decor_corr', torch.full((), float('nan'), device=device), persistent=False)
        self.register_buffer('decor_kappa', torch.full((), float('nan'), device=device), persistent=False)
        self.decor_samples = 0  # inputs to capture on the next training forward, 0 = off
        self.decor_vectors_per_patch = DEFAULT_VECTORS_PER_PATCH  # kron: vectors per factor drawn from one patch
        self.decor_seed = -1  # seed of that sample (set by the optimizer); -1 = torch's global generator
        self.decor_matmul_dtype = 'float32'  # operands of the sample's product with R (set by the optimizer)
        self.decor_input = None  # the input kept by an armed training forward, until the optimizer's sample
        self.reset_decorrelation()
        _register_weight(self)

    @property
    def decor_dim(self) -> int:
        """Input dimension d that R decorrelates in full form (C_in / groups * kh * kw, or in_features)."""
        return self.weight[0].numel()

    @property
    def decor_blocks(self) -> int:
        """G, the number of diagonal blocks of R (its channel factor); 1 for a dense R."""
        return self.decor_matrix.shape[0] if self.decor_matrix.dim() == 3 else 1

    @property
    def decor_state_bytes(self) -> int:
        """Bytes held by R (all its factors)."""
        return sum(t.numel() * t.element_size() for t in (self.decor_matrix, self.decor_spatial))

    def _decor_factor_dims(self) -> Tuple[int, int]:
        """(channels c, kernel positions s) of an input patch; (in_features, 1) for a linear layer."""
        return self.weight.shape[1], self.weight[0, 0].numel()

    @torch.no_grad()
    def reset_decorrelation(self) -> None:
        """R <- I (the layer then computes exactly the plain layer), counters to zero."""
        if self.decor_matrix.device.type != 'meta':
            self.decor_matrix.zero_().diagonal(dim1=-2, dim2=-1).fill_(1)  # I, also block by block
            if self.decor_spatial.numel():
                nn.init.eye_(self.decor_spatial)
            self.decor_updates.zero_()
            self.decor_skipped.zero_()
            self.decor_capped.zero_()
            self.decor_loss.fill_(float('nan'))
            self.decor_corr.fill_(float('nan'))
            self.decor_kappa.fill_(float('nan'))
        self.decor_input = None

    def __setstate__(self, state) -> None:
        # pickle / deepcopy build the layer without __init__: register the copy's weight as well
        super().__setstate__(state)
        self.__dict__.setdefault('decor_vectors_per_patch', DEFAULT_VECTORS_PER_PATCH)  # pickled by older versions
        self.__dict__.setdefault('decor_matmul_dtype', 'float32')
        self.__dict__.setdefault('decor_input', None)
        self.__dict__.pop('decor_inputs', None)  # an older version's sample, drawn in the forward
        _register_weight(self)

    def _spatial_factor(self) -> Optional[torch.Tensor]:
        return self.decor_spatial if self.decor_spatial.numel() > 0 else None

    def decorrelated_weight(self) -> torch.Tensor:
        """A = W R (all factors); the kernel that one plain conv / linear applies to x."""
        return fused_weight(self.weight, self.decor_matrix, self._spatial_factor())

    @torch.jit.ignore
    def _keep_decor_input(self, x: torch.Tensor, channel_mixed: bool) -> None:
        """Keep the input x of an armed training forward for the step's sample (x = R_c x_in when channel_mixed: the
        output of the input-side R_c, whose R is then not applied again). A forward with gradients saves x anyway; a
        no-grad one (`warm_up_decorrelation`) keeps its armed layers' inputs alive as a gradient forward would."""
        # NOTE under TorchScript this runs on the script wrapper: scripted models are for inference
        self.decor_input = KeptInput(x.detach(), channel_mixed, self.decor_samples)

    def take_decor_inputs(self) -> Optional[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]]:
        """Draw a sample of decorrelated inputs z = R x from the input kept by the last armed training forward (as
        many as the layer was armed for), and forget that input; None if there is none. The sample: (n, d) float32
        vectors of conv patches (full), pixel channel vectors (channel) or linear inputs; for a kron R the pair
        (channel vectors, spatial vectors) of `kron_factor_inputs` of the sampled patches. Drawn with the layer's
        `decor_seed` (its own stream, when >= 0: sampling never shifts the training RNG), `decor_vectors_per_patch`
        and `decor_matmul_dtype`, which the optimizer sets when it arms the layer."""
        kept, self.decor_input = self.decor_input, None
        return None if kept is None else self._sample_decor_inputs(*kept)

    @torch.jit.ignore
    @torch.compiler.disable  # data dependent, seeded anew every step: never traced
    @torch.no_grad()
    def _sample_decor_inputs(
            self, x: torch.Tensor, channel_mixed: bool, num_samples: int,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """`take_decor_inputs`'s sample of num_samples vectors from the kept input x."""
        generator = None
        if self.decor_seed >= 0:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(self.decor_seed)
        matmul_dtype = matmul_dtype_named(self.decor_matmul_dtype, x.device)
        with torch.autocast(x.device.type, enabled=False):  # z in float32, also under AMP
            if self.decor_structure == 'channel':  # a conv whose R_c acts on pixel vectors
                z = sample_pixels(x, self.groups, num_samples, generator).float()
            elif hasattr(self, 'kernel_size'):  # a conv
                spatial = self._spatial_factor()
                if spatial is not None:  # fewer patches, several vectors each; kept as the factors' vectors
                    num_patches = -(-num_samples // self.decor_vectors_per_patch)
                    return sample_kron_factor_inputs(x, self, self.decor_matrix, spatial, num_patches,
                                                     num_samples, generator, channel_mixed, matmul_dtype)
                z = sample_conv_patches(x, self, num_samples, generator).float()
            else:
                z = sample_rows(x, num_samples, generator).float()
            if channel_mixed:
                return z
            R = self.decor_matrix.float()
            return factor_product(z, R.mT, operand_dtype(R.shape[-1], matmul_dtype))

    def decorrelation_problems(
            self,
            inputs: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(R or one of its factors, the decorrelated vectors z it learns from) for each factor of R, from a sample
        (see `take_decor_inputs`): [(R, z)]; for a kron R its factors with their vectors, given as the sampled pair or
        computed here (`kron_factor_inputs`) from (n, c * s) / (n, c, s) patches P of x. A block-diagonal R (or R_c)
        is one problem of G blocks (`factor_problem`)."""
        spatial = self._spatial_factor()
        if spatial is None:
            return [factor_problem(self.decor_matrix, inputs)]
        if isinstance(inputs, torch.Tensor):
            inputs = kron_factor_inputs(self.decor_matrix, spatial, inputs)
        return [factor_problem(self.decor_matrix, inputs[0]), (spatial, inputs[1])]

    def record_decorrelation(self, step: DecorrelationStep) -> torch.Tensor:
        """Count and log the steps of this layer's `decorrelation_problems` (fields of shape (factors,), as
        `grouped_decorrelation_update_` returns them); returns whether R was updated (every factor).
        `record_decorrelation` does it for many layers at once."""
        return record_decorrelation([self], step)[0]

    @torch.no_grad()
    def update_decorrelation(
            self,
            inputs: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
            lr: float,
            kappa: Union[float, str],
            max_rel_change: float = 1.0,
            max_step: float = float('inf'),
            matmul_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Apply one DBP step to R from a sample of z (see `take_decor_inputs`); returns whether it was applied.

        See `timm_dbp.layers.decorrelation` for the rule (`decorrelation_update_`, and
        `kron_decorrelation_update_` for a kron R) and its guards. A DBP optimizer updates all its layers at once
        instead (`decorrelation_problems`, `grouped_decorrelation_update_`, `record_decorrelation`).
        """
        step = grouped_decorrelation_update_(self.decorrelation_problems(inputs), lr=lr, kappa=kappa,
                                             max_rel_change=max_rel_change, max_step=max_step, decorrelated=True,
                                             matmul_dtype=matmul_dtype)
        return self.record_decorrelation(step)


@register_notrace_module  # FX: a leaf, its sampling is data dependent
class DecorConv2d(DecorLayer, nn.Conv2d):
    """nn.Conv2d with a decorrelation matrix on its receptive-field patches: y = conv(x, W R).

    Built by `timm_dbp.decorrelate()`, usable directly with nn.Conv2d's arguments plus `decor_structure`
    ('full', 'channel' or 'kron').
    """

    def __init__(self, *args, decor_structure: str = 'full', decor_block_size: Optional[int] = None, device=None,
                 dtype=None, **kwargs):
        nn.Conv2d.__init__(self, *args, device=device, dtype=dtype, **kwargs)
        self._init_decor(decor_structure, decor_block_size, device=device, dtype=dtype)

    def channel_factor_on_input(self, x: torch.Tensor) -> bool:
        """Whether the forward applies R_c to the input x (a 1x1 conv) instead of fusing it into W: R acts on
        channels (channel, kron, or any 1x1 conv) and x has fewer elements than the kernel."""
        return factor_size(self.decor_matrix) == self.weight.shape[1] and x.numel() < self.weight.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        armed = self.training and self.decor_samples > 0
        if self.channel_factor_on_input(x):  # R_c on the input, the spatial factor (if any) fused into W
            R = self.decor_matrix  # (c, c), or (G, b, b): G b input-channel groups of one block each
            blocks = R.shape[0] if R.dim() == 3 else 1
            channel_kernel = R.reshape(-1, R.shape[-1]).repeat(self.groups, 1)[:, :, None, None].to(x.dtype)
            x = F.conv2d(x, channel_kernel, groups=self.groups * blocks)
            if armed:
                self._keep_decor_input(x, True)
            spatial = self._spatial_factor()
            return self._conv_forward(x, self.weight if spatial is None else fused_weight(self.weight, None, spatial),
                                      self.bias)
        if armed:
            self._keep_decor_input(x, False)  # (TorchScript passes no defaults to ignored methods)
        return self._conv_forward(x, self.decorrelated_weight(), self.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, decor_structure: str = 'full',
                  decor_block_size: Optional[int] = None) -> 'DecorConv2d':
        """DBP twin of `conv` that shares its weight and bias tensors; R = I with the given structure (and blocks
        of at most decor_block_size channels)."""
        w = conv.weight
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device='meta', dtype=w.dtype,
        )
        return _adopt(layer, conv, decor_structure, decor_block_size)


@register_notrace_module
class DecorLinear(DecorLayer, nn.Linear):
    """nn.Linear with a decorrelation matrix on its inputs: y = x (W R)^T + b (R is always full)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 decor_block_size: Optional[int] = None, device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_decor('full', decor_block_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.decor_samples > 0:
            self._keep_decor_input(x, False)  # (TorchScript passes no defaults to ignored methods)
        weight = self.decorrelated_weight()
        if self.weight.requires_grad and not weight.requires_grad:  # under no_grad: see below
            # torch's linear on a non-contiguous (B, N, C) input picks its matmul kernel by whether the weight
            # requires grad (folding the batch dims or not; a view of a flagged tensor does not count), and the two
            # kernels round differently; flag W R like the plain layer's W so that at R = I this layer stays
            # bit-identical to nn.Linear under no_grad too (no graph is built)
            weight.requires_grad_()
        return F.linear(x, weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, decor_block_size: Optional[int] = None) -> 'DecorLinear':
        """DBP twin of `linear` that shares its weight and bias tensors; R = I (blocks of at most decor_block_size
        features)."""
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            device='meta', dtype=linear.weight.dtype,
        )
        return _adopt(layer, linear, block_size=decor_block_size)


def _adopt(layer: nn.Module, src: nn.Module, structure: str = 'full', block_size: Optional[int] = None) -> nn.Module:
    """Give a meta-built DBP `layer` the tensors of the plain `src` layer and a real R = I beside them."""
    layer.weight = src.weight
    layer.bias = src.bias
    layer.train(src.training)
    device, dtype = src.weight.device, src.weight.dtype
    layer._init_decor(structure, block_size, device=device, dtype=dtype)
    return layer


DECOR_LAYERS = (DecorConv2d, DecorLinear)
