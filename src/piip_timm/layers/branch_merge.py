"""The branches' token maps merged into one map on the finest branch's grid."""
from typing import Callable, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['BranchMerge', 'merge_branch_maps']


def merge_branch_maps(
        merges: Sequence[nn.Module],
        weights: torch.Tensor,
        tokens: Sequence[torch.Tensor],
        grids: Sequence[Tuple[int, int]],
) -> torch.Tensor:
    """sum_i weights[i] * resize(merges[i](map_i)) on the last (finest) branch's grid, (B, C, H, W).

    Maps on other grids are resized bilinearly (align_corners=False), as the original does.
    """
    target = tuple(grids[-1])
    out = None
    for i, (merge, t, hw) in enumerate(zip(merges, tokens, grids)):
        fmap = merge(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], hw[0], hw[1]))
        if tuple(hw) != target:
            fmap = F.interpolate(fmap, size=target, mode='bilinear', align_corners=False)
        fmap = fmap * weights[i]
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
