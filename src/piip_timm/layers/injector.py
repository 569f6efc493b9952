"""One direction of a PIIP interaction: a branch's tokens read from another branch's grid."""
from functools import partial
from typing import Callable, Optional, Tuple

import torch
from timm.layers import DropPath
from torch import nn

from .conv_ffn import ConvFFN
from .deform_attn import DeformableCrossAttention

__all__ = ['Injector']


class Injector(nn.Module):
    """query += attn_gamma * DeformAttn(norm(query), norm(feat)); then an optional ConvFFN residual.

    Both residuals are scaled by per-channel gammas that start at zero, so a
    freshly initialised interaction leaves the pretrained branches untouched.
    """

    def __init__(
            self,
            dim: int,
            feat_dim: int,
            num_heads: int = 16,
            num_points: int = 4,
            value_ratio: float = 0.5,
            norm_layer: Optional[Callable[[int], nn.Module]] = None,
            with_ffn: bool = True,
            ffn_ratio: float = 0.25,
            drop_path: float = 0.0,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        norm = partial(norm_layer, **dd) if norm_layer is not None else nn.Identity
        self.query_norm = norm(dim)
        self.feat_norm = norm(feat_dim)
        self.attn = DeformableCrossAttention(
            dim, num_heads=num_heads, num_points=num_points, value_ratio=value_ratio, feat_dim=feat_dim, **dd)
        self.attn_gamma = nn.Parameter(torch.zeros(dim, **dd))
        if with_ffn:
            self.ffn_norm = norm(dim)
            self.ffn = ConvFFN(dim, int(dim * ffn_ratio), **dd)
            self.ffn_gamma = nn.Parameter(torch.zeros(dim, **dd))
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        else:
            self.ffn = None

    def forward(
            self,
            query: torch.Tensor,
            query_hw: Tuple[int, int],
            feat: torch.Tensor,
            feat_hw: Tuple[int, int],
    ) -> torch.Tensor:
        attn = self.attn(self.query_norm(query), query_hw, self.feat_norm(feat), feat_hw)
        query = torch.addcmul(query, self.attn_gamma, attn)
        if self.ffn is not None:
            query = torch.addcmul(query, self.ffn_gamma, self.drop_path(self.ffn(self.ffn_norm(query), query_hw)))
        return query
