"""Token sequences as feature maps. Plain functions, so that torch.fx traces each call as one node
(modules using them register them with ``torch.fx.wrap``) although they branch on sizes."""
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ['token_map', 'resize_to_grid']


def token_map(tokens: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid_hw[0], grid_hw[1])


def resize_to_grid(fmap: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of a (B, C, H, W) map to ``grid_hw``, if it is not that size."""
    if tuple(fmap.shape[-2:]) == tuple(grid_hw):
        return fmap
    return F.interpolate(fmap, size=tuple(grid_hw), mode='bilinear', align_corners=False)
