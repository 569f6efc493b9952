"""Several merged maps, each brought to its own output stride: the regular-FPN detectors' fpn1..fpn4."""
from typing import List, Sequence

import torch
from torch import nn

from .simple_pyramid import PYRAMID_SCALES, _make_level

__all__ = ['FeatureLevels']


class FeatureLevels(nn.ModuleList):
    """Level ``j`` resizes map ``j`` by ``scales[j]`` (4, 2, 1 or 0.5: deconvolutions up, identity,
    max-pooling down) at width ``dims[j]``."""

    def __init__(self, scales: Sequence[float], dims: Sequence[int], device=None, dtype=None) -> None:
        names = {scale: name for name, scale in PYRAMID_SCALES.items()}
        unknown = [s for s in scales if s not in names]
        if unknown:
            raise ValueError(f'output levels can scale maps by {sorted(names)}, not {unknown}.')
        super().__init__([_make_level(names[s], d, device=device, dtype=dtype) for s, d in zip(scales, dims)])
        self.scales = tuple(scales)
        self.level_names = tuple(names[s] for s in scales)

    def forward(self, maps: Sequence[torch.Tensor], indices: Sequence[int]) -> List[torch.Tensor]:
        """Levels ``indices`` of ``maps`` (one map per level)."""
        return [self[i](maps[i]) for i in indices]
