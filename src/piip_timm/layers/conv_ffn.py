"""Feed-forward network with a depthwise 3x3 convolution between its two projections."""
from typing import Tuple

import torch
from torch import nn

__all__ = ['ConvFFN']


class ConvFFN(nn.Module):
    """fc1 -> depthwise 3x3 conv on the token grid -> GELU -> fc2.

    The convolution gives the interaction units local spatial mixing that
    deformable attention alone does not have (as in ViT-Adapter).
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(dim, hidden_dim, **dd)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, **dd)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """x: (B, H*W, dim) tokens of an H x W grid."""
        batch, num_tokens, _ = x.shape
        x = self.fc1(x)
        # Tokens are already channels-last: convolve a channels_last view instead of copying to NCHW and back.
        x = x.view(batch, hw[0], hw[1], -1).permute(0, 3, 1, 2)
        x = self.dwconv(x).permute(0, 2, 3, 1).reshape(batch, num_tokens, -1)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))
