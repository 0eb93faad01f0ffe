""" Decorrelation maths for Decorrelated Backpropagation (DBP)

Everything a reader needs to check the method against the paper lives here:
Dalm, Offergeld, Ahmad, van Gerven, "Efficient Deep Learning with Decorrelated Backpropagation",
https://arxiv.org/abs/2405.02385

A decorrelated layer with input x (dimension d) computes z = R x and y = W z. R (d x d) starts as the
identity and is learned by the local rule below, never by backprop. The layers fuse the product
(A = W R, one ordinary conv / linear), so only the update of R needs the decorrelated inputs z: an armed forward
keeps a sample of z (taken from R x where the layer computes it anyway, see `timm_dbp.layers.decor_layers`).

Update, from n sampled inputs x_1..x_n (rows of `inputs`), z_k = R x_k (or from the z_k themselves):

    X = (1/n) sum_k z_k z_k^T            uncentred second moment, d x d
    C = X - diag(diag(X))                off-diagonal part (decorrelation)
    v = diag(X) - 1                      variance error (whitening)
    R <- R - lr * [(1 - kappa) C + kappa diag(v)] R

diag(v) multiplies R from the LEFT: row i of R is scaled by v_i, so the variance of z_i is pushed
towards 1 (the stated maths; the authors' reference code scales columns by a broadcasting accident).
kappa = 0 decorrelates only, kappa = 1 normalises variances only, in between moves towards whitening.

Step cap (max_step = tau): the step is R <- (I - lr G) R with G = (1 - kappa) C + kappa diag(v), stable only while
lr |lambda|_max(G) stays well below 2. After a ReLU every input has a positive mean m, so C is close to d m m^T and
its largest eigenvalue grows with the width d: a decor_lr that suits a 256-channel layer blows up a 2048-channel one.
The cap takes lr_eff = min(lr, tau / |lambda|_max(G)), |lambda|_max estimated by POWER_ITERATIONS products G u from
the RMS of z (the mean direction that dominates C after a ReLU), so I - lr_eff G keeps its eigenvalues in
[1 - tau, 1 + tau]: R stays invertible for tau < 1, and the cap changes nothing where lr |lambda|_max <= tau.

kappa = 'auto' (the paper leaves kappa task-dependent) picks, at every update of every layer, the share of the
whitening error X - I = C + diag(v) that lies on the diagonal:  kappa = ||v||^2 / (||C||_F^2 + ||v||^2).
So the update weights each part of the error by its size: mostly decorrelation while correlations dominate,
more variance normalisation when variances drift far from 1.

Cost, from n sampled inputs of dimension d: z = R x (n d^2 flops; none when the sample is z already, as the layers
keep it), then with n >= d X (n d^2), G R (d^3) and everything else (the cap, the logged loss, correlation and auto
kappa) from the d x d matrix X alone, a few dozen tensor operations; with n < d, X is never formed:
X M = (1/n) Z^T (Z M) (2 n d^2 flops for the update), and the
off-diagonal statistics (logged loss, correlation, auto kappa) take the Gram matrix of the first LOG_STAT_ROWS rows.
Both give the same R up to float rounding. Every function here also takes a batch of equal-shape problems
(R (..., d, d), inputs (..., n, d)), and `grouped_decorrelation_update_` updates many layers' R in one batched call
per shape: a small model's update is bound by the number of tensor operations, not by flops.

matmul_dtype=torch.bfloat16 rounds the operands of these products (z, G and R; never R itself or the step) to
bfloat16, with float32 results: an error of about 2^-9 relative per entry, far below the sampling noise of X (about
1 / sqrt(n)), for products about 4x faster where the hardware multiplies bfloat16 natively (BENCHMARKS section 32).
Problems narrower than MATMUL_DTYPE_MIN_DIM multiply in float32 (there the rounding costs more than it saves).

Structured R for a conv, whose input patch is a (c x s) matrix P (c = channels per group, s = kh * kw):
    full      R is (c s) x (c s): the paper's rule on flattened patches
    channel   R = R_c (x) I_s: z = R_c P, the same R_c at every kernel position; R_c learns from pixel vectors
    kron      R = R_c (x) R_s: z = R_c P R_s^T (Kronecker-factored channel x spatial); each factor takes the
              rule above on the vectors it acts on: R_c on the columns of P R_s^T, R_s on the rows of R_c P
A structured R costs c^2 (+ s^2) numbers instead of c^2 s^2, and its update c^3 instead of c^3 s^3.

Block-diagonal channel factor (any R over channels: channel, kron's R_c, the R of a 1x1 conv or a linear layer):
R_c = diag(R_1, ..., R_G), G equal blocks of b = c / G channels, held as a (G, b, b) tensor. Block g decorrelates
channels g b ... (g + 1) b - 1 only: each block takes the rule above on its own part of z, as G independent
problems (one batched call). It costs c b numbers instead of c^2, and its update n c b + c b^2 flops instead of
n c^2 + c^3; correlations between channels of different blocks are left in place.
"""
import functools
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    'DecorrelationStep', 'decorrelation_update_', 'grouped_decorrelation_update_', 'kron_decorrelation_update_',
    'kron_factor_inputs', 'kron_vector_positions', 'off_diagonal_pairs', 'combine_kron_steps', 'decorrelation_loss',
    'auto_kappa', 'offdiag_correlation', 'fused_weight', 'times_small_matrix', 'block_count', 'factor_size',
    'factor_product', 'factor_rows', 'factor_problem', 'identity_factor', 'merge_block_steps', 'check_block_size',
    'LOG_STAT_ROWS', 'POWER_ITERATIONS', 'BATCH_MAX_DIM', 'KRON_MIN_VECTORS', 'SMALL_PRODUCT_CONV_MIN',
    'MATMUL_DTYPES', 'MATMUL_DTYPE_NAMES', 'MATMUL_DTYPE_MIN_DIM', 'matmul_dtype_named', 'operand_dtype',
    'rounded_product', 'batch_matmul', 'BALANCED_BMM_MIN_MACS']

LOG_STAT_ROWS = 256  # rows of a sample (n < d) used for the logged loss / correlation (cost n^2 d)
POWER_ITERATIONS = 4  # products G u estimating |lambda|_max(G) for the step cap
BATCH_MAX_DIM = 512  # `grouped_decorrelation_update_` batches equal-shape R's up to this size
MATMUL_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16}  # of the products (float16 could overflow X)
MATMUL_DTYPE_NAMES = (*MATMUL_DTYPES, 'auto')  # the values of decor_matmul_dtype (`matmul_dtype_named`)
MATMUL_DTYPE_MIN_DIM = 128  # narrower problems multiply in float32: operation count, not flops (BENCHMARKS 32)
BALANCED_BMM_MIN_MACS = 1 << 20  # `batch_matmul` splits CPU batches of float32 products this large (BENCHMARKS 47)


class DecorrelationStep(NamedTuple):
    """Outcome of one `decorrelation_update_` call, as tensors on R's device (no host sync): 0-dim, or of shape
    (...,) for a batch of R's.

    Attributes:
        applied: True if R was changed; False if a stability guard skipped the update.
        kappa: The kappa used (the chosen one for kappa='auto').
        loss: Decorrelation loss of the sample before the update (see `decorrelation_loss`).
        correlation: RMS off-diagonal correlation of z before the update (see `offdiag_correlation`).
        rel_change: ||delta R||_F / ||R||_F of the proposed update.
        capped: True if the step cap shrank the step (lr_eff < lr; see the module docstring).
    """
    applied: torch.Tensor
    loss: torch.Tensor
    correlation: torch.Tensor
    rel_change: torch.Tensor
    kappa: torch.Tensor
    capped: torch.Tensor


def check_block_size(block_size: Optional[int], name: str = 'block_size') -> None:
    """Raise ValueError unless block_size (the argument `name`) is an int >= 1 or None."""
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f'{name} must be an int >= 1 or None, got {block_size!r}')


def block_count(c: int, block_size: Optional[int]) -> int:
    """G, the fewest equal blocks of at most block_size channels that c channels split into (1: one dense c x c
    factor; None: no limit)."""
    if block_size is None or c <= block_size:
        return 1
    return next(g for g in range(-(-c // block_size), c + 1) if c % g == 0)


def identity_factor(shape: Sequence[int], **tensor_kwargs) -> torch.Tensor:
    """R = I of a factor's shape: (c, c), or (G, b, b) for a block-diagonal one."""
    return torch.eye(shape[-1], **tensor_kwargs).expand(*shape).clone()


def factor_size(R: torch.Tensor) -> int:
    """The dimension a factor acts on: c for (c, c), G b for a block-diagonal (G, b, b)."""
    return R.shape[-1] if R.dim() == 2 else R.shape[0] * R.shape[-1]


def factor_product(v: torch.Tensor, R: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """v @ R for v (..., c) and a factor R, (c, c) or block-diagonal (G, b, b) (one bmm over the blocks, v's
    channels g b ... (g + 1) b - 1 times block g). dtype: operands rounded to it with float32 results
    (`rounded_product`); None: the plain product in v's dtype."""
    if R.dim() == 2:
        return v @ R if dtype is None else rounded_product(v, R, dtype)
    blocks, b = R.shape[0], R.shape[-1]
    v_blocks = v.reshape(-1, blocks, b).transpose(0, 1)  # (G, rows, b)
    product = torch.bmm(v_blocks, R) if dtype is None else rounded_product(v_blocks, R, dtype)
    return product.transpose(0, 1).reshape(v.shape)


def factor_rows(R: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (integer tensor, any shape) of a factor as dense vectors, shape (*rows.shape, c); for a
    block-diagonal R each row is zero outside its block."""
    if R.dim() == 2:
        return R[rows]
    b = R.shape[-1]
    block = torch.div(rows, b, rounding_mode='floor')
    dense = R.new_zeros(rows.shape + (R.shape[0], b))
    dense.scatter_(-2, block[..., None, None].expand(rows.shape + (1, b)), R[block, rows % b][..., None, :])
    return dense.flatten(-2)


def factor_problem(R: torch.Tensor, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(R, z) as `decorrelation_update_` takes them, from z (n, c): a block-diagonal R (G, b, b) is G problems,
    block g learning from its channels' part of z, (G, n, b)."""
    if R.dim() == 2:
        return R, z
    return R, z.reshape(-1, R.shape[0], R.shape[-1]).transpose(0, 1)


def fused_weight(
        weight: torch.Tensor,
        R: Optional[torch.Tensor],
        spatial: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A = W R: the weight one plain conv / linear applies to x instead of W to z = R x.

    A full R (d x d, d = weight[0].numel()) multiplies W viewed as (out, d). A channel factor R_c (c x c,
    c < d) and / or a spatial factor R_s (s x s) act on W viewed as (out, c, s): A_o = R_c^T W_o R_s, the
    same as W (R_c (x) R_s). R = None skips the channel factor (it is then applied to the input instead).
    A block-diagonal R (G, b, b) is its dense block-diagonal matrix (`factor_product`).
    """
    out, d = weight.shape[0], weight[0].numel()
    if R is not None and factor_size(R) == d:
        A = factor_product(weight.reshape(out, d), R.to(weight.dtype))
    else:
        c = weight.shape[1]
        A = weight.reshape(out, c, -1)
        if spatial is not None:
            A = times_small_matrix(A, spatial.to(weight.dtype))  # A_o R_s for every o
        if R is not None:  # (A_o^T R_c)^T for all o as one (out s, c) x (c, c) product, not `out` small ones
            s = A.shape[2]
            A = factor_product(A.transpose(1, 2).reshape(out * s, c), R.to(weight.dtype))
            # a transposed view would reach the conv as a channels-last kernel (other rounding); contiguous() would
            # keep it when c = 1 (a size-1 dim passes as contiguous), and torch.compile's stride propagation then
            # disagrees with the eager conv about the layout of its output: copy to the standard strides
            A = A.reshape(out, s, c).transpose(1, 2).clone(memory_format=torch.contiguous_format)
    return A if A.shape == weight.shape else A.reshape(weight.shape)  # no needless view of A (see DecorLinear)


SMALL_PRODUCT_CONV_MIN = 1 << 18  # `times_small_matrix` uses a 1x1 conv on CPU from this many elements of A


def _conv_times(A: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """A @ M for A (p, q, k) as one channels-last 1x1 conv: A's memory is already that of a (1, k, p, q) image in
    channels-last order, so no copy is made on either side, and the kernel M^T is laid out channels-last too (a
    kernel oneDNN reads as contiguous would make it reorder the whole of A)."""
    k = M.shape[0]
    kernel = torch.empty_strided((k, k, 1, 1), (k, 1, k, k), dtype=M.dtype, device=M.device)
    kernel.copy_(M.mT[:, :, None, None])
    return torch.nn.functional.conv2d(A.permute(2, 0, 1)[None], kernel)[0].permute(1, 2, 0)


class _TimesSmallMatrix(torch.autograd.Function):
    """A @ M and its gradient grad @ M^T by the same 1x1 conv (M takes no gradient: R is never trained by autograd);
    autograd through the conv itself would take a slower backward path."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        if ctx.needs_input_grad[1]:
            raise RuntimeError('times_small_matrix: M must not require grad (R is updated by the DBP rule only)')
        ctx.save_for_backward(M)
        return _conv_times(A, M)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        M, = ctx.saved_tensors
        return _conv_times(grad.contiguous(), M.mT), None


def times_small_matrix(A: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """A @ M for A (p, q, k) and a small k x k matrix M (a kron R's spatial factor, k = kh * kw), differentiable in A.

    An (N, 9) x (9, 9) sgemm runs far below memory speed on CPU (MKL, 2 cores: 6.0 ms for N = 512 * 512, a copy of A
    1.4 ms; BENCHMARKS section 30); there a float32 A of at least SMALL_PRODUCT_CONV_MIN elements (from a 256 x 128
    x 3 x 3 kernel up; smaller ones gain nothing) goes through one channels-last 1x1 conv instead (2.9 ms; forward +
    backward 6.3 ms against 13.6). Same values up to float rounding; exact for M = I. Under torch.compile the plain
    product (inductor makes the conv 3-5x slower than eager: BENCHMARKS section 44c).
    """
    if not torch.jit.is_scripting():  # (TorchScript compiles no autograd.Function; it skips this block)
        if (not torch.compiler.is_compiling() and A.device.type == 'cpu' and A.dtype == torch.float32 and A.ndim == 3
                and A.numel() >= SMALL_PRODUCT_CONV_MIN):
            return _TimesSmallMatrix.apply(A, M)
    return A @ M


def _offdiag_sq_mean(z: torch.Tensor) -> torch.Tensor:
    """mean_{i != j} X_ij^2 for X = z^T z / n; via the n x n Gram matrix when n < d (n^2 d flops, not n d^2)."""
    n, d = z.shape[-2:]
    gram = z @ z.mT if n < d else z.mT @ z
    sq_sum = gram.square().sum((-2, -1)) / (n * n)  # ||X||_F^2 = ||Z Z^T||_F^2 / n^2
    return _offdiag_part(sq_sum, z.square().mean(-2))


def _moment_offdiag_sq_mean(X: torch.Tensor) -> torch.Tensor:
    """mean_{i != j} X_ij^2 of a second moment X (..., d, d) itself."""
    return _offdiag_part(X.square().sum((-2, -1)), X.diagonal(dim1=-2, dim2=-1))


def _offdiag_part(sq_sum: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """mean_{i != j} X_ij^2 from ||X||_F^2 and diag(X) (..., d)."""
    d = diag.shape[-1]
    return (sq_sum - diag.square().sum(-1)).clamp_min(0) / max(d * (d - 1), 1)


def _weighted_loss(offdiag_sq: torch.Tensor, variance_error: torch.Tensor,
                   kappa: Union[float, torch.Tensor]) -> torch.Tensor:
    """(1 - kappa) * mean_{i != j} X_ij^2 + kappa * mean_i v_i^2 (see `decorrelation_loss`)."""
    return (1 - kappa) * offdiag_sq + kappa * variance_error.square().mean(-1)


def _moment_correlation(X: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """`offdiag_correlation` of the inputs whose second moment is X (..., d, d)."""
    scale = X.diagonal(dim1=-2, dim2=-1).add(eps).rsqrt()
    return _moment_offdiag_sq_mean(X * scale[..., :, None] * scale[..., None, :]).sqrt()


def _diagonal_share(offdiag_sq_sum: torch.Tensor, variance_error: torch.Tensor) -> torch.Tensor:
    """||v||^2 / (||C||_F^2 + ||v||^2) from ||C||_F^2 and v (see `auto_kappa`)."""
    diagonal = variance_error.square().sum(-1)
    return diagonal / (offdiag_sq_sum + diagonal).clamp_min(1e-30)


def decorrelation_loss(z: torch.Tensor, kappa: Union[float, torch.Tensor]) -> torch.Tensor:
    """Loss that the update descends: (1 - kappa) * mean_{i != j} X_ij^2 + kappa * mean_i v_i^2, X = z^T z / n.

    Args:
        z: Decorrelated inputs, shape (..., n, d).
        kappa: Balance between decorrelation (0) and variance normalisation (1); a number or shape (...,).
    """
    return _weighted_loss(_offdiag_sq_mean(z), z.square().mean(-2) - 1, kappa)


def auto_kappa(z: torch.Tensor, variance_error: torch.Tensor) -> torch.Tensor:
    """kappa = ||v||^2 / (||C||_F^2 + ||v||^2): the diagonal share of the whitening error X - I.

    Args:
        z: Decorrelated inputs for ||C||_F, shape (..., n, d).
        variance_error: v = diag(X) - 1, shape (..., d) (may come from a larger sample than z).
    """
    d = z.shape[-1]
    return _diagonal_share(_offdiag_sq_mean(z) * d * (d - 1), variance_error)


def offdiag_correlation(z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """RMS off-diagonal correlation sqrt(mean_{i != j} rho_ij^2), rho_ij = X_ij / sqrt(X_ii X_jj) (uncentred).

    A sample estimate: with n samples, independent inputs still give about 1/sqrt(n).

    Args:
        z: Inputs, shape (..., n, d).
    """
    return _offdiag_sq_mean(z * z.square().mean(-2, keepdim=True).add(eps).rsqrt()).sqrt()


def matmul_dtype_named(name: str, device: torch.device) -> torch.dtype:
    """The operand dtype a `decor_matmul_dtype` name stands for on `device`: a key of MATMUL_DTYPES, or 'auto' =
    bfloat16 where the hardware multiplies it natively (CUDA compute capability 8.0 or later; a CPU with AVX512_BF16
    or AMX), float32 elsewhere (emulated bfloat16 is slower than float32)."""
    if name == 'auto':
        return torch.bfloat16 if _native_bfloat16(device.type, device.index) else torch.float32
    if name not in MATMUL_DTYPES:
        raise ValueError(f"decor_matmul_dtype must be one of {', '.join(MATMUL_DTYPE_NAMES)}, got {name!r}")
    return MATMUL_DTYPES[name]


@functools.lru_cache(maxsize=None)
def _native_bfloat16(device_type: str, index: Optional[int]) -> bool:
    if device_type == 'cuda':
        return torch.cuda.get_device_capability(index)[0] >= 8
    if device_type == 'cpu':
        try:
            with open('/proc/cpuinfo') as f:
                flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
        except OSError:  # not Linux: assume no bfloat16 units
            return False
        return 'avx512_bf16' in flags or 'amx_bf16' in flags
    return False


def operand_dtype(d: int, matmul_dtype: torch.dtype) -> torch.dtype:
    """The dtype the products of a d-dimensional problem round their operands to: matmul_dtype, but float32 below
    MATMUL_DTYPE_MIN_DIM (there rounding costs more than the product saves)."""
    if matmul_dtype not in MATMUL_DTYPES.values():
        raise ValueError(f'matmul_dtype must be one of {tuple(MATMUL_DTYPES.values())}, got {matmul_dtype!r}')
    return matmul_dtype if d >= MATMUL_DTYPE_MIN_DIM else torch.float32


def batch_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """torch.bmm(A, B) for batches (G, p, q) and (G, q, r). A CPU bmm hands each of the G products to one thread, so
    with T threads the last G % T products run on G % T threads while the others wait (3 products 1024 x 512 into
    512 x 512 on 2 threads take as long as 4). float32 products of at least BALANCED_BMM_MIN_MACS multiply-adds are
    therefore split on the CPU: one bmm over the first G - G % T, then one mm (on all T threads) per remaining product.
    One bmm otherwise: other dtypes (bfloat16 products may take other kernels; not measured), products that need a
    gradient, and under TorchScript."""
    if torch.jit.is_scripting():
        return torch.bmm(A, B)
    return _thread_balanced_bmm(A, B)


@torch.jit.unused  # (TorchScript has no get_num_threads)
def _thread_balanced_bmm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """`batch_matmul` in eager mode."""
    G = A.shape[0]
    split = G - G % torch.get_num_threads()
    if (A.device.type != 'cpu' or A.dtype != torch.float32 or split == G
            or A.shape[1] * A.shape[2] * B.shape[2] < BALANCED_BMM_MIN_MACS
            or (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad))):
        return torch.bmm(A, B)
    out = A.new_empty(G, A.shape[1], B.shape[2])
    if split:
        torch.bmm(A[:split], B[:split], out=out[:split])
    for i in range(split, G):
        torch.mm(A[i], B[i], out=out[i])
    return out


def rounded_product(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A @ B in float32 from operands rounded to dtype (float32: the plain product); two batches of matrices by
    `batch_matmul`."""
    rounded = not A.dtype == B.dtype == dtype == torch.float32  # (the float32 default dispatches no conversions)
    if rounded:
        A, B = A.to(dtype), B.to(dtype)
    product = batch_matmul(A, B) if A.ndim == B.ndim == 3 else A @ B
    return product.float() if rounded else product


@torch.no_grad()
def decorrelation_update_(
        R: torch.Tensor,
        inputs: torch.Tensor,
        *,
        lr: float,
        kappa: Union[float, str],
        max_rel_change: float = 1.0,
        max_step: float = float('inf'),
        decorrelated: bool = False,
        matmul_dtype: torch.dtype = torch.float32,
) -> DecorrelationStep:
    """One DBP step on R in place: R <- R - lr * [(1 - kappa) C + kappa diag(v)] R (see module docstring).

    The step cap replaces lr by min(lr, max_step / |lambda|_max(G)) (inf: the plain rule, nothing estimated).
    Guards: the update is skipped (R untouched, `applied=False`) when the proposed change is non-finite
    (e.g. a NaN / inf input) or when ||delta R||_F > max_rel_change * ||R||_F (an update that would blow R up).
    With n >= d the logged loss and correlation are of the whole sample (from X); with n < d (X not formed) their
    off-diagonal parts are of its first LOG_STAT_ROWS rows (the variance error v always of the whole sample).

    Args:
        R: Decorrelation matrix, shape (d, d), or a batch (..., d, d); updated in place.
        inputs: Sampled layer inputs x, shape (n, d) (a batch: (..., n, d)), n >= 1; with decorrelated=True their
            z = R x (computed with this R) instead, which saves the n d^2 product.
        lr: Decorrelation learning rate (>= 0).
        kappa: 0 = decorrelate only, 1 = variance normalisation only, 'auto' = `auto_kappa` of this sample.
        max_rel_change: Largest accepted relative change of R per update.
        max_step: Largest lr * |lambda|_max(G) of a step (> 0); larger steps are shrunk to it.
        matmul_dtype: Operand dtype of the matrix products (float32 or bfloat16; results are float32 either way).

    Returns:
        A `DecorrelationStep`: applied or not, loss and correlation before the update, relative change, kappa,
        capped or not.
    """
    step = _flat_update_(R, inputs, lr=lr, kappa=kappa, max_rel_change=max_rel_change, max_step=max_step,
                         decorrelated=decorrelated, matmul_dtype=matmul_dtype)
    return DecorrelationStep(*(field.view(R.shape[:-2]) for field in step))


def _flat_update_(R: torch.Tensor, inputs: torch.Tensor, *, lr: float, kappa: Union[float, str], max_rel_change: float,
                  max_step: float, decorrelated: bool, matmul_dtype: torch.dtype = torch.float32) -> DecorrelationStep:
    """`decorrelation_update_` with the step's fields of shape (b,) for the b = R[..., 0, 0].numel() R's."""
    assert R.ndim >= 2 and R.shape[-1] == R.shape[-2], f'R must be square, got {tuple(R.shape)}'
    assert inputs.shape[:-2] == R.shape[:-2] and inputs.shape[-1] == R.shape[-1], \
        f'inputs must be (..., n, {R.shape[-1]}) with R\'s batch shape {tuple(R.shape[:-2])}, got {tuple(inputs.shape)}'
    n, d = inputs.shape[-2:]
    Rf = R.float().reshape(-1, d, d)  # one batch dimension: every product is one batched product (`batch_matmul`)
    z = inputs.float().reshape(-1, n, d)
    dtype = operand_dtype(d, matmul_dtype)
    times = functools.partial(rounded_product, dtype=dtype)
    if not decorrelated:
        z = times(z, Rf.mT)  # z_k = R x_k for every row
    z_mm = z.to(dtype)  # the products' operand, rounded once (z itself stays float32)
    if n >= d:  # X itself (n d^2 flops); everything else is d x d work
        X = times(z_mm.mT, z_mm).div_(n)
        diag = X.diagonal(dim1=-2, dim2=-1)
        offdiag_sq, correlation = _moment_offdiag_sq_mean(X), _moment_correlation(X)
    else:  # X never formed: X M = (1/n) Z^T (Z M), 2 n d k flops for a d x k matrix M
        diag = z.square().mean(-2)
        z_log = z[:, :LOG_STAT_ROWS]
        offdiag_sq, correlation = _offdiag_sq_mean(z_log), offdiag_correlation(z_log)
    if kappa == 'auto':
        kappa = _diagonal_share(offdiag_sq * d * (d - 1), diag - 1)
    else:
        kappa = diag.new_full(diag.shape[:-1], float(kappa))
    k = kappa[:, None]
    # G = (1 - kappa) (X - D) + kappa (D - I) with D = diag(X), i.e. (1 - kappa) X + diag(row_scale)
    row_scale = (2 * k - 1) * diag - k
    if n >= d:  # G itself (d^2 numbers): then every product G M is one batched product
        G = X * (1 - k[:, None])
        G.diagonal(dim1=-2, dim2=-1).add_(row_scale)
        G = G.to(dtype)  # rounded once, not per product

        def times_G(M: torch.Tensor) -> torch.Tensor:
            return times(G, M)
    else:
        def times_G(M: torch.Tensor) -> torch.Tensor:
            return torch.addcmul(times(z_mm.mT, times(z_mm, M)) * ((1 - k[:, None]) / n), row_scale[..., None], M)
    step_size = diag.new_full(diag.shape[:-1], float(lr))
    if max_step != float('inf'):
        step_size = torch.minimum(step_size, max_step / _largest_eigenvalue(times_G, diag.sqrt()))
    delta = times_G(Rf).mul_(step_size[:, None, None])

    # Guards without a host sync: a rejected update is selected away, not branched around.
    rel_change = torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(Rf).clamp_min(1e-30)
    applied = rel_change <= max_rel_change  # False for NaN / inf
    R.sub_(torch.where(applied[:, None, None], delta, 0.0).view(R.shape).to(R.dtype))
    return DecorrelationStep(
        applied, _weighted_loss(offdiag_sq, diag - 1, kappa), correlation, rel_change, kappa, step_size < lr)


def _largest_eigenvalue(times_G: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor) -> torch.Tensor:
    """|lambda|_max of G = (1 - kappa) C + kappa diag(v) by POWER_ITERATIONS products G u, from `start` (the RMS of
    z: the mean direction that dominates C after a ReLU)."""
    Gu = start[..., None]
    for _ in range(POWER_ITERATIONS):
        Gu = times_G(Gu / torch.linalg.vector_norm(Gu, dim=-2, keepdim=True).clamp_min(1e-30))
    return torch.linalg.vector_norm(Gu, dim=(-2, -1))


@torch.no_grad()
def grouped_decorrelation_update_(
        problems: Sequence[Tuple[torch.Tensor, torch.Tensor]],
        *,
        lr: float,
        kappa: Union[float, str],
        max_rel_change: float = 1.0,
        max_step: float = float('inf'),
        decorrelated: bool = False,
        matmul_dtype: torch.dtype = torch.float32,
) -> DecorrelationStep:
    """`decorrelation_update_` on every (R, inputs) pair, one batched call per group of equal shapes and dtypes.

    The same rule and guards per pair, so the result is each pair's own update (up to float rounding): pairs of a
    group are stacked, updated as a batch and copied back into their R. Only R's of at most BATCH_MAX_DIM rows are
    batched: batching saves per-operation overhead, which only small problems feel, and stacking large ones costs
    memory (full R of resnet18: 1 GiB more peak training memory); larger R's are updated one by one.
    decorrelated=True: every pair's inputs are its z = R x; matmul_dtype as for `decorrelation_update_`.

    A pair may also hold the G blocks of a block-diagonal R with their inputs, (G, d, d) and (G, n, d)
    (`factor_problem`): its step is the blocks' steps merged (`merge_block_steps`).

    Returns:
        The steps of all pairs as one `DecorrelationStep` whose fields have shape (len(problems),), pair i's at
        index i, on the first pair's device (kept stacked: splitting them costs one operation per pair and field).
    """
    if not problems or any(R.ndim not in (2, 3) for R, _ in problems):
        raise ValueError('grouped_decorrelation_update_ takes one or more (R, inputs) pairs of one R (d x d) or one '
                         'block-diagonal R (G x d x d) each')
    rule = dict(lr=lr, kappa=kappa, max_rel_change=max_rel_change, max_step=max_step, decorrelated=decorrelated,
                matmul_dtype=matmul_dtype)
    groups: Dict[tuple, List[int]] = {}
    for i, (R, inputs) in enumerate(problems):
        groups.setdefault((R.shape, R.dtype, R.device, inputs.shape, inputs.dtype), []).append(i)
    order: List[int] = []  # pair of each entry of the concatenated steps
    parts: List[DecorrelationStep] = []
    for members in groups.values():
        Rs = [problems[i][0] for i in members]
        if len(members) == 1 or Rs[0].shape[-1] > BATCH_MAX_DIM:
            steps = [_flat_update_(*problems[i], **rule) for i in members]
        else:
            batch = torch.stack(Rs)
            steps = [_flat_update_(batch, torch.stack([problems[i][1] for i in members]), **rule)]
            torch._foreach_copy_(Rs, list(batch.unbind(0)))
        if Rs[0].ndim == 3:  # G blocks per pair
            steps = [merge_block_steps(step, Rs[0].shape[0]) for step in steps]
        parts += steps
        order += members
    device = problems[0][0].device
    fields = [torch.cat([field.to(device) for field in part_fields]) for part_fields in zip(*parts)]
    if order != sorted(order):
        where = _index_tensor(tuple(sorted(range(len(order)), key=order.__getitem__)), device)
        fields = [field[where] for field in fields]
    return DecorrelationStep(*fields)


def merge_block_steps(step: DecorrelationStep, blocks: int) -> DecorrelationStep:
    """One step per block-diagonal R from the steps of its G = `blocks` blocks (fields of shape (P G,), the blocks
    of each R in a row): `applied` when every block was updated (a refused block keeps its value), `loss` and
    `kappa` the blocks' mean, `correlation` the RMS over the blocks (each has the same number of off-diagonal
    pairs), `rel_change` the largest, `capped` when any was. Fields of shape (P,)."""
    fields = [field.view(-1, blocks) for field in step]
    applied, loss, correlation, rel_change, kappa, capped = fields
    return DecorrelationStep(applied.all(1), loss.mean(1), correlation.square().mean(1).sqrt(),
                             rel_change.amax(1), kappa.mean(1), capped.any(1))


@functools.lru_cache(maxsize=256)
def _index_tensor(indices: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`indices` as an int64 tensor on `device`, made once per tuple (no host-to-device copy per step). Cached:
    callers must not modify it."""
    return torch.tensor(indices, dtype=torch.long, device=device)


KRON_MIN_VECTORS = 1024  # vectors a kron factor learns from by default (`kron_factor_inputs`)


@functools.lru_cache(maxsize=256)
def kron_vector_positions(n: int, size: int, num_vectors: int, device: torch.device) -> torch.Tensor:
    """Which of a kron factor's `size` positions (rows of R_c, or of R_s) patch k's vectors use: indices (n, q),
    (k q + j) mod size, q = num_vectors // n (at least 1, at most size). Cached (a fixed table per shape, read by
    every armed forward): callers must not modify it."""
    q = min(size, max(1, num_vectors // n))
    return (torch.arange(n, device=device)[:, None] * q + torch.arange(q, device=device)) % size


def kron_factor_inputs(
        R_channel: torch.Tensor,
        R_spatial: torch.Tensor,
        patches: torch.Tensor,
        num_vectors: Optional[int] = None,
        channel_mixed: bool = False,
        matmul_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The decorrelated vectors each factor of R = R_c (x) R_s learns from, for the current factors: parts of
    z_k = R_c P_k R_s^T (see the module docstring), ready for `decorrelation_update_(..., decorrelated=True)`.

    Per sampled patch P_k (c x s), q = num_vectors // n vectors each (at least 1, so a large sample costs a factor's
    update n c^2, not n s c^2; at most all of them): for R_c the columns (k q + j) mod s of z_k (R_c applied to the
    columns of P_k R_s^T), for R_s the rows (k q + j) mod c of z_k (R_s applied to the rows of R_c P_k), j < q.
    num_vectors defaults to KRON_MIN_VECTORS. A kron layer draws n = decor_samples / decor_vectors_per_patch patches
    and asks for decor_samples vectors: gathering the patches is the costly part of sampling (1 by default: BENCHMARKS
    section 25 found no measurable time gain for 2 or 4 on a 2-core CPU, and lower accuracy on wide twins).

    Args:
        R_channel: Channel factor, shape (c, c), or block-diagonal (G, c / G, c / G).
        R_spatial: Spatial factor, shape (s, s).
        patches: Sampled conv patches P, shape (n, c * s) or (n, c, s).
        channel_mixed: The patches are R_c P already (drawn from the output of an input-side R_c): R_c is not applied.
        matmul_dtype: Operand dtype of the n x c x c product with R_c (see `operand_dtype`).

    Returns:
        (channel vectors (n q, c), spatial vectors (n q', s)), float32.
    """
    c, s = factor_size(R_channel), R_spatial.shape[0]
    P = patches.float().reshape(-1, c, s)
    n, num_vectors = P.shape[0], KRON_MIN_VECTORS if num_vectors is None else num_vectors
    positions_s, positions_c = (kron_vector_positions(n, size, num_vectors, P.device) for size in (s, c))
    R_c, R_s = R_channel.float(), R_spatial.float()
    channel_vectors = torch.einsum('ncs,nqs->nqc', P, R_s[positions_s])  # columns of P R_s^T
    if channel_mixed:
        spatial_vectors = P.gather(1, positions_c[:, :, None].expand(-1, -1, s))  # rows of R_c P, as drawn
    else:
        channel_vectors = factor_product(channel_vectors, R_c.mT, operand_dtype(R_c.shape[-1], matmul_dtype))
        spatial_vectors = torch.einsum('nqc,ncs->nqs', factor_rows(R_c, positions_c), P)
    return channel_vectors.reshape(-1, c), spatial_vectors.reshape(-1, s) @ R_s.mT


def off_diagonal_pairs(R: torch.Tensor) -> int:
    """How many off-diagonal entries of z z^T a factor decorrelates: c (c - 1) for (c, c), G b (b - 1) for a
    block-diagonal (G, b, b) (pairs of channels in different blocks are left alone)."""
    blocks = R.shape[0] if R.dim() == 3 else 1
    return blocks * R.shape[-1] * (R.shape[-1] - 1)


def combine_kron_steps(
        channel: DecorrelationStep,
        spatial: DecorrelationStep,
        pairs_channel: Union[int, torch.Tensor],
        pairs_spatial: Union[int, torch.Tensor],
) -> DecorrelationStep:
    """One step for R = R_c (x) R_s from its factors' steps: `applied` when both were updated, `loss` the sum of
    the two losses, `correlation` the RMS over both factors' off-diagonal entries (`off_diagonal_pairs` of each),
    `rel_change` the larger, `kappa` the mean, `capped` when either was capped. Steps of a batch of R's take
    tensors of pair counts of the batch's shape."""
    pairs = pairs_channel + pairs_spatial
    pairs = pairs.clamp_min(1) if isinstance(pairs, torch.Tensor) else max(pairs, 1)
    correlation = ((channel.correlation.square() * pairs_channel + spatial.correlation.square() * pairs_spatial)
                   / pairs).sqrt()
    return DecorrelationStep(
        channel.applied & spatial.applied,
        channel.loss + spatial.loss,
        correlation,
        torch.maximum(channel.rel_change, spatial.rel_change),
        (channel.kappa + spatial.kappa) / 2,
        channel.capped | spatial.capped,
    )


@torch.no_grad()
def kron_decorrelation_update_(
        R_channel: torch.Tensor,
        R_spatial: torch.Tensor,
        patches: torch.Tensor,
        *,
        lr: float,
        kappa: Union[float, str],
        max_rel_change: float = 1.0,
        max_step: float = float('inf'),
        matmul_dtype: torch.dtype = torch.float32,
) -> DecorrelationStep:
    """One DBP step on both factors of R = R_c (x) R_s in place, from the same current z = R_c P R_s^T.

    Each factor takes `decorrelation_update_` on its `kron_factor_inputs`, with its own guard (a refused factor keeps
    its value); the two steps are combined by `combine_kron_steps`.

    Args:
        R_channel: Channel factor, shape (c, c) or block-diagonal (G, c / G, c / G); updated in place.
        R_spatial: Spatial factor, shape (s, s); updated in place.
        patches: Sampled conv patches P (not yet decorrelated), shape (n, c * s) or (n, c, s).
        lr, kappa, max_rel_change, max_step, matmul_dtype: As for `decorrelation_update_`.
    """
    channel_vectors, spatial_vectors = kron_factor_inputs(R_channel, R_spatial, patches)
    steps = grouped_decorrelation_update_(
        [factor_problem(R_channel, channel_vectors), (R_spatial, spatial_vectors)], lr=lr, kappa=kappa,
        max_rel_change=max_rel_change, max_step=max_step, decorrelated=True, matmul_dtype=matmul_dtype)
    channel, spatial = (DecorrelationStep(*(field[i] for field in steps)) for i in (0, 1))
    return combine_kron_steps(channel, spatial, off_diagonal_pairs(R_channel), off_diagonal_pairs(R_spatial))
