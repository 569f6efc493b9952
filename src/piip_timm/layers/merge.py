"""Modules that bring one branch's final feature map to the merged width."""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['LinearMerge', 'ConvMerge']


class LinearMerge(nn.Module):
    """GroupNorm, then (except for the target branch) a channel Linear and another GroupNorm.

    The merge of PIIP's ImageNet classifiers.
    """

    def __init__(
            self, in_dim: int, out_dim: int, project: bool = True, groups: int = 32, device=None, dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if not project and in_dim != out_dim:
            raise ValueError(f'a merge without projection needs in_dim == out_dim, got {in_dim} and {out_dim}.')
        self.norm_in = nn.GroupNorm(groups, in_dim, **dd)
        self.proj = nn.Linear(in_dim, out_dim, **dd) if project else None
        self.norm_out = nn.GroupNorm(groups, out_dim, **dd) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim, H, W) -> (B, out_dim, H, W)."""
        x = self.norm_in(x)
        if self.proj is not None:
            x = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            x = self.norm_out(x)
        return x


class ConvMerge(nn.Module):
    """Two 3x3 conv-GroupNorm-ReLU layers: the merge of PIIP's detection backbones."""

    def __init__(self, in_dim: int, out_dim: int, groups: int = 32, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv1 = nn.Conv2d(in_dim, out_dim, kernel_size=3, padding=1, bias=False, **dd)
        self.norm1 = nn.GroupNorm(groups, out_dim, **dd)
        self.conv2 = nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, bias=False, **dd)
        self.norm2 = nn.GroupNorm(groups, out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim, H, W) -> (B, out_dim, H, W)."""
        x = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(x)))
