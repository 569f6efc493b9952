"""Bidirectional interaction between two adjacent branches of the pyramid."""
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .injector import Injector

__all__ = ['BidirectionalInteraction']


class BidirectionalInteraction(nn.Module):
    """Exchange between a coarse branch (larger model, smaller image) and a fine one.

    Each side reads the other's tokens as they were before this unit ran. With
    ``project`` the other side's tokens are first mapped to the reader's width by
    a Linear; without it the deformable attention's value projection does that.
    """

    def __init__(
            self,
            coarse_dim: int,
            fine_dim: int,
            project: bool = True,
            norm_layer: Optional[Callable[[int], nn.Module]] = None,
            device=None,
            dtype=None,
            **injector_kwargs,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if project:
            self.fine_to_coarse_proj = nn.Linear(fine_dim, coarse_dim, **dd)
            self.coarse_to_fine_proj = nn.Linear(coarse_dim, fine_dim, **dd)
        else:
            self.fine_to_coarse_proj = self.coarse_to_fine_proj = None
        self.fine_to_coarse = Injector(
            coarse_dim, coarse_dim if project else fine_dim, norm_layer=norm_layer, **dd, **injector_kwargs)
        self.coarse_to_fine = Injector(
            fine_dim, fine_dim if project else coarse_dim, norm_layer=norm_layer, **dd, **injector_kwargs)

    def forward(
            self,
            coarse: torch.Tensor,
            coarse_hw: Tuple[int, int],
            fine: torch.Tensor,
            fine_hw: Tuple[int, int],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        coarse_feat = coarse if self.coarse_to_fine_proj is None else self.coarse_to_fine_proj(coarse)
        fine_feat = fine if self.fine_to_coarse_proj is None else self.fine_to_coarse_proj(fine)
        new_coarse = self.fine_to_coarse(coarse, coarse_hw, fine_feat, fine_hw)
        new_fine = self.coarse_to_fine(fine, fine_hw, coarse_feat, coarse_hw)
        return new_coarse, new_fine
