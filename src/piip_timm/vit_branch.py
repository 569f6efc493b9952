"""ViT as a PIIP branch: a stock timm ``VisionTransformer`` whose blocks are the counted layers.

PIIP does the branch's embedding itself (patch conv, then the stored position embedding resampled
to the token grid, bicubic without antialias as the original does); the blocks run on the token
grid, windowed attention taking it as (B, H, W, C). Parameter names are timm's ViT names.
"""
import math
import re
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Dict, List, Literal, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, GELUTanh, LayerNorm, RmsNorm, resample_abs_pos_embed
from timm.models import VisionTransformer
from timm.models.vision_transformer import Attention as TimmAttention
from torch import nn
from torch.utils.checkpoint import checkpoint

from .branch import BlockRanges, Grid, PIIPBranch, on_meta
from .layers import Attention

__all__ = ['BranchCfg', 'IsotropicBranch', 'ViTBranch', 'build_branch', 'drop_single_model_parts']


@dataclass(frozen=True)
class BranchCfg:
    """One ViT branch: a timm ViT and the size of the image it is designed for.

    Branch ``i`` is fed the input scaled by ``img_size / branches[-1].img_size``
    (downscaled only). ``block_ranges[k]`` are the blocks run before interaction ``k``.
    """
    img_size: int
    embed_dim: int
    depth: int
    num_heads: int
    block_ranges: BlockRanges
    mlp_ratio: float = 4.0
    patch_size: int = 16
    qkv_bias: bool = True
    init_values: Optional[float] = None  # layer scale; None: no layer scale, 0.0: one starting at zero
    class_token: bool = False  # a class token runs through the blocks
    pos_embed_class_slot: bool = False  # pos_embed has a leading class slot that PIIP never adds
    pos_embed_grid: Optional[int] = None  # side of the stored pos_embed grid; default img_size // patch_size
    norm: Literal['layernorm', 'rmsnorm'] = 'layernorm'
    norm_eps: float = 1e-6
    qk_norm: bool = False  # InternViT's q/k normalisation over the full width
    mlp_act: Literal['gelu', 'gelu_tanh'] = 'gelu'
    window_size: Union[None, int, Tuple[Optional[int], ...]] = None  # one for all blocks, or per block
    window_padding: Literal['tokens', 'qkv'] = 'tokens'
    drop_path_rate: float = 0.0
    drop_path_schedule: Literal['constant', 'linear'] = 'constant'
    kind: Literal['vit'] = 'vit'  # the branch kind, for configs stored as dicts

    @property
    def grid(self) -> int:
        return self.pos_embed_grid or self.img_size // self.patch_size

    @property
    def num_layers(self) -> int:
        return self.depth

    @property
    def final_width(self) -> int:
        return self.embed_dim

    @property
    def min_img_size(self) -> int:
        return self.patch_size

    first_conv = 'patch_embed.proj'
    family = 'ViT'  # the name summary() gives the branch

    def summary(self) -> str:
        windows = sorted({w for w in self.block_windows() if w}) or ['global']
        return (f'{self.family} width {self.embed_dim:>4}  depth {self.depth:>2}  heads {self.num_heads:>2}  '
                f'attention {windows}')

    def block_windows(self) -> Tuple[Optional[int], ...]:
        if isinstance(self.window_size, (tuple, list)):
            if len(self.window_size) != self.depth:
                raise ValueError(f'window_size has {len(self.window_size)} entries for {self.depth} blocks.')
            return tuple(w or None for w in self.window_size)
        return (self.window_size or None,) * self.depth

    def drop_path_rates(self) -> List[float]:
        if self.drop_path_schedule == 'linear':
            return torch.linspace(0, self.drop_path_rate, self.depth, device='cpu').tolist()
        return [self.drop_path_rate] * self.depth

    def build(self, in_chans: int = 3, final_norm: bool = False, device=None, dtype=None) -> 'ViTBranch':
        return ViTBranch(self, in_chans=in_chans, final_norm=final_norm, device=device, dtype=dtype)

    @classmethod
    def from_timm(cls, model: VisionTransformer, img_size: int, block_ranges: BlockRanges) -> 'BranchCfg':
        """The branch of a timm ViT (built, e.g. on the meta device): its architecture, the detectors'
        way of using it (no class token; the stored position grid resampled to the image's), global
        attention. A layer scale it has starts at 1.0 when not loaded (the original's init for DeiTs)."""
        block = model.blocks[0]
        unsupported = [what for what, present in (
            ('register tokens', getattr(model, 'num_reg_tokens', 0)),
            ('a pre-norm', not isinstance(model.norm_pre, nn.Identity)),
            ('a patch-embedding norm', not isinstance(model.patch_embed.norm, nn.Identity)),
            ('a gated or non-standard MLP', not all(hasattr(block.mlp, n) for n in ('fc1', 'fc2', 'act'))),
            ('a dynamic image size', getattr(model, 'dynamic_img_size', False)),
        ) if present]
        if unsupported:
            raise ValueError(f'this ViT has {", ".join(unsupported)}, which a PIIP ViT branch does not support.')
        act = block.mlp.act
        tanh_gelu = isinstance(act, GELUTanh) or getattr(act, 'approximate', 'none') == 'tanh'
        return cls(
            img_size=img_size, embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=block.attn.num_heads,
            block_ranges=tuple(block_ranges), mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
            patch_size=model.patch_embed.patch_size[0], qkv_bias=block.attn.qkv.bias is not None,
            init_values=1.0 if hasattr(block.ls1, 'gamma') else None, pos_embed_grid=model.patch_embed.grid_size[0],
            norm='rmsnorm' if isinstance(block.norm1, RmsNorm) else 'layernorm',
            qk_norm=not isinstance(block.attn.q_norm, nn.Identity), mlp_act='gelu_tanh' if tanh_gelu else 'gelu')


def _norm_layer(kind: str, eps: float) -> Callable[[int], nn.Module]:
    return partial(RmsNorm, eps=eps) if kind == 'rmsnorm' else partial(LayerNorm, eps=eps)


def _pos_embed_for_grid(pos_embed: torch.Tensor, grid_hw: Grid, stored: int) -> torch.Tensor:
    """The stored square pos_embed grid resampled to the token grid (bicubic, no antialias: the original's rule).
    A plain function that torch.fx traces as one node."""
    return resample_abs_pos_embed(pos_embed, grid_hw, old_size=(stored, stored), num_prefix_tokens=0, antialias=False)


torch.fx.wrap('_pos_embed_for_grid')


_SINGLE_MODEL_PARTS = ('norm', 'fc_norm', 'cls_token', 'reg_token', 'dist_token', 'head', 'head_dist', 'attn_pool',
                       'norm_pre')


def drop_single_model_parts(source: Dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Single-model weights without the parts of a classifier / pretrainer that a branch does not have
    (final norms, class and register tokens, heads)."""
    return {k: v for k, v in source.items() if k in own or k.split('.')[0] not in _SINGLE_MODEL_PARTS}


class IsotropicBranch(PIIPBranch):
    """The PIIP side of a ViT-family branch (a timm ViT, BEiT, ...): its counted layers are ``self.blocks``,
    all of one width on one token grid; windowed blocks take the grid as (B, H, W, C).

    Mixed into a timm model class; the config needs ``embed_dim``, ``patch_size``, ``mlp_ratio``,
    ``block_ranges`` and ``window_size``.
    """

    @property
    def layer_widths(self) -> Tuple[int, ...]:
        return (self.cfg.embed_dim,) * len(self.blocks)

    @property
    def layer_strides(self) -> Tuple[int, ...]:
        return (self.cfg.patch_size,) * len(self.blocks)

    def layer(self, index: int) -> nn.Module:
        return self.blocks[index]

    @property
    def max_stride(self) -> int:
        return self.cfg.patch_size

    def forward_layers(self, layers, tokens, prefix, hw, checkpointing=False):
        x = tokens if prefix is None else torch.cat((prefix, tokens), dim=1)
        for block in layers:
            windowed = getattr(block.attn, 'window_size', None)
            if windowed:  # windowed attention takes the token grid
                x = x.view(x.shape[0], hw[0], hw[1], x.shape[-1])
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
            if windowed:
                x = x.flatten(1, 2)
        if prefix is not None:
            prefix, x = x[:, :prefix.shape[1]], x[:, prefix.shape[1]:]
        return x, prefix, hw

    def layer_of_parameter(self, name: str) -> Optional[int]:
        if name.startswith('blocks.'):
            return int(name.split('.')[1])
        if name.split('.')[0] in ('cls_token', 'reg_token', 'pos_embed', 'patch_embed', 'norm_pre'):
            return -1
        return None

    def activation_elements(self, height: int, width: int) -> Tuple[int, int]:
        tokens = (height // self.cfg.patch_size) * (width // self.cfg.patch_size)
        # An MLP holds its hidden activation twice (before and after GELU).
        return tokens * self.cfg.embed_dim, 2 * tokens * int(self.cfg.embed_dim * self.cfg.mlp_ratio)

    def keep_layers(self, count: int) -> None:
        """Drop the layers after the first ``count`` (pruning for intermediate features)."""
        cfg = self.cfg
        windows = cfg.window_size[:count] if isinstance(cfg.window_size, (tuple, list)) else cfg.window_size
        ranges = tuple(r for r in cfg.block_ranges if r[1] < count)
        self.blocks = self.blocks[:count]
        self.cfg = replace(cfg, depth=count, block_ranges=ranges, window_size=windows)

    def set_block_drop_paths(self) -> None:
        """Each block's stochastic depth from the config's schedule."""
        for block, rate in zip(self.blocks, self.cfg.drop_path_rates()):
            block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
            block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()


class ViTBranch(IsotropicBranch, VisionTransformer):
    """A timm VisionTransformer configured as a PIIP branch (no head; PIIP does the embedding)."""

    def __init__(self, cfg: BranchCfg, in_chans: int = 3, final_norm: bool = False, device=None, dtype=None) -> None:
        windows = cfg.block_windows()
        if cfg.class_token and any(windows):
            raise ValueError('this ViT branch has a class token and windowed attention; use one or the other.')
        needs_own_attention = cfg.qk_norm or any(windows)
        super().__init__(
            img_size=cfg.grid * cfg.patch_size,
            patch_size=cfg.patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool='',
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            qk_norm=cfg.qk_norm,
            # timm makes no layer scale for a falsy init value: a zero start is set below
            init_values=1.0 if cfg.init_values == 0 else cfg.init_values,
            class_token=cfg.class_token or cfg.pos_embed_class_slot,
            no_embed_class=not cfg.pos_embed_class_slot,
            final_norm=final_norm,
            norm_layer=_norm_layer(cfg.norm, cfg.norm_eps),
            act_layer=GELUTanh if cfg.mlp_act == 'gelu_tanh' else nn.GELU,
            attn_layer=Attention if needs_own_attention else TimmAttention,
            weight_init='skip' if on_meta(device) else '',
            device=device,
            dtype=dtype,
        )
        self.cfg = cfg
        if cfg.pos_embed_class_slot and not cfg.class_token:
            # Checkpoints of these branches (InternViT-6B, MAE ViT-H in PIIP detectors) keep the class slot
            # of pos_embed but have no class token; PIIP only ever uses the patch part.
            self.cls_token = None
        for block, window in zip(self.blocks, windows):
            if window:
                block.attn.window_size = window
                block.attn.window_padding = cfg.window_padding
            if cfg.init_values == 0 and not on_meta(device):  # every block starts as the identity
                nn.init.zeros_(block.ls1.gamma)
                nn.init.zeros_(block.ls2.gamma)
        self.set_block_drop_paths()

    # ----------------------------------------------------------------- PIIPBranch
    @property
    def prefix_count(self) -> int:
        return 1 if self.cfg.class_token else 0

    def position_embedding(self, grid_hw: Grid) -> torch.Tensor:
        """What the embedding adds to the patch tokens of a grid_hw grid: the stored pos_embed resampled."""
        pos_embed = self.pos_embed[:, 1:] if self.cfg.pos_embed_class_slot else self.pos_embed
        return _pos_embed_for_grid(pos_embed, grid_hw, self.cfg.grid)

    def embed(self, image: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Grid]:
        x = self.patch_embed.proj(image)  # a strided conv: a partial last patch is dropped
        grid_h, grid_w = x.shape[-2:]
        # Tokens in (B, N, C) memory: a transposed view of the conv output would carry its channel-major
        # strides through every residual add and make each LayerNorm copy its input (~5% of a detector's time).
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2).contiguous())
        x = self.norm_pre(self.pos_drop(x + self.position_embedding((grid_h, grid_w))))
        prefix = self.cls_token.expand(x.shape[0], -1, -1) if self.cfg.class_token else None
        return x, prefix, (grid_h, grid_w)

    def from_pretrained_weights(self, source: Dict[str, torch.Tensor], index: int) -> Dict[str, torch.Tensor]:
        """Single-model ViT weights -> this branch, the way the original initialised its branches: pos_embed
        resampled (bicubic, no antialias; class slot dropped for DeiT-style branches), patch kernels resized
        bicubically (e.g. 14 -> 16), missing layer-scale gammas set to the branch's init value, and parts of
        a single-model classifier / pretrainer the branch does not have dropped."""
        cfg = self.cfg
        own = self.state_dict()
        source = drop_single_model_parts(source, own)
        prefix = f'branches.{index}.'
        if 'pos_embed' in source:
            source['pos_embed'] = self._adapt_pos_embed(source['pos_embed'], prefix + 'pos_embed')
        kernel = source.get('patch_embed.proj.weight')
        if kernel is not None and kernel.shape[-2:] != own['patch_embed.proj.weight'].shape[-2:]:
            source['patch_embed.proj.weight'] = F.interpolate(
                kernel.float(), size=own['patch_embed.proj.weight'].shape[-2:], mode='bicubic',
                align_corners=False).to(kernel.dtype)
        for name in own:
            if re.fullmatch(r'blocks\.\d+\.ls[12]\.gamma', name) and name not in source:
                source[name] = torch.full_like(own[name], cfg.init_values, device='cpu')
        return source

    def adapt_checkpoint(self, state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
        key = prefix + 'pos_embed'
        if key in state and state[key].shape != self.pos_embed.shape:
            state = dict(state, **{key: self._adapt_pos_embed(state[key], key)})
        return state

    def _adapt_pos_embed(self, pos: torch.Tensor, key: str) -> torch.Tensor:
        """Class slot dropped (or kept) as the branch needs, grid resampled to the branch's."""
        has_slot = int(round(math.sqrt(pos.shape[1]))) ** 2 != pos.shape[1]
        if has_slot and not self.cfg.pos_embed_class_slot:
            pos = pos[:, 1:]  # DeiT/AugReg checkpoints carry a class slot the PIIP DeiT branches do not have
            has_slot = False
        if not has_slot and self.cfg.pos_embed_class_slot:
            raise ValueError(f'{key} has no class slot but this branch stores one; the checkpoint is for another model.')
        slot = 1 if has_slot else 0
        return torch.cat((pos[:, :slot], _resample_grid(pos[:, slot:], self.cfg.grid, key)), dim=1)

    @staticmethod
    def original_state(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The original's ViT branches (deit.py's ``vit_models``, ``InternViT6B``): timm's names but for the
        layer scales (``gamma_1/gamma_2``). Takes any branch no other kind claims."""
        return {re.sub(r'^blocks\.(\d+)\.gamma_([12])$', r'blocks.\1.ls\2.gamma', k): v for k, v in state.items()}


def _resample_grid(pos: torch.Tensor, grid: int, key: str) -> torch.Tensor:
    """(1, N, C) square pos_embed -> (1, grid*grid, C), bicubic without antialias (the original's rule)."""
    old = int(round(math.sqrt(pos.shape[1])))
    if old * old != pos.shape[1]:
        raise ValueError(f'{key} has {pos.shape[1]} positions, not a square grid.')
    return resample_abs_pos_embed(pos, (grid, grid), old_size=(old, old), num_prefix_tokens=0, antialias=False)


def build_branch(
        cfg: BranchCfg,
        in_chans: int = 3,
        final_norm: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> ViTBranch:
    """A timm VisionTransformer configured as a PIIP branch (kept for code that built branches directly)."""
    return cfg.build(in_chans, final_norm=final_norm, device=device, dtype=dtype)
