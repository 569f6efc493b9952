"""Bilinear deformable sampling in pure PyTorch.

The core of single-level deformable attention (Deformable DETR's ``ms_deform_attn`` with one
level): every query gathers ``P`` bilinearly interpolated values per head and sums them with
softmax weights. The sampling rule is the CUDA kernel's: a location ``l`` in [0, 1] maps to
pixel ``l * size - 0.5`` and corners outside the map contribute zero, which is
``F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)``.

It is the formulation of Deformable DETR's ``ms_deform_attn_core_pytorch`` for one level,
without the per-level split, stack and flatten copies. ``grid_sample``'s fused kernels beat
every other pure-PyTorch formulation measured on CPU (a corner-index ``gather``, a fused
``embedding_bag`` over precomputed corners, ``index_add_``/sort-based scatters for the backward):
computing four corner indices and weights per point takes more elementwise passes than the
sampling itself, and the backward's scatter is fastest in ``grid_sampler_2d_backward``.
``grid_sample`` is also what ONNX (GridSample) and ``torch.compile`` know.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ['deform_sample']


def deform_sample(
        value: torch.Tensor,
        value_hw: Tuple[int, int],
        locations: torch.Tensor,
        attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples of ``value`` at ``locations``, per head.

    Args:
        value: (B, H*W, heads, head_dim) values on an H x W grid, row-major.
        value_hw: (H, W) of that grid.
        locations: (B, Q, heads, P, 2) sampling locations (x, y) normalised to [0, 1].
        attention_weights: (B, Q, heads, P) weights of the P points (softmax already applied).

    Returns:
        (B, Q, heads * head_dim), in ``value``'s dtype. Sampling runs in at least fp32
        (half-precision inputs are upcast): bilinear weights in bf16 would place a sample up to
        half a pixel off on a 100-pixel map.
    """
    batch, num_values, heads, head_dim = value.shape
    height, width = value_hw
    _, num_queries, _, num_points, _ = locations.shape
    if num_values != height * width:
        raise ValueError(f'value has {num_values} positions but value_hw is {height}x{width}.')
    dtype = torch.promote_types(value.dtype, torch.float32)
    images = value.to(dtype).permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
    # Points lead and queries trail, so the weighted sum below reduces over a middle axis with the
    # query axis contiguous: this op's forward ran 1.4-1.7x faster on CPU than with a trailing P axis.
    grid = (2 * locations.to(dtype) - 1).permute(0, 2, 3, 1, 4).reshape(batch * heads, num_points, num_queries, 2)
    sampled = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    weights = attention_weights.to(dtype).permute(0, 2, 3, 1).reshape(batch * heads, 1, num_points, num_queries)
    out = (sampled * weights).sum(2)  # (B * heads, head_dim, Q)
    return out.view(batch, heads * head_dim, num_queries).transpose(1, 2).to(value.dtype)
