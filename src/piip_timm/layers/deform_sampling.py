"""Bilinear deformable sampling in pure PyTorch.

This is the core of single-level deformable attention (Deformable DETR's
``ms_deform_attn`` with one level): every query gathers ``P`` bilinearly
interpolated values per head and sums them with softmax weights. The sampling
rule is the CUDA kernel's and ``F.grid_sample``'s with ``align_corners=False``
and zero padding: a location ``l`` in [0, 1] maps to pixel ``l * size - 0.5``
and corners outside the map contribute zero.

Instead of ``grid_sample`` on ``batch * heads`` images followed by a weighted
sum, the attention weight is folded into the four bilinear corner weights and
all corners are fetched with one ``gather``: no per-head image copies, one
pass over the sampled values, and it runs anywhere PyTorch runs.
"""
from typing import Tuple

import torch

__all__ = ['deform_sample']


def _corner_indices_and_weights(
        locations: torch.Tensor,
        attention_weights: torch.Tensor,
        height: int,
        width: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat value indices and combined weights of the 4 bilinear corners of every sampling point.

    locations: (..., 2) as (x, y) in [0, 1]; attention_weights: (...). Returns (..., 4) each.
    """
    x = locations[..., 0] * width - 0.5
    y = locations[..., 1] * height - 0.5
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    fx = x - x0
    fy = y - y0
    x0 = x0.long()
    y0 = y0.long()
    corner_x = torch.stack((x0, x0 + 1, x0, x0 + 1), dim=-1)
    corner_y = torch.stack((y0, y0, y0 + 1, y0 + 1), dim=-1)
    gx = 1.0 - fx
    gy = 1.0 - fy
    bilinear = torch.stack((gx * gy, fx * gy, gx * fy, fx * fy), dim=-1)
    inside = (corner_x >= 0) & (corner_x < width) & (corner_y >= 0) & (corner_y < height)
    weights = bilinear * attention_weights.unsqueeze(-1) * inside
    index = corner_y.clamp(0, height - 1) * width + corner_x.clamp(0, width - 1)
    return index, weights


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
        (B, Q, heads * head_dim).
    """
    batch, num_values, heads, head_dim = value.shape
    height, width = value_hw
    _, num_queries, _, num_points, _ = locations.shape
    if num_values != height * width:
        raise ValueError(f'value has {num_values} positions but value_hw is {height}x{width}.')
    # Positions are computed in at least fp32 whatever the value dtype: a bf16 location is off by
    # up to half a pixel on a 100-pixel map.
    position_dtype = torch.promote_types(locations.dtype, torch.float32)
    index, weights = _corner_indices_and_weights(
        locations.to(position_dtype), attention_weights.to(position_dtype), height, width)
    # (B, Q, heads, P, 4) -> (B, heads, Q * P * 4): corners of one query are contiguous.
    index = index.permute(0, 2, 1, 3, 4).reshape(batch, heads, num_queries * num_points * 4)
    weights = weights.permute(0, 2, 1, 3, 4).reshape(batch, heads, num_queries, num_points * 4, 1)
    value = value.permute(0, 2, 1, 3)  # (B, heads, H*W, head_dim)
    sampled = torch.gather(value, 2, index.unsqueeze(-1).expand(-1, -1, -1, head_dim))
    sampled = sampled.view(batch, heads, num_queries, num_points * 4, head_dim)
    out = (sampled * weights.to(sampled.dtype)).sum(dim=3)  # (B, heads, Q, head_dim)
    return out.permute(0, 2, 1, 3).reshape(batch, num_queries, heads * head_dim)
