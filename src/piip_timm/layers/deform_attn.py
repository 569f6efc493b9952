"""Deformable cross-attention from one token grid to another (one level)."""
import math
from typing import Optional, Tuple

import torch
from torch import nn

from .deform_sampling import deform_sample

__all__ = ['DeformableCrossAttention', 'reference_points', 'sampling_locations', 'softmax_over_points']


def reference_points(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Centres of an H x W grid as (x, y) in [0, 1], row-major: (H*W, 2), fp32."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing='ij')
    return torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1)


def softmax_over_points(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim``, written out: over a handful of points, torch.softmax's kernel
    (vectorised along that axis) is about 2.5x slower on CPU than these four whole-tensor ops."""
    exp = (logits - logits.amax(dim=dim, keepdim=True)).exp()
    return exp / exp.sum(dim=dim, keepdim=True)


def sampling_locations(offsets: torch.Tensor, query_hw: Tuple[int, int], feat_hw: Tuple[int, int]) -> torch.Tensor:
    """(B, heads, P, 2, Q) offsets in value-grid cells -> sampling locations in [0, 1] around each query's centre.

    Kept in at least fp32: in bf16 the locations would be off by up to half a cell.
    """
    offsets = offsets.to(torch.promote_types(offsets.dtype, torch.float32))
    cell = torch.tensor((1.0 / feat_hw[1], 1.0 / feat_hw[0]), dtype=offsets.dtype, device=offsets.device)
    ref = reference_points(query_hw[0], query_hw[1], offsets.device).t()  # (2, Q)
    return torch.addcmul(ref, offsets, cell[:, None])


# Both depend on the grids' sizes: torch.fx traces calls to them as single nodes.
torch.fx.wrap('sampling_locations')
torch.fx.wrap('deform_sample')


class DeformableCrossAttention(nn.Module):
    """Queries on one grid attend to a few learned sampling points on another grid.

    Parameter layout and initialisation follow Deformable DETR's ``MSDeformAttn``
    with a single level, so released PIIP weights map one to one. Values are
    projected to ``int(dim * value_ratio)`` channels, which is where PIIP saves
    cost; ``feat_dim`` lets the value grid have another width than the queries.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            num_points: int = 4,
            value_ratio: float = 1.0,
            feat_dim: Optional[int] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        value_dim = int(dim * value_ratio)
        if value_dim % num_heads:
            raise ValueError(
                f'int(dim * value_ratio) = {value_dim} must be divisible by num_heads = {num_heads}.')
        self.num_heads = num_heads
        self.num_points = num_points
        self.head_dim = value_dim // num_heads
        self.sampling_offsets = nn.Linear(dim, num_heads * num_points * 2, **dd)
        self.attention_weights = nn.Linear(dim, num_heads * num_points, **dd)
        self.value_proj = nn.Linear(feat_dim or dim, value_dim, **dd)
        self.output_proj = nn.Linear(value_dim, dim, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: point k of head h starts k+1 steps away along direction h."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack((angles.cos(), angles.sin()), dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        bias = directions[:, None, :] * steps[None, :, None]  # (heads, points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
            self,
            query: torch.Tensor,
            query_hw: Tuple[int, int],
            feat: torch.Tensor,
            feat_hw: Tuple[int, int],
    ) -> torch.Tensor:
        """query: (B, Hq*Wq, dim); feat: (B, Hf*Wf, feat_dim) -> (B, Hq*Wq, dim)."""
        batch, num_queries, _ = query.shape
        feat_h, feat_w = feat_hw
        heads, points = self.num_heads, self.num_points
        value = self.value_proj(feat).view(batch, feat_h * feat_w, heads, self.head_dim)
        # Offsets and point weights read the same queries: one matmul instead of two small ones, and
        # a transposed one, (rows, Q), so that they come out heads- and points-major with the queries
        # contiguous, the layout the sampling wants (no permuting copies of small-innermost tensors).
        weight = torch.cat((self.sampling_offsets.weight, self.attention_weights.weight))
        bias = torch.cat((self.sampling_offsets.bias, self.attention_weights.bias))
        projected = torch.baddbmm(bias[None, :, None], weight.expand(batch, -1, -1), query.transpose(1, 2))
        num_offsets = self.sampling_offsets.out_features
        offsets = projected[:, :num_offsets].unflatten(1, (heads, points, 2))  # (B, heads, P, 2, Q)
        weights = softmax_over_points(projected[:, num_offsets:].unflatten(1, (heads, points)), dim=2)
        locations = sampling_locations(offsets, query_hw, feat_hw)
        out = deform_sample(value, feat_hw, locations.permute(0, 4, 1, 2, 3), weights.permute(0, 3, 1, 2))
        return self.output_proj(out)
