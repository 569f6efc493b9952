"""The branches' token maps merged into one map on the finest branch's grid."""
from typing import Callable, Sequence, Tuple

import torch
from torch import nn

from .token_map import resize_to_grid, token_map

__all__ = ['BranchMerge', 'merge_branch_maps']

torch.fx.wrap('token_map')
torch.fx.wrap('resize_to_grid')


def merge_branch_maps(
        merges: Sequence[nn.Module],
        weights: torch.Tensor,
        tokens: Sequence[torch.Tensor],
        grids: Sequence[Tuple[int, int]],
) -> torch.Tensor:
    """sum_i weights[i] * resize(merges[i](map_i)) on the last (finest) branch's grid, (B, C, H, W).

    Maps on other grids are resized bilinearly (align_corners=False), as the original does.
    """
    out = None
    for i, (merge, t, hw) in enumerate(zip(merges, tokens, grids)):
        fmap = resize_to_grid(merge(token_map(t, hw)), grids[-1]) * weights[i]
        out = fmap if out is None else out + fmap
    return out


class BranchMerge(nn.Module):
    """One merge module per branch (``make_merge(index, in_dim)``) and one learned weight per branch."""

    def __init__(self, in_dims: Sequence[int], make_merge: Callable[[int, int], nn.Module], device=None,
                 dtype=None) -> None:
        super().__init__()
        self.merges = nn.ModuleList([make_merge(i, d) for i, d in enumerate(in_dims)])
        self.branch_weights = nn.Parameter(torch.ones(len(in_dims), device=device, dtype=dtype))

    def forward(self, tokens: Sequence[torch.Tensor], grids: Sequence[Tuple[int, int]]) -> torch.Tensor:
        return merge_branch_maps(self.merges, self.branch_weights, tokens, grids)
