"""ViTDet's simple feature pyramid: one stride-s map to maps at s/4, s/2, s and 2s."""
from typing import List, Sequence

import torch
from torch import nn

__all__ = ['SimpleFeaturePyramid', 'PYRAMID_SCALES', 'Upsample2x']

# Level name -> upsampling factor relative to the input map.
PYRAMID_SCALES = {'up4': 4.0, 'up2': 2.0, 'same': 1.0, 'down2': 0.5}


class Upsample2x(nn.ConvTranspose2d):
    """ConvTranspose2d(dim, dim, 2, stride=2), computed as one matmul and a pixel shuffle.

    A stride-2, 2x2 transposed convolution maps every pixel to its own 2x2 patch, so it is a
    (C_in -> 4 C_out) matrix product per pixel; on CPU that runs several times faster than the
    transposed-convolution kernel. Parameters (and state-dict keys) are ConvTranspose2d's.
    """

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__(dim, dim, kernel_size=2, stride=2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        out_dim = self.weight.shape[1]
        y = torch.matmul(x.permute(0, 2, 3, 1), self.weight.reshape(self.weight.shape[0], -1))
        y = y.view(batch, height, width, out_dim, 2, 2).permute(0, 1, 4, 2, 5, 3)
        y = y.reshape(batch, 2 * height, 2 * width, out_dim) + self.bias
        return y.permute(0, 3, 1, 2)  # NCHW view of channels-last memory


def _make_level(name: str, dim: int, **dd) -> nn.Module:
    if name == 'up4':
        return nn.Sequential(Upsample2x(dim, **dd), nn.GroupNorm(32, dim, **dd), nn.GELU(), Upsample2x(dim, **dd))
    if name == 'up2':
        return nn.Sequential(Upsample2x(dim, **dd))
    if name == 'same':
        return nn.Identity()
    if name == 'down2':
        return nn.MaxPool2d(kernel_size=2, stride=2)
    raise ValueError(f'unknown pyramid level {name!r}; choose from {list(PYRAMID_SCALES)}.')


class SimpleFeaturePyramid(nn.Module):
    """Deconvolutions up, max-pooling down, from a single feature map."""

    def __init__(
            self, dim: int, levels: Sequence[str] = ('up4', 'up2', 'same', 'down2'), device=None, dtype=None,
    ) -> None:
        super().__init__()
        self.level_names = tuple(levels)
        for name in self.level_names:
            self.add_module(name, _make_level(name, dim, device=device, dtype=dtype))

    @property
    def scales(self) -> List[float]:
        return [PYRAMID_SCALES[name] for name in self.level_names]

    def forward(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The levels at ``indices`` (positions in ``level_names``) of the pyramid of x (B, C, H, W)."""
        return [getattr(self, self.level_names[i])(x) for i in indices]
