"""The interface between the PIIP model and its branches.

A branch is a pretrained single-image model split into *counted layers*: for a ViT its blocks; for a
ConvNeXt every block and every stage's downsampling layer. Between interactions a branch runs a range
of its counted layers on tokens ``(B, H*W, C)`` of its current grid; width and grid may change inside
a range (ConvNeXt stages), so the model asks the branch for the width and stride after any layer.

The model talks to branches only through this interface, so every branch kind goes through the same
code path; a new kind of branch is one class that implements it, plus its config dataclass, listed in
``branch_kinds``.
"""
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ['PIIPBranch', 'BlockRanges', 'Grid', 'even_block_ranges', 'on_meta']

BlockRanges = Tuple[Tuple[int, int], ...]
Grid = Tuple[int, int]


def on_meta(device: Optional[torch.device]) -> bool:
    """Whether tensors created with ``device`` (or the ambient default device) have no data: then
    initialising them is skipped (on meta, the init kernels run as slow Python decompositions)."""
    return torch.empty(0, device=device).is_meta


def even_block_ranges(depth: int, num_interactions: int) -> BlockRanges:
    """Inclusive block ranges that split ``depth`` blocks evenly over the interactions."""
    if depth % num_interactions:
        raise ValueError(f'depth {depth} is not a multiple of {num_interactions} interactions.')
    step = depth // num_interactions
    return tuple((i * step, (i + 1) * step - 1) for i in range(num_interactions))


class PIIPBranch(nn.Module):
    """Abstract PIIP branch (mixed into a stock timm model, so parameter names stay timm's).

    Implementations set ``cfg`` (their config dataclass, with at least ``img_size`` and
    ``block_ranges``) and define the methods below.
    """
    cfg = None

    @property
    def layer_widths(self) -> Tuple[int, ...]:
        """Channels of the tokens after each counted layer."""
        raise NotImplementedError

    @property
    def layer_strides(self) -> Tuple[int, ...]:
        """Nominal stride (branch image pixels per token) after each counted layer."""
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.layer_widths)

    @property
    def prefix_count(self) -> int:
        """Tokens carried through the layers before the patch tokens (a class token)."""
        return 0

    @property
    def max_stride(self) -> int:
        """The largest stride a forward reaches: images smaller than this on a side cannot run."""
        return max(self.layer_strides)

    def range_width(self, step: int) -> int:
        """Width of the tokens this branch hands to interaction ``step``."""
        return self.layer_widths[self.cfg.block_ranges[step][1]]

    def range_stride(self, step: int) -> int:
        """Stride of the tokens this branch hands to interaction ``step``."""
        return self.layer_strides[self.cfg.block_ranges[step][1]]

    def layer(self, index: int) -> nn.Module:
        """The module of counted layer ``index`` (what regional compilation and sharding wrap one by one)."""
        raise NotImplementedError

    def embed(self, image: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Grid]:
        """Image (B, C, H, W) -> tokens (B, N, C) in (B, N, C) memory, prefix tokens (or None), token grid."""
        raise NotImplementedError

    def step_layers(self, step: int) -> List[nn.Module]:
        """The modules of the counted layers this branch runs before interaction ``step``."""
        start, end = self.cfg.block_ranges[step]
        return [self.layer(j) for j in range(start, end + 1)]

    def forward_layers(
            self,
            layers: Sequence[nn.Module],
            tokens: torch.Tensor,
            prefix: Optional[torch.Tensor],
            hw: Grid,
            checkpointing: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Grid]:
        """Run ``layers`` (consecutive counted layers of this branch, e.g. ``step_layers(step)``): new tokens,
        prefix tokens and grid. The layers are passed as modules, not indices, so that one compiled step
        serves every step of the same shapes (an index would be a constant baked into the graph)."""
        raise NotImplementedError

    def layer_of_parameter(self, name: str) -> Optional[int]:
        """The counted layer a parameter (name relative to the branch) belongs to; -1 for the
        embedding, None for parameters outside the layers (final norms)."""
        raise NotImplementedError

    def activation_elements(self, height: int, width: int) -> Tuple[int, int]:
        """A lower bound of the elements a forward on a height x width branch image holds:
        (its tokens after the embedding, the largest transient of one layer)."""
        raise NotImplementedError

    def keep_layers(self, count: int) -> None:
        """Drop the counted layers after the first ``count`` (pruning for intermediate features)."""
        raise NotImplementedError

    def from_pretrained_weights(self, source: Dict[str, torch.Tensor], index: int) -> Dict[str, torch.Tensor]:
        """Weights of the single pretrained model (timm keys) -> this branch's state dict, the way the
        original initialised its branches; parts of the single model a branch has no use for are dropped."""
        raise NotImplementedError

    def adapt_checkpoint(self, state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
        """A PIIP checkpoint's tensors for this branch (keys under ``prefix``) made to fit it (e.g. a
        position embedding of another grid); the default keeps them as they are."""
        return state

    @staticmethod
    def original_state(state: Mapping[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        """One branch of a checkpoint in the original code's layout (keys after ``branchK.``) -> this
        package's names, or None when its keys are those of another kind of branch."""
        raise NotImplementedError
