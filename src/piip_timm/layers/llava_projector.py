"""The PIIP-LLaVA projector: branch maps -> image tokens for the language model (``separate_2branch_v1``)."""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['BranchMapProjector', 'ProjectorMLP']


class ProjectorMLP(nn.Module):
    """Linear - GroupNorm(32) - GELU - Linear over the channels of (B, N, C) tokens."""

    def __init__(self, in_dim: int, out_dim: int, num_groups: int = 32, device=None, dtype=None) -> None:
        super().__init__()
        if out_dim % num_groups:
            raise ValueError(f'the projector width {out_dim} must be a multiple of GroupNorm\'s {num_groups} groups.')
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(in_dim, out_dim, **dd)
        self.norm = nn.GroupNorm(num_groups, out_dim, eps=1e-5, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim, **dd)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.fc1(tokens)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)  # GroupNorm takes channels second
        return self.fc2(self.act(x))


class BranchMapProjector(nn.Module):
    """Sum of per-branch MLPs on the branch maps, all on the last (finest) map's grid.

    Every map but the last is first resized to the last one's grid (bilinear, align_corners=False, in
    fp32 as the original does); the result is (B, H*W, out_dim) tokens in row-major order: the image
    tokens a PIIP-LLaVA model feeds its language model.
    """

    def __init__(self, in_dims: Sequence[int], out_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.in_dims = tuple(in_dims)
        self.out_dim = out_dim
        self.mlps = nn.ModuleList([ProjectorMLP(d, out_dim, device=device, dtype=dtype) for d in self.in_dims])

    def forward(self, *maps: torch.Tensor) -> torch.Tensor:
        if len(maps) == 1 and isinstance(maps[0], (list, tuple)):
            maps = tuple(maps[0])  # the tower's list of maps
        if len(maps) != len(self.mlps):
            raise ValueError(f'the projector takes {len(self.mlps)} branch maps, got {len(maps)}.')
        grid = maps[-1].shape[-2:]
        out = None
        for fmap, mlp in zip(maps, self.mlps):
            if fmap.shape[-2:] != grid:
                fmap = F.interpolate(fmap.float(), size=tuple(grid), mode='bilinear', align_corners=False).to(fmap.dtype)
            tokens = mlp(fmap.flatten(2).transpose(1, 2))
            out = tokens if out is None else out + tokens
        return out
