"""ViTDet's simple feature pyramid: one stride-s map to maps at s/4, s/2, s and 2s."""
from typing import List, Sequence

import torch
from torch import nn

__all__ = ['SimpleFeaturePyramid', 'PYRAMID_SCALES']

# Level name -> upsampling factor relative to the input map.
PYRAMID_SCALES = {'up4': 4.0, 'up2': 2.0, 'same': 1.0, 'down2': 0.5}


def _make_level(name: str, dim: int) -> nn.Module:
    if name == 'up4':
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.GroupNorm(32, dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
    if name == 'up2':
        return nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2))
    if name == 'same':
        return nn.Identity()
    if name == 'down2':
        return nn.MaxPool2d(kernel_size=2, stride=2)
    raise ValueError(f'unknown pyramid level {name!r}; choose from {list(PYRAMID_SCALES)}.')


class SimpleFeaturePyramid(nn.Module):
    """Deconvolutions up, max-pooling down, from a single feature map."""

    def __init__(self, dim: int, levels: Sequence[str] = ('up4', 'up2', 'same', 'down2')) -> None:
        super().__init__()
        self.level_names = tuple(levels)
        for name in self.level_names:
            self.add_module(name, _make_level(name, dim))

    @property
    def scales(self) -> List[float]:
        return [PYRAMID_SCALES[name] for name in self.level_names]

    def forward(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The levels at ``indices`` (positions in ``level_names``) of the pyramid of x (B, C, H, W)."""
        return [getattr(self, self.level_names[i])(x) for i in indices]
