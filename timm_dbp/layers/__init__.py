from .convert import decor_layers, decorrelate, exclude_patterns, fill_decor_matrices, fold, fold_state_dict
from .decor_layers import (
    DECOR_LAYERS, DECOR_STRUCTURES, DEFAULT_STRUCTURE, DEFAULT_VECTORS_PER_PATCH, DecorConv2d, DecorLayer, DecorLinear,
    find_decor_layer, patch_pixel_table, record_decorrelation, sample_conv_patches, sample_indices,
    sample_kron_factor_inputs, sample_pixels, sample_rows)
from .sketched_conv import (
    MaskedReLU, SketchedConv2d, SketchedConvMixin, SketchedDecorConv2d, sketch_convs, sketched_conv2d, sketched_layers)
from .decorrelation import (
    MATMUL_DTYPE_NAMES, DecorrelationStep, auto_kappa, block_count, combine_kron_steps, decorrelation_loss,
    decorrelation_update_, factor_problem, factor_product, factor_rows, factor_size, fused_weight,
    grouped_decorrelation_update_, identity_factor, kron_decorrelation_update_, kron_factor_inputs,
    kron_vector_positions, matmul_dtype_named, merge_block_steps, off_diagonal_pairs, offdiag_correlation,
    times_small_matrix)
