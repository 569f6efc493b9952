"""ConvNeXt as a PIIP branch: a stock timm ``ConvNeXt`` whose blocks and downsampling layers are counted layers.

As in the original (TPAMI 2025, ``ConvNextHFWrapper``), every ConvNeXt block and every stage's
downsampling layer (LayerNorm + 2x2 stride-2 conv) is one counted layer, so an interaction range can
cross a stage boundary and the width and stride change between interactions: ConvNeXt-T has 21
counted layers, ConvNeXt-S/B 39. The stem (4x4 stride-4 conv + LayerNorm) is the embedding. Parameter
names are timm's ``convnext_*`` names, so timm's ``convnext_*.fb_in1k`` weights load as they are; the
original's checkpoints (transformers ``ConvNextModel`` names) are converted by ``original_state``.
"""
import re
from dataclasses import dataclass, replace
from typing import Dict, List, Literal, Mapping, Optional, Tuple

import torch
from timm.layers.activations import GELU as TimmGELU
from timm.models.convnext import ConvNeXt
from torch import nn
from torch.utils.checkpoint import checkpoint

from .branch import BlockRanges, Grid, PIIPBranch

__all__ = ['ConvNeXtBranchCfg', 'ConvNeXtBranch', 'CONVNEXT_SIZES', 'convnext_layer_strides', 'hf_convnext_key']

# (dims, depths) of the ConvNeXt sizes PIIP combines (timm convnext_* / facebook/convnext-*-224).
CONVNEXT_SIZES = {
    'T': ((96, 192, 384, 768), (3, 3, 9, 3)),
    'S': ((96, 192, 384, 768), (3, 3, 27, 3)),
    'B': ((128, 256, 512, 1024), (3, 3, 27, 3)),
    'L': ((192, 384, 768, 1536), (3, 3, 27, 3)),
}


@dataclass(frozen=True)
class ConvNeXtBranchCfg:
    """One ConvNeXt branch and the size of the image it is designed for.

    ``block_ranges[k]`` are the counted layers (blocks and downsampling layers, in order) run before
    interaction ``k``. ``head_norm``: keep timm's final ``head.norm`` (the original keeps the
    transformers model's final LayerNorm although its forward never uses it; only ``from_original``
    needs it, for the original's exact parameter set).
    """
    img_size: int
    dims: Tuple[int, ...]
    depths: Tuple[int, ...]
    block_ranges: BlockRanges
    ls_init_value: Optional[float] = 1e-6  # None: no layer scale
    drop_path_rate: float = 0.0
    conv_mlp: bool = False  # timm's 1x1-conv MLP blocks (convnext_atto..nano); the real T/S/B use Linears
    head_norm: bool = False
    kind: Literal['convnext'] = 'convnext'  # the branch kind, for configs stored as dicts

    def __post_init__(self):
        if len(self.dims) != len(self.depths):
            raise ValueError(f'ConvNeXt dims {self.dims} and depths {self.depths} need one entry per stage.')

    @property
    def num_layers(self) -> int:
        return sum(self.depths) + len(self.depths) - 1

    @property
    def final_width(self) -> int:
        return self.dims[-1]

    @property
    def min_img_size(self) -> int:
        return 4 * 2 ** (len(self.depths) - 1)

    first_conv = 'stem.0'

    def summary(self) -> str:
        return f'ConvNeXt widths {list(self.dims)}  depths {list(self.depths)}'

    @classmethod
    def from_timm(cls, model: ConvNeXt, img_size: int, block_ranges: BlockRanges) -> 'ConvNeXtBranchCfg':
        """The branch of a timm ConvNeXt (built, e.g. on the meta device): its stages and block style."""
        block = model.stages[0].blocks[0]
        unsupported = [what for what, present in (
            ('a stem other than the 4x4 patch conv', not (isinstance(model.stem[0], nn.Conv2d)
                                                         and model.stem[0].stride == (4, 4) and len(model.stem) == 2)),
            ('depthwise kernels other than 7x7', any(s.blocks[0].conv_dw.kernel_size != (7, 7)
                                                     for s in model.stages if len(s.blocks))),
            ('GRN (ConvNeXt-V2) blocks', hasattr(block.mlp, 'grn')),
            ('an activation other than GELU', not isinstance(block.mlp.act, (nn.GELU, TimmGELU))),
        ) if present]
        if unsupported:
            raise ValueError(f'this ConvNeXt has {", ".join(unsupported)}, which a PIIP ConvNeXt branch does not support.')
        return cls(
            img_size=img_size, dims=tuple(info['num_chs'] for info in model.feature_info),
            depths=tuple(len(s.blocks) for s in model.stages), block_ranges=tuple(block_ranges),
            ls_init_value=1e-6 if block.gamma is not None else None, conv_mlp=block.use_conv_mlp)

    def build(self, in_chans: int = 3, final_norm: bool = False, device=None, dtype=None) -> 'ConvNeXtBranch':
        if final_norm:
            raise ValueError('ConvNeXt branches have no per-branch classifier; use head="merged" or None.')
        return ConvNeXtBranch(self, in_chans=in_chans, device=device, dtype=dtype)


def _counted_layers(depths) -> List[Tuple[int, Optional[int]]]:
    """(stage, block) of every counted layer in order; block None is the stage's downsampling layer."""
    layers = []
    for stage, depth in enumerate(depths):
        if stage > 0:
            layers.append((stage, None))
        layers.extend((stage, block) for block in range(depth))
    return layers


def convnext_layer_strides(depths, patch_size: int = 4) -> Tuple[int, ...]:
    """Stride after each counted layer: the stem's, doubled by each downsampling layer."""
    return tuple(patch_size * 2 ** stage for stage, _ in _counted_layers(depths))


class ConvNeXtBranch(PIIPBranch, ConvNeXt):
    """A timm ConvNeXt run layer by layer on PIIP tokens (no classifier)."""

    def __init__(self, cfg: ConvNeXtBranchCfg, in_chans: int = 3, device=None, dtype=None) -> None:
        super().__init__(
            in_chans=in_chans, num_classes=0, global_pool='', depths=tuple(cfg.depths), dims=tuple(cfg.dims),
            ls_init_value=cfg.ls_init_value, drop_path_rate=cfg.drop_path_rate, conv_mlp=cfg.conv_mlp,
            device=device, dtype=dtype)
        self.cfg = cfg
        if not cfg.head_norm:
            self.head = nn.Identity()
        self.norm = nn.Identity()  # a ConvNeXt branch hands on its tokens without a final norm
        self._layers = _counted_layers(cfg.depths)
        self._widths = tuple(cfg.dims[stage] for stage, _ in self._layers)
        self._strides = convnext_layer_strides(cfg.depths)

    @property
    def layer_widths(self) -> Tuple[int, ...]:
        return self._widths

    @property
    def layer_strides(self) -> Tuple[int, ...]:
        return self._strides

    def layer(self, index: int) -> nn.Module:
        stage, block = self._layers[index]
        return self.stages[stage].downsample if block is None else self.stages[stage].blocks[block]

    def embed(self, image: torch.Tensor) -> Tuple[torch.Tensor, None, Grid]:
        x = self.stem(image)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2).contiguous(), None, grid

    def forward_layers(self, layers, tokens, prefix, hw, checkpointing=False):
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], hw[0], hw[1])
        for layer in layers:
            x = checkpoint(layer, x, use_reentrant=False) if checkpointing else layer(x)
        # Layers keep the channels-last memory of the tokens, so these are (B, N, C) views, not copies.
        return x.flatten(2).transpose(1, 2).contiguous(), prefix, (x.shape[-2], x.shape[-1])

    def layer_of_parameter(self, name: str) -> Optional[int]:
        if name.startswith('stem.'):
            return -1
        m = re.match(r'stages\.(\d+)\.(downsample|blocks\.(\d+))\.', name)
        if m is None:
            return None
        block = int(m.group(3)) if m.group(3) is not None else None
        return self._layers.index((int(m.group(1)), block))

    def activation_elements(self, height: int, width: int) -> Tuple[int, int]:
        tokens = (height // 4) * (width // 4) * self.cfg.dims[0]
        return tokens, 2 * 4 * tokens  # the first stage's MLP holds 4x the tokens, before and after GELU

    def keep_layers(self, count: int) -> None:
        """Drop the layers after the first ``count`` (pruning for intermediate features)."""
        kept = self._layers[:count]
        last_stage = kept[-1][0]
        for stage in range(last_stage + 1):
            blocks = [b for s, b in kept if s == stage and b is not None]
            self.stages[stage].blocks = self.stages[stage].blocks[:len(blocks)]
        self.stages = self.stages[:last_stage + 1]
        self._layers, self._widths, self._strides = kept, self._widths[:count], self._strides[:count]
        self.cfg = replace(self.cfg, block_ranges=tuple(r for r in self.cfg.block_ranges if r[1] < count))

    def from_pretrained_weights(self, source: Dict[str, torch.Tensor], index: int) -> Dict[str, torch.Tensor]:
        own = self.state_dict()
        # A single ConvNeXt's classifier (and, unless kept, its final norm) has no place in a branch.
        return {k: v for k, v in source.items() if k in own or not k.startswith('head.')}

    @staticmethod
    def original_state(state: Mapping[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        """The original's ``ConvNextHFWrapper`` (``convnext_model.*``, transformers names) -> timm's names;
        None for other kinds of branch."""
        prefix = 'convnext_model.'
        if not any(k.startswith(prefix) for k in state):
            return None
        return {hf_convnext_key(k[len(prefix):]) if k.startswith(prefix) else k: v for k, v in state.items()}


_HF_BLOCK_PARTS = {
    'dwconv': 'conv_dw',
    'layernorm': 'norm',
    'pwconv1': 'mlp.fc1',
    'pwconv2': 'mlp.fc2',
}
_HF_FIXED = {
    'embeddings.patch_embeddings.weight': 'stem.0.weight',
    'embeddings.patch_embeddings.bias': 'stem.0.bias',
    'embeddings.layernorm.weight': 'stem.1.weight',
    'embeddings.layernorm.bias': 'stem.1.bias',
    'layernorm.weight': 'head.norm.weight',
    'layernorm.bias': 'head.norm.bias',
}
_HF_DOWNSAMPLE = re.compile(r'^encoder\.stages\.(\d+)\.downsampling_layer\.([01])\.(weight|bias)$')
_HF_BLOCK = re.compile(r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:(dwconv|layernorm|pwconv1|pwconv2)\.(weight|bias)'
                       r'|(layer_scale_parameter))$')


def hf_convnext_key(key: str) -> str:
    """transformers ``ConvNextModel`` parameter name -> timm ``convnext_*`` name (ValueError for others)."""
    if key in _HF_FIXED:
        return _HF_FIXED[key]
    if m := _HF_DOWNSAMPLE.match(key):
        return f'stages.{m.group(1)}.downsample.{m.group(2)}.{m.group(3)}'
    if m := _HF_BLOCK.match(key):
        stage, block, part, param, layer_scale = m.groups()
        if layer_scale:
            return f'stages.{stage}.blocks.{block}.gamma'
        return f'stages.{stage}.blocks.{block}.{_HF_BLOCK_PARTS[part]}.{param}'
    raise ValueError(f'{key!r} is not a parameter of a transformers ConvNextModel.')
