"""Parameter-Inverted Image Pyramid networks (PIIP) for timm.

Zhu et al., "Parameter-Inverted Image Pyramid Networks", NeurIPS 2024, and
Wang et al., "Parameter-Inverted Image Pyramid Networks for Visual Perception
and Multimodal Understanding", TPAMI 2025 (https://github.com/OpenGVLab/PIIP).

An image pyramid is fed to pretrained ViTs of different sizes, inverted: the
smallest model sees the largest image. After chosen block ranges, adjacent
branches exchange information through bidirectional deformable cross-attention
units, from the highest-resolution pair down. Classifiers average per-branch
heads (``head='separate'``) or pool one merged map (``head='merged'``); dense
models merge the branches onto the highest-resolution grid and build a simple
feature pyramid (strides 4/8/16/32 of the input).

Every branch is a timm ``VisionTransformer`` (so its keys are timm's). Two, three
and four branches go through the same code; variants differ only in the table at
the bottom of this file.
"""
import logging
import math
import pickle
import re
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, GELUTanh, LayerNorm, RmsNorm, resample_abs_pos_embed, trunc_normal_
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Attention as TimmAttention
from torch import nn
from torch.fx import _symbolic_trace
from torch.utils.checkpoint import checkpoint

from .convert import to_package_layout
from .hub import BranchSource, HubFile, check_hub_files, load_branch_state_dict
from .limits import check_fits
from .weights import allow_training_metadata, complete_state_dict
from .layers import Attention, BidirectionalInteraction, ConvMerge, DeformableCrossAttention, LinearMerge, \
    SimpleFeaturePyramid, PYRAMID_SCALES

__all__ = ['PIIP', 'BranchCfg', 'InteractionCfg', 'even_block_ranges', 'checkpoint_filter_fn']

_logger = logging.getLogger(__name__)

HeadStyle = Optional[Literal['separate', 'merged']]
MergeStyle = Literal['linear', 'conv']
BlockRanges = Tuple[Tuple[int, int], ...]


def even_block_ranges(depth: int, num_interactions: int) -> BlockRanges:
    """Inclusive block ranges that split ``depth`` blocks evenly over the interactions."""
    if depth % num_interactions:
        raise ValueError(f'depth {depth} is not a multiple of {num_interactions} interactions.')
    step = depth // num_interactions
    return tuple((i * step, (i + 1) * step - 1) for i in range(num_interactions))


@dataclass(frozen=True)
class BranchCfg:
    """One branch: a timm ViT and the size of the image it is designed for.

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
    init_values: Optional[float] = None  # layer scale; None: no layer scale
    class_token: bool = False  # a class token runs through the blocks
    pos_embed_class_slot: bool = False  # pos_embed has a leading class slot that PIIP never adds
    pos_embed_grid: Optional[int] = None  # side of the stored pos_embed grid; default img_size // patch_size
    norm: Literal['layernorm', 'rmsnorm'] = 'layernorm'
    qk_norm: bool = False  # InternViT's q/k normalisation over the full width
    mlp_act: Literal['gelu', 'gelu_tanh'] = 'gelu'
    window_size: Union[None, int, Tuple[Optional[int], ...]] = None  # one for all blocks, or per block
    window_padding: Literal['tokens', 'qkv'] = 'tokens'
    drop_path_rate: float = 0.0
    drop_path_schedule: Literal['constant', 'linear'] = 'constant'

    @property
    def grid(self) -> int:
        return self.pos_embed_grid or self.img_size // self.patch_size

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


@dataclass(frozen=True)
class InteractionCfg:
    """Hyper-parameters shared by all interaction units."""
    num_heads: int = 16
    num_points: int = 4
    value_ratio: float = 0.5
    with_ffn: bool = True
    ffn_ratio: float = 0.25
    drop_path: float = 0.4
    project: bool = True  # Linear maps between the two branches' widths
    norm: bool = True  # LayerNorm on queries, features and the FFN input


def _norm_layer(kind: str) -> Callable[[int], nn.Module]:
    return partial(RmsNorm, eps=1e-6) if kind == 'rmsnorm' else partial(LayerNorm, eps=1e-6)


def build_branch(
        cfg: BranchCfg,
        in_chans: int = 3,
        final_norm: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> VisionTransformer:
    """A timm VisionTransformer configured as a PIIP branch (no head; PIIP does the embedding)."""
    windows = cfg.block_windows()
    needs_own_attention = cfg.qk_norm or any(windows)
    vit = VisionTransformer(
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
        init_values=cfg.init_values,
        class_token=cfg.class_token or cfg.pos_embed_class_slot,
        no_embed_class=not cfg.pos_embed_class_slot,
        final_norm=final_norm,
        norm_layer=_norm_layer(cfg.norm),
        act_layer=GELUTanh if cfg.mlp_act == 'gelu_tanh' else nn.GELU,
        attn_layer=Attention if needs_own_attention else TimmAttention,
        weight_init='skip' if _on_meta(device) else '',
        device=device,
        dtype=dtype,
    )
    if cfg.pos_embed_class_slot and not cfg.class_token:
        # Checkpoints of these branches (InternViT-6B, MAE ViT-H in PIIP detectors) keep the class slot
        # of pos_embed but have no class token; PIIP only ever uses the patch part.
        vit.cls_token = None
    for block, window, rate in zip(vit.blocks, windows, cfg.drop_path_rates()):
        if window:
            block.attn.window_size = window
            block.attn.window_padding = cfg.window_padding
        block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()
    return vit


def _on_meta(device: Optional[torch.device]) -> bool:
    """Whether tensors created with ``device`` (or the ambient default device) have no data: then
    initialising them is skipped (on meta, the init kernels run as slow Python decompositions)."""
    return torch.empty(0, device=device).is_meta


def _init_neck_weights(module: nn.Module) -> None:
    """The original's init for interaction, merge and pyramid modules."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, DeformableCrossAttention):
        module.reset_parameters()


class PIIP(nn.Module):
    """Parameter-inverted image pyramid of ViT branches with bidirectional interactions.

    Args:
        branches: branch configs from the coarsest image (largest model) to the finest.
        interaction: interaction-unit hyper-parameters.
        head: ``'separate'``: every branch keeps its final norm and has its own linear head,
            logits are their mean (PIIP's ImageNet classifiers); ``'merged'``: norm, average pool
            and one linear head on the merged map; None: a pure backbone (the detectors).
        merge: how branches are merged onto the finest grid: ``'linear'`` (GroupNorm/Linear, the
            ImageNet classifiers) or ``'conv'`` (conv-GroupNorm-ReLU, the detectors); None: no merge.
        pyramid: levels of the simple feature pyramid built on the merged map, a subset of
            ``('up4', 'up2', 'same', 'down2')``; None: no pyramid.
        num_classes: classes of the head(s); 0 for none.
        global_pool: ``'first_patch'`` (default for separate heads: the released PIIP classifiers
            read the first patch token), ``'token'`` (class token), ``'avg'`` (default for the merged
            head) or ``''`` (no pooling).
        in_chans: input channels.
        drop_rate: dropout before the head(s).
        device, dtype: where and in which dtype parameters are created (timm's factory kwargs);
            ``device='meta'`` builds the structure without allocating.

    ``feature_info`` / ``forward_intermediates``: with a pyramid, its levels; without one, the
    finest branch's token map after each interaction step (like timm's ViTs, one level per
    step of the network), at the finest branch's patch stride.
    """

    def __init__(
            self,
            branches: Sequence[BranchCfg],
            interaction: InteractionCfg = InteractionCfg(),
            head: HeadStyle = 'separate',
            merge: Optional[MergeStyle] = None,
            pyramid: Optional[Sequence[str]] = None,
            num_classes: int = 1000,
            global_pool: Optional[str] = None,
            in_chans: int = 3,
            drop_rate: float = 0.0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        branches = tuple(branches)
        if len(branches) < 2:
            raise ValueError(f'PIIP needs at least 2 branches, got {len(branches)}.')
        num_interactions = len(branches[0].block_ranges)
        if any(len(b.block_ranges) != num_interactions for b in branches):
            raise ValueError('every branch needs one block range per interaction; got '
                             f'{[len(b.block_ranges) for b in branches]}.')
        if head != 'separate' and merge is None:
            raise ValueError(f"head={head!r} needs a merge ('linear' or 'conv').")
        if pyramid is not None and merge is None:
            raise ValueError("a feature pyramid needs a merge ('linear' or 'conv').")
        for i, b in enumerate(branches):
            if b.class_token and any(b.block_windows()):
                raise ValueError(f'branch {i} has a class token and windowed attention; use one or the other.')
        self.branch_cfgs = branches
        self.interaction_cfg = interaction
        self.head_style = head
        self.merge_style = merge
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.grad_checkpointing = False
        self.image_ratios = tuple(b.img_size / branches[-1].img_size for b in branches)
        self.num_prefix_tokens = tuple(1 if b.class_token else 0 for b in branches)
        self.embed_dims = tuple(b.embed_dim for b in branches)
        self.patch_size = branches[-1].patch_size

        self.branches = nn.ModuleList(
            [build_branch(b, in_chans, final_norm=head == 'separate', **dd) for b in branches])

        norm_layer = partial(nn.LayerNorm, eps=1e-6) if interaction.norm else None
        unit_kwargs = dict(
            project=interaction.project,
            norm_layer=norm_layer,
            num_heads=interaction.num_heads,
            num_points=interaction.num_points,
            value_ratio=interaction.value_ratio,
            with_ffn=interaction.with_ffn,
            ffn_ratio=interaction.ffn_ratio,
            drop_path=interaction.drop_path,
            **dd,
        )
        self.interactions = nn.ModuleList([
            nn.ModuleList([
                BidirectionalInteraction(self.embed_dims[u], self.embed_dims[u + 1], **unit_kwargs)
                for u in range(len(branches) - 1)
            ])
            for _ in range(num_interactions)
        ])

        out_dim = self.embed_dims[0]
        if merge == 'linear':
            self.merges = nn.ModuleList(
                [LinearMerge(d, out_dim, project=i > 0, **dd) for i, d in enumerate(self.embed_dims)])
        elif merge == 'conv':
            self.merges = nn.ModuleList([ConvMerge(d, out_dim, **dd) for d in self.embed_dims])
        elif merge is None:
            self.merges = None
        else:
            raise ValueError(f"merge must be 'linear', 'conv' or None, got {merge!r}.")
        self.branch_weights = nn.Parameter(torch.ones(len(branches), **dd)) if merge else None
        self.pyramid = SimpleFeaturePyramid(out_dim, pyramid, **dd) if pyramid else None
        if pyramid:
            self.feature_info = [
                dict(num_chs=out_dim, reduction=int(self.patch_size / PYRAMID_SCALES[name]), module=f'pyramid.{name}')
                for name in pyramid
            ]
        else:
            self.feature_info = [
                dict(num_chs=self.embed_dims[-1], reduction=self.patch_size, module=f'interactions.{k}')
                for k in range(num_interactions)
            ]

        self.head_drop = nn.Dropout(drop_rate)
        if head == 'separate':
            self.num_features = self.head_hidden_size = sum(self.embed_dims)
            self.norm = None
        elif head == 'merged':
            self.num_features = self.head_hidden_size = out_dim
            self.norm = nn.LayerNorm(out_dim, eps=1e-6, **dd)
        elif head is None:
            if num_classes:
                raise ValueError(f'a model without head (head=None) needs num_classes=0, got {num_classes}.')
            self.num_features = self.head_hidden_size = out_dim
            self.norm = nn.Identity()
        else:
            raise ValueError(f"head must be 'separate', 'merged' or None, got {head!r}.")
        self.global_pool = self._check_pool(global_pool)
        self.head = self._make_head(num_classes, **dd)
        if not _on_meta(device):
            self.init_weights()

    # ----------------------------------------------------------------- construction helpers
    def _check_pool(self, global_pool: Optional[str]) -> str:
        if self.head_style == 'separate':
            global_pool = 'first_patch' if global_pool is None else global_pool
            allowed = ('first_patch', 'token', 'avg', '')
        else:
            global_pool = 'avg' if global_pool is None else global_pool
            allowed = ('avg', '')
        if global_pool not in allowed:
            raise ValueError(f'global_pool {global_pool!r} is not one of {allowed} for head={self.head_style!r}.')
        if global_pool == 'token' and not all(self.num_prefix_tokens):
            raise ValueError("global_pool='token' needs a class token in every branch.")
        return global_pool

    def _make_head(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        dd = dict(device=device, dtype=dtype)
        if self.head_style == 'separate':
            return nn.ModuleList([
                nn.Linear(d, num_classes, **dd) if num_classes > 0 else nn.Identity() for d in self.embed_dims])
        return nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def init_weights(self) -> None:
        """Fresh init of everything that is not a branch (the branches keep timm's init)."""
        for name, module in self.named_children():
            if name != 'branches':
                module.apply(_init_neck_weights)

    # ----------------------------------------------------------------- timm interface
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        names = set()
        for i, branch in enumerate(self.branches):
            names |= {f'branches.{i}.{n}' for n in branch.no_weight_decay() if getattr(branch, n, None) is not None}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """Layer ids for layer-wise LR decay: embeddings 0, interaction step k (its blocks and units) k+1,
        merge/pyramid/norms/heads last."""
        num_steps = len(self.interactions)
        step_of_block = [
            {j: k for k, (start, end) in enumerate(b.block_ranges) for j in range(start, end + 1)}
            for b in self.branch_cfgs
        ]

        def layer_id(name: str) -> int:
            parts = name.split('.')
            if parts[0] == 'branches':
                branch, rest = int(parts[1]), parts[2]
                if rest == 'blocks':
                    return step_of_block[branch].get(int(parts[3]), num_steps - 1) + 1
                if rest in ('cls_token', 'reg_token', 'pos_embed', 'patch_embed', 'norm_pre'):
                    return 0
                return num_steps + 1
            if parts[0] == 'interactions':
                return int(parts[1]) + 1
            return num_steps + 1

        return layer_id

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool)
        # The new head is created where the model lives, in its dtype (no build-then-move).
        reference = next(self.parameters())
        self.head = self._make_head(num_classes, device=reference.device, dtype=reference.dtype)
        if not reference.is_meta:
            self.head.apply(_init_neck_weights)
        self.head.train(self.training)

    # ----------------------------------------------------------------- forward pieces
    def _check_input(self, x: torch.Tensor) -> None:
        """One clear error for any image batch the model cannot take (before any kernel complains).

        Skipped under torch.fx symbolic tracing, where the input is a proxy without values or shape.
        """
        if _is_fx_symbolic_tracing():
            return
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'PIIP expects a torch.Tensor image batch, got {type(x).__name__}.')
        if x.ndim != 4:
            hint = ' (add a batch dimension with x.unsqueeze(0))' if x.ndim == 3 else ''
            raise ValueError(f'PIIP expects a 4-D (batch, channels, height, width) tensor, got shape '
                             f'{tuple(x.shape)}{hint}.')
        if x.shape[1] != self.in_chans:
            raise ValueError(f'PIIP expects {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)}).')
        if x.shape[0] == 0:
            raise ValueError(f'the image batch is empty (shape {tuple(x.shape)}).')
        weight = self.branches[0].patch_embed.proj.weight
        if not x.is_floating_point():
            raise TypeError(f'PIIP expects a floating-point (normalised) image batch, got {x.dtype}; '
                            'convert it with x.float() and normalise it.')
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f'the input is {x.dtype} but the model weights are {weight.dtype}; use x.to({weight.dtype}), '
                            f'model.to({x.dtype}) or torch.autocast.')
        if x.device != weight.device:
            raise ValueError(f'the input is on {x.device} but the model is on {weight.device}; move one with .to().')
        height, width = x.shape[-2:]
        state = mlp = 0
        for i, (ratio, cfg) in enumerate(zip(self.image_ratios, self.branch_cfgs)):
            h = math.floor(height * ratio) if ratio < 1 else height
            w = math.floor(width * ratio) if ratio < 1 else width
            if h < cfg.patch_size or w < cfg.patch_size:
                min_side = math.ceil(cfg.patch_size / min(ratio, 1.0))
                raise ValueError(
                    f'image {height}x{width} is too small: branch {i} sees it at {h}x{w}, less than one '
                    f'{cfg.patch_size}px patch; use at least {min_side}x{min_side}.')
            tokens = (h // cfg.patch_size) * (w // cfg.patch_size)
            state += tokens * cfg.embed_dim
            mlp = max(mlp, 2 * tokens * int(cfg.embed_dim * cfg.mlp_ratio))
        # A lower bound of the peak: every branch's tokens stay alive while an MLP holds its hidden
        # activation twice (before and after GELU), or while the pyramid's 4x level is upsampled.
        extra = mlp
        if self.pyramid is not None and 'up4' in self.pyramid.level_names:
            finest = self.branch_cfgs[-1]
            grid = (height // finest.patch_size) * (width // finest.patch_size)
            extra = max(extra, 20 * grid * self.embed_dims[0])
        check_fits(x.shape[0] * (state + extra) * x.element_size(), x.device,
                   f'a {x.shape[0]}x{x.shape[1]}x{height}x{width} batch')

    def image_pyramid(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The input at every branch's scale (bilinear, scale-factor based, as in the original)."""
        return [
            F.interpolate(x, scale_factor=r, mode='bilinear', align_corners=False) if r < 1 else x
            for r in self.image_ratios
        ]

    def _embed(self, index: int, image: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Tuple[int, int]]:
        """Patch tokens (+ resampled pos_embed), the prefix tokens and the token grid of one branch."""
        branch = self.branches[index]
        x = branch.patch_embed.proj(image)  # a strided conv: a partial last patch is dropped
        grid_h, grid_w = x.shape[-2:]
        # Tokens in (B, N, C) memory: a transposed view of the conv output would carry its channel-major
        # strides through every residual add and make each LayerNorm copy its input (~5% of a detector's time).
        x = branch.patch_embed.norm(x.flatten(2).transpose(1, 2).contiguous())
        pos_embed = branch.pos_embed[:, 1:] if self.branch_cfgs[index].pos_embed_class_slot else branch.pos_embed
        x = branch.pos_drop(x + _pos_embed_for_grid(pos_embed, (grid_h, grid_w), self.branch_cfgs[index].grid))
        prefix = branch.cls_token.expand(x.shape[0], -1, -1) if self.num_prefix_tokens[index] else None
        return x, prefix, (grid_h, grid_w)

    def _run_blocks(
            self,
            index: int,
            step: int,
            x: torch.Tensor,
            prefix: Optional[torch.Tensor],
            hw: Tuple[int, int],
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        blocks = self.branches[index].blocks
        start, end = self.branch_cfgs[index].block_ranges[step]
        if prefix is not None:
            x = torch.cat((prefix, x), dim=1)
        for j in range(start, end + 1):
            block = blocks[j]
            windowed = getattr(block.attn, 'window_size', None)
            if windowed:  # windowed attention takes the token grid
                x = x.view(x.shape[0], hw[0], hw[1], x.shape[-1])
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if windowed:
                x = x.flatten(1, 2)
        if prefix is not None:
            prefix, x = x[:, :prefix.shape[1]], x[:, prefix.shape[1]:]
        return x, prefix

    def forward_branches(
            self, x: torch.Tensor,
    ) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]], List[Tuple[int, int]]]:
        """Run all branches and interactions: per-branch patch tokens, prefix tokens and grids."""
        return self._forward_steps(x)[:3]

    def _forward_steps(
            self,
            x: torch.Tensor,
            tap_steps: Sequence[int] = (),
            last_step: Optional[int] = None,
    ) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]], List[Tuple[int, int]], List[torch.Tensor]]:
        """``forward_branches`` up to step ``last_step``, with the finest branch's (B, C, H, W) map
        after each step in ``tap_steps``."""
        self._check_input(x)
        tokens, prefixes, grids, taps = [], [], [], []
        for i, image in enumerate(self.image_pyramid(x)):
            t, p, hw = self._embed(i, image)
            tokens.append(t)
            prefixes.append(p)
            grids.append(hw)
        for step, units in enumerate(self.interactions):
            for i in range(len(self.branches)):
                tokens[i], prefixes[i] = self._run_blocks(i, step, tokens[i], prefixes[i], grids[i])
            for u in reversed(range(len(units))):  # from the highest-resolution pair down
                args = (tokens[u], grids[u], tokens[u + 1], grids[u + 1])
                if self.grad_checkpointing and torch.is_grad_enabled():
                    tokens[u], tokens[u + 1] = checkpoint(units[u], *args, use_reentrant=False)
                else:
                    tokens[u], tokens[u + 1] = units[u](*args)
            if step in tap_steps:
                taps.append(_token_map(tokens[-1], grids[-1]))
            if step == last_step:
                break
        return tokens, prefixes, grids, taps

    def merge_branches(self, tokens: Sequence[torch.Tensor], grids: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """Weighted sum of the merged branch maps on the finest grid: (B, embed_dims[0], H, W)."""
        if self.merges is None:
            raise RuntimeError(
                'this PIIP model has no branch merge; build it with merge="conv" (or features_only=True).')
        out = None
        for i, (merge, t, hw) in enumerate(zip(self.merges, tokens, grids)):
            fmap = _resize_to_grid(merge(_token_map(t, hw)), grids[-1])
            fmap = fmap * self.branch_weights[i]
            out = fmap if out is None else out + fmap
        return out

    def _head_features(self, tokens, prefixes, grids) -> Union[torch.Tensor, List[torch.Tensor]]:
        if self.head_style == 'separate':
            return [
                branch.norm(t if p is None else torch.cat((p, t), dim=1))
                for branch, t, p in zip(self.branches, tokens, prefixes)
            ]
        merged = self.merge_branches(tokens, grids)
        return self.norm(merged.flatten(2).transpose(1, 2))

    def forward_features(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Separate heads: per-branch normalised tokens (prefix + patches), like timm's CrossViT.
        Merged head: normalised tokens of the merged map, (B, H*W, C)."""
        tokens, prefixes, grids = self.forward_branches(x)
        return self._head_features(tokens, prefixes, grids)

    def _pool_branch(self, x: torch.Tensor, num_prefix: int) -> torch.Tensor:
        if self.global_pool == 'first_patch':
            return x[:, num_prefix]
        if self.global_pool == 'token':
            return x[:, 0]
        return x[:, num_prefix:].mean(dim=1)

    def forward_head(self, x: Union[torch.Tensor, List[torch.Tensor]], pre_logits: bool = False) -> torch.Tensor:
        if self.head_style == 'separate':
            if not self.global_pool:
                return x
            pooled = [self.head_drop(self._pool_branch(f, n)) for f, n in zip(x, self.num_prefix_tokens)]
            if pre_logits or self.num_classes == 0:
                return torch.cat(pooled, dim=1)
            return torch.stack([head(p) for head, p in zip(self.head, pooled)]).mean(dim=0)
        if self.global_pool == 'avg':
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ----------------------------------------------------------------- intermediates
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[Any, List[torch.Tensor]]]:
        """The maps ``feature_info`` describes, timm style: ``(forward_features(x), maps)``.

        With a pyramid (``features_only=True``, the detectors) the maps are its levels, which all come
        from the final merged map (``norm``/``stop_early`` change nothing). Without one they are the finest
        branch's tokens after each interaction step; ``stop_early`` then stops after the last step
        asked for (the features returned are those of that step), and ``norm`` applies the finest
        branch's final norm (classifiers with separate heads have one).
        ``indices``: positions in ``feature_info`` (an int n: the last n).
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}.")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if self.pyramid is not None:
            tokens, prefixes, grids = self.forward_branches(x)
            intermediates = self.pyramid(self.merge_branches(tokens, grids), take_indices)
        else:
            last_step = max_index if stop_early or intermediates_only else None
            tokens, prefixes, grids, intermediates = self._forward_steps(x, take_indices, last_step)
            if norm:
                finest = self.branches[-1].norm
                intermediates = [finest(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for t in intermediates]
        if output_fmt == 'NHWC':
            intermediates = [t.permute(0, 2, 3, 1) for t in intermediates]
        if intermediates_only:
            return intermediates
        return self._head_features(tokens, prefixes, grids), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop what the levels at ``indices`` do not need: the classifier (``prune_head``), the final
        norms (``prune_norm``) and, for per-step levels, the interaction steps after the last one kept
        (with their blocks). Pyramid levels all need every branch, so nothing else is pruned for them."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if self.pyramid is None:
            self._keep_steps(max_index + 1)
        if prune_head:
            self.reset_classifier(0, '')
        if prune_norm:
            if self.head_style == 'separate':
                for branch in self.branches:
                    branch.norm = nn.Identity()
            else:
                self.norm = nn.Identity()
        return take_indices

    def _keep_steps(self, num_steps: int) -> None:
        """Keep the first ``num_steps`` interaction steps, the blocks they run and their feature levels."""
        self.interactions = self.interactions[:num_steps]
        self.feature_info = self.feature_info[:num_steps]
        cfgs = []
        for branch, cfg in zip(self.branches, self.branch_cfgs):
            depth = cfg.block_ranges[num_steps - 1][1] + 1
            branch.blocks = branch.blocks[:depth]
            windows = cfg.window_size[:depth] if isinstance(cfg.window_size, (tuple, list)) else cfg.window_size
            cfgs.append(replace(cfg, depth=depth, block_ranges=cfg.block_ranges[:num_steps], window_size=windows))
        self.branch_cfgs = tuple(cfgs)


def _is_fx_symbolic_tracing() -> bool:
    """True inside torch.fx.symbolic_trace (older torch only has the broader ``is_fx_tracing``)."""
    check = getattr(_symbolic_trace, 'is_fx_symbolic_tracing', None) or _symbolic_trace.is_fx_tracing
    return check()


# Shape-dependent steps of the forward as plain functions: torch.fx traces calls to them as single
# nodes (torch.fx.wrap), so the model traces symbolically although they branch on sizes.
def _pos_embed_for_grid(pos_embed: torch.Tensor, grid_hw: Tuple[int, int], stored: int) -> torch.Tensor:
    """The stored square pos_embed grid resampled to the token grid (bicubic, no antialias: the original's rule)."""
    return resample_abs_pos_embed(pos_embed, grid_hw, old_size=(stored, stored), num_prefix_tokens=0, antialias=False)


def _token_map(tokens: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid_hw[0], grid_hw[1])


def _resize_to_grid(fmap: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of a (B, C, H, W) map to ``grid_hw``, if it is not that size."""
    if tuple(fmap.shape[-2:]) == tuple(grid_hw):
        return fmap
    return F.interpolate(fmap, size=tuple(grid_hw), mode='bilinear', align_corners=False)


for _name in ('_pos_embed_for_grid', '_token_map', '_resize_to_grid'):
    torch.fx.wrap(_name)


# --------------------------------------------------------------------------- checkpoints
# Groups of keys a checkpoint may lack as a whole (they are then freshly initialised) or carry
# as a whole when the model lacks them (they are then dropped). Anything else must match exactly.
_OPTIONAL_GROUPS = {
    'classifier': lambda k: k.startswith(('head.', 'norm.')),
    'merge': lambda k: k.startswith('merges.') or k == 'branch_weights',
    'pyramid': lambda k: k.startswith('pyramid.'),
}
_BRANCH_ONLY_FRESH = {'interactions': lambda k: k.startswith('interactions.')}


def _is_branch_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Branch weights assembled from single-model repositories: no interaction has been trained."""
    return not any(k.startswith('interactions.') for k in state_dict)


def _resample_grid(pos: torch.Tensor, grid: int, key: str) -> torch.Tensor:
    """(1, N, C) square pos_embed -> (1, grid*grid, C), bicubic without antialias (the original's rule)."""
    old = int(round(math.sqrt(pos.shape[1])))
    if old * old != pos.shape[1]:
        raise ValueError(f'{key} has {pos.shape[1]} positions, not a square grid.')
    return resample_abs_pos_embed(pos, (grid, grid), old_size=(old, old), num_prefix_tokens=0, antialias=False)


def _adapt_pos_embed(pos: torch.Tensor, cfg: BranchCfg, key: str) -> torch.Tensor:
    """Class slot dropped (or kept) as the branch needs, grid resampled to the branch's."""
    has_slot = int(round(math.sqrt(pos.shape[1]))) ** 2 != pos.shape[1]
    if has_slot and not cfg.pos_embed_class_slot:
        pos = pos[:, 1:]  # DeiT/AugReg checkpoints carry a class slot the PIIP DeiT branches do not have
        has_slot = False
    if not has_slot and cfg.pos_embed_class_slot:
        raise ValueError(f'{key} has no class slot but this branch stores one; the checkpoint is for another model.')
    slot = 1 if has_slot else 0
    return torch.cat((pos[:, :slot], _resample_grid(pos[:, slot:], cfg.grid, key)), dim=1)


def adapt_branch_weights(state_dict: Dict[str, torch.Tensor], model: 'PIIP') -> Dict[str, torch.Tensor]:
    """Single-model ViT weights under ``branches.{i}.`` -> what the PIIP branch needs, the way the original
    initialised its branches: pos_embed resampled (bicubic, no antialias; class slot dropped for DeiT-style
    branches), patch kernels resized bicubically (e.g. 14 -> 16), missing layer-scale gammas set to the
    branch's init value, the branch heads moved to the separate heads, and unused tensors dropped.
    """
    out = {k: v for k, v in state_dict.items() if not k.startswith('branches.')}
    for i, (cfg, branch) in enumerate(zip(model.branch_cfgs, model.branches)):
        prefix = f'branches.{i}.'
        source = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not source:
            raise ValueError(f'the checkpoint has no weights for branch {i}.')
        own = branch.state_dict()
        for name in ('head.weight', 'head.bias'):
            value = source.pop(name, None)
            if value is not None and model.head_style == 'separate':
                out[f'head.{i}.{name.split(".")[1]}'] = value
        for name in list(source):
            # Parts of a single-model classifier / pretrainer that a PIIP branch does not have.
            if name not in own and name.split('.')[0] in ('norm', 'fc_norm', 'cls_token', 'reg_token', 'dist_token',
                                                           'head_dist', 'attn_pool', 'norm_pre'):
                del source[name]
        if 'pos_embed' in source:
            source['pos_embed'] = _adapt_pos_embed(source['pos_embed'], cfg, prefix + 'pos_embed')
        kernel = source.get('patch_embed.proj.weight')
        if kernel is not None and kernel.shape[-2:] != own['patch_embed.proj.weight'].shape[-2:]:
            source['patch_embed.proj.weight'] = F.interpolate(
                kernel.float(), size=own['patch_embed.proj.weight'].shape[-2:], mode='bicubic',
                align_corners=False).to(kernel.dtype)
        for name in own:
            if re.fullmatch(r'blocks\.\d+\.ls[12]\.gamma', name) and name not in source:
                source[name] = torch.full_like(own[name], cfg.init_values, device='cpu')
        out.update({prefix + k: v for k, v in source.items()})
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: 'PIIP') -> Dict[str, torch.Tensor]:
    """Any PIIP checkpoint (this package's layout, the original's, or assembled branch weights) ->
    a complete state dict for ``model``."""
    state_dict = to_package_layout(state_dict)
    groups = dict(_OPTIONAL_GROUPS)
    if _is_branch_checkpoint(state_dict):
        state_dict = adapt_branch_weights(state_dict, model)
        groups.update(_BRANCH_ONLY_FRESH)
    else:
        for i, cfg in enumerate(model.branch_cfgs):
            key = f'branches.{i}.pos_embed'
            if key in state_dict and state_dict[key].shape != model.branches[i].pos_embed.shape:
                state_dict[key] = _adapt_pos_embed(state_dict[key], cfg, key)
    return complete_state_dict(state_dict, model, groups)


# --------------------------------------------------------------------------- variants
# (embed_dim, depth, num_heads) of the ViT sizes PIIP combines.
VIT_SIZES = {
    'T': (192, 12, 3),
    'S': (384, 12, 6),
    'B': (768, 12, 12),
    'L': (1024, 24, 16),
    'H': (1280, 32, 16),
    '6B': (3200, 48, 25),
}

# Branch families, as the original code configures them.
DEIT_CLS = dict(init_values=1.0, class_token=True)  # DeiT with layer scale 1.0 (ImageNet classifiers)
AUGREG_CLS = dict(class_token=True, pos_embed_class_slot=True)  # AugReg ViT (ImageNet classifiers)
DEIT_DET = dict(init_values=1.0, pos_embed_grid=14)  # DeiT / DeiT III at 224 (detectors)
INTERNVIT_6B = dict(
    qkv_bias=False, init_values=0.1, norm='rmsnorm', qk_norm=True, mlp_act='gelu_tanh', pos_embed_class_slot=True,
    pos_embed_grid=14, drop_path_schedule='linear')
MAE_H = dict(init_values=1.0, mlp_act='gelu_tanh', pos_embed_class_slot=True, pos_embed_grid=14,
             drop_path_schedule='linear')
DEIT3_L_384 = dict(init_values=1.0, mlp_act='gelu_tanh', pos_embed_grid=24)


def vit_branch(
        size: str,
        img_size: int,
        drop_path_rate: float,
        num_interactions: int,
        block_ranges: Optional[BlockRanges] = None,
        **kwargs,
) -> BranchCfg:
    """A branch of one of the standard ViT sizes, its blocks split evenly over the interactions by default."""
    embed_dim, depth, num_heads = VIT_SIZES[size]
    return BranchCfg(
        img_size=img_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        block_ranges=block_ranges or even_block_ranges(depth, num_interactions), drop_path_rate=drop_path_rate,
        **kwargs)


@dataclass(frozen=True)
class VariantCfg:
    """A PIIP architecture: branches, interactions and heads.

    No classifier builds a feature pyramid (it would get no gradient); ``features_only=True`` adds
    the detectors' conv merge and simple pyramid.
    """
    branches: Tuple[BranchCfg, ...]
    interaction: InteractionCfg = InteractionCfg()
    head: HeadStyle = 'separate'
    merge: Optional[MergeStyle] = None


ALL_LEVELS = ('up4', 'up2', 'same', 'down2')


def tsb_detector(sizes=(448, 896, 1120)) -> VariantCfg:
    """mmdetection/configs/piip/3branch/mask_rcnn_deit_tsb_*: DeiT III-B/S, DeiT-T, windows of 14."""
    return VariantCfg(branches=(
        vit_branch('B', sizes[0], 0.15, 12, window_size=14, **DEIT_DET),
        vit_branch('S', sizes[1], 0.05, 12, window_size=14, **DEIT_DET),
        vit_branch('T', sizes[2], 0.05, 12, window_size=14, **DEIT_DET),
    ), head='merged', merge='conv')


def sbl_detector(sizes=(448, 672, 1120)) -> VariantCfg:
    """mmdetection/configs/piip/3branch/mask_rcnn_deit_sbl_*: DeiT III-L/B/S, windows of 28."""
    return VariantCfg(branches=(
        vit_branch('L', sizes[0], 0.4, 12, window_size=28, **DEIT_DET),
        vit_branch('B', sizes[1], 0.15, 12, window_size=28, **DEIT_DET),
        vit_branch('S', sizes[2], 0.05, 12, window_size=28, **DEIT_DET),
    ), head='merged', merge='conv')


def tsbl_detector(sizes=(448, 672, 896, 1344), released: bool = False) -> VariantCfg:
    """mmdetection/configs/piip/4branch/*: DeiT III-L/B/S, DeiT-T, windows of 28.

    ``released``: the released checkpoints' fourth branch is a copy of the third (DeiT-S), because
    ``piip_4branch.py`` builds it as ``vit_models(**branch3)``.
    """
    finest = vit_branch('S', sizes[3], 0.05, 12, window_size=28, **DEIT_DET) if released else \
        vit_branch('T', sizes[3], 0.05, 12, window_size=28, **DEIT_DET)
    return VariantCfg(branches=(
        vit_branch('L', sizes[0], 0.4, 12, window_size=28, **DEIT_DET),
        vit_branch('B', sizes[1], 0.15, 12, window_size=28, **DEIT_DET),
        vit_branch('S', sizes[2], 0.05, 12, window_size=28, **DEIT_DET),
        finest,
    ), head='merged', merge='conv')


VARIANTS: Dict[str, VariantCfg] = {
    # ImageNet PIIP-TSB 368/192/128 (classification/configs/piip_3branch_tsb_368-192-128_cls_token_deit1.py)
    'piip_tsb': VariantCfg(branches=(
        vit_branch('B', 128, 0.2, 12, **DEIT_CLS),
        vit_branch('S', 192, 0.05, 12, **DEIT_CLS),
        vit_branch('T', 368, 0.05, 12, **DEIT_CLS),
    )),
    # ImageNet PIIP-SBL 384/192/128 (classification/configs/piip_3branch_sbl_384-192-128_cls_token_augreg.py)
    'piip_sbl': VariantCfg(branches=(
        vit_branch('L', 128, 0.4, 12, **AUGREG_CLS),
        vit_branch('B', 192, 0.2, 12, **AUGREG_CLS),
        vit_branch('S', 384, 0.05, 12, **AUGREG_CLS),
    )),
    # COCO PIIP-TSBL 1344/896/672/448 as the paper describes it (branch4 DeiT-T)
    'piip_tsbl': tsbl_detector(),
    # COCO PIIP-LH6B 1536/1024/512 (mmdetection/configs/piip/3branch/*_internvit_lh6b_1536_1024_512_*)
    'piip_lh6b': VariantCfg(
        branches=(
            vit_branch('6B', 512, 0.4, 4, **INTERNVIT_6B),
            vit_branch('H', 1024, 0.4, 4, **MAE_H),
            vit_branch('L', 1536, 0.4, 4, **DEIT3_L_384),
        ),
        interaction=InteractionCfg(project=False, norm=False),
        head='merged', merge='conv'),
    # COCO PIIP-H6B 1024/512 (mmdetection/configs/piip/2branch/mask_rcnn_internvit_h6b_1024_512_*)
    'piip_h6b': VariantCfg(
        branches=(
            vit_branch('6B', 512, 0.4, 12, **{**INTERNVIT_6B, 'mlp_act': 'gelu'}),
            vit_branch('H', 1024, 0.4, 12, **{**MAE_H, 'mlp_act': 'gelu'}, block_ranges=(
                (0, 1), (2, 3), (4, 5), (6, 7), (8, 10), (11, 13), (14, 16), (17, 19), (20, 22), (23, 25),
                (26, 28), (29, 31))),
        ),
        head='merged', merge='conv'),
}

# Weights of the branches' own pretrained models (how the paper starts every run).
DEIT_IN1K = ('deit_base_patch16_224.fb_in1k', 'deit_small_patch16_224.fb_in1k', 'deit_tiny_patch16_224.fb_in1k')
AUGREG = ('vit_large_patch16_224.augreg_in21k_ft_in1k', 'vit_base_patch16_224.augreg_in21k_ft_in1k',
          'vit_small_patch16_224.augreg_in21k_ft_in1k')
DEIT3_L, DEIT3_B, DEIT3_S = ('deit3_large_patch16_224.fb_in22k_ft_in1k', 'deit3_base_patch16_224.fb_in22k_ft_in1k',
                             'deit3_small_patch16_224.fb_in22k_ft_in1k')
DEIT_T = 'deit_tiny_patch16_224.fb_in1k'
INTERNVIT_6B_REPO = 'OpenGVLab/InternViT-6B-224px'
MAE_H_TIMM = 'vit_huge_patch14_224.mae'
DEIT3_L_384_TIMM = 'deit3_large_patch16_384.fb_in22k_ft_in1k'


@dataclass(frozen=True)
class PretrainedTag:
    """One pretrained tag: its architecture, and either a released PIIP file or per-branch sources."""
    arch: VariantCfg
    file: Optional[str] = None  # in OpenGVLab/PIIP
    branch_sources: Tuple[BranchSource, ...] = ()
    notes: str = ''

    @property
    def is_classifier(self) -> bool:
        return self.file is not None and self.file.startswith('classification/')


def _timm(*names: str) -> Tuple[BranchSource, ...]:
    return tuple(BranchSource(timm_model=n) for n in names)


def _coco(kind: str, sizes: Sequence[int]) -> str:
    levels = '_'.join(str(s) for s in reversed(sizes))
    return f'detection/mask_rcnn_{kind}_{levels}_fpn_1x_coco_bs16.pth'


PIIP_REPO = 'OpenGVLab/PIIP'
# variant -> tag -> weights. The first tag of a variant is what pretrained=True gives.
PRETRAINED: Dict[str, Dict[str, PretrainedTag]] = {
    'piip_tsb': {
        'in1k': PretrainedTag(VARIANTS['piip_tsb'], 'classification/piip_3branch_tsb_368-192-128_cls_token_deit1.pth',
                              notes='ImageNet-1k classifier, 82.1% top-1'),
        'deit_in1k': PretrainedTag(VARIANTS['piip_tsb'], branch_sources=_timm(*DEIT_IN1K),
                                   notes='DeiT-B/S/T branches; interactions and heads fresh'),
        **{f'coco_{sizes[2]}_{sizes[1]}_{sizes[0]}': PretrainedTag(
            tsb_detector(sizes), _coco('deit_tsb', sizes), notes='COCO Mask R-CNN 1x backbone')
           for sizes in ((448, 896, 1120), (448, 896, 1568), (672, 1120, 1568))},
        'deit3_in22k': PretrainedTag(tsb_detector(), branch_sources=_timm(DEIT3_B, DEIT3_S, DEIT_T),
                                     notes='detector start: DeiT III-B/S, DeiT-T branches; the rest fresh'),
    },
    'piip_sbl': {
        'in1k': PretrainedTag(VARIANTS['piip_sbl'], 'classification/piip_3branch_sbl_384-192-128_cls_token_augreg.pth',
                              notes='ImageNet-1k classifier, 85.9% top-1'),
        'in1k_320': PretrainedTag(
            VariantCfg(branches=tuple(replace(b, img_size=s) for b, s in zip(VARIANTS['piip_sbl'].branches,
                                                                               (96, 160, 320)))),
            'classification/piip_3branch_sbl_320-160-96_cls_token_augreg.pth', notes='ImageNet-1k classifier, 85.2%'),
        'augreg_in21k_ft_in1k': PretrainedTag(VARIANTS['piip_sbl'], branch_sources=_timm(*AUGREG),
                                              notes='AugReg ViT-L/B/S branches; interactions and heads fresh'),
        **{f'coco_{sizes[2]}_{sizes[1]}_{sizes[0]}': PretrainedTag(
            sbl_detector(sizes), _coco('deit_sbl', sizes), notes='COCO Mask R-CNN 1x backbone')
           for sizes in ((448, 672, 1120), (448, 896, 1344), (672, 896, 1568), (672, 1120, 1568))},
        'deit3_in22k': PretrainedTag(sbl_detector(), branch_sources=_timm(DEIT3_L, DEIT3_B, DEIT3_S),
                                     notes='detector start: DeiT III-L/B/S branches; the rest fresh'),
    },
    'piip_tsbl': {
        'deit3_in22k': PretrainedTag(VARIANTS['piip_tsbl'], branch_sources=_timm(DEIT3_L, DEIT3_B, DEIT3_S, DEIT_T),
                                     notes='DeiT III-L/B/S, DeiT-T branches; the rest fresh'),
        **{f'coco_{sizes[3]}_{sizes[2]}_{sizes[1]}_{sizes[0]}': PretrainedTag(
            tsbl_detector(sizes, released=True), _coco('deit_tsbl', sizes),
            notes='COCO Mask R-CNN 1x backbone (fourth branch: a DeiT-S copy, as released)')
           for sizes in ((448, 672, 896, 1344), (448, 672, 1120, 1568), (448, 1120, 1568, 1792))},
    },
    'piip_lh6b': {
        'branches': PretrainedTag(VARIANTS['piip_lh6b'], branch_sources=(
            BranchSource(internvit_repo=INTERNVIT_6B_REPO), BranchSource(timm_model=MAE_H_TIMM),
            BranchSource(timm_model=DEIT3_L_384_TIMM)),
            notes='InternViT-6B, MAE ViT-H, DeiT III-L-384 branches; the rest fresh'),
    },
    'piip_h6b': {
        'coco_1024_512': PretrainedTag(
            VARIANTS['piip_h6b'], 'detection/mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms.pth',
            notes='COCO Mask R-CNN 1x backbone'),
        'branches': PretrainedTag(VARIANTS['piip_h6b'], branch_sources=(
            BranchSource(internvit_repo=INTERNVIT_6B_REPO), BranchSource(timm_model=MAE_H_TIMM)),
            notes='InternViT-6B, MAE ViT-H branches; the rest fresh'),
    },
}


def _per_branch(value: Any, count: int, name: str) -> List[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f'{name} needs one value per branch ({count}), got {len(value)}.')
        return list(value)
    return [value] * count


def customize_branches(
        branches: Sequence[BranchCfg],
        img_size: Union[None, int, Sequence[int]] = None,
        window_size: Union[None, int, Sequence[Optional[int]]] = -1,
        drop_path_rate: Optional[float] = None,
) -> Tuple[BranchCfg, ...]:
    """Branches with user choices applied.

    ``img_size``: the finest branch's size (the others keep their ratios) or one size per branch.
    ``window_size``: window side for every block (None: global attention), or one per branch;
    -1 keeps the branches'. ``drop_path_rate``: the same rate for every branch.
    """
    branches = tuple(branches)
    if img_size is not None:
        if isinstance(img_size, (list, tuple)) and len(img_size) == 2 and len(branches) != 2 \
                and img_size[0] == img_size[1]:
            img_size = img_size[0]  # timm passes (H, W) from pretrained_cfg input_size
        if isinstance(img_size, (list, tuple)):
            sizes = _per_branch(img_size, len(branches), 'img_size')
        else:
            sizes = [round(b.img_size * img_size / branches[-1].img_size) for b in branches]
        if any(s < b.patch_size for s, b in zip(sizes, branches)):
            raise ValueError(f'img_size {img_size} gives branch sizes {sizes}, below the {branches[0].patch_size}px patch.')
        branches = tuple(replace(b, img_size=int(s)) for b, s in zip(branches, sizes))
    if window_size != -1:
        windows = _per_branch(window_size, len(branches), 'window_size')
        branches = tuple(replace(b, window_size=w) for b, w in zip(branches, windows))
    if drop_path_rate is not None:
        branches = tuple(replace(b, drop_path_rate=drop_path_rate) for b in branches)
    return branches


def _as_branch(cfg: Union[BranchCfg, Mapping[str, Any]]) -> BranchCfg:
    if isinstance(cfg, BranchCfg):
        return cfg
    cfg = dict(cfg)
    cfg['block_ranges'] = tuple(tuple(r) for r in cfg['block_ranges'])
    if isinstance(cfg.get('window_size'), list):
        cfg['window_size'] = tuple(cfg['window_size'])
    return BranchCfg(**cfg)


def model_args(model: 'PIIP') -> Dict[str, Any]:
    """JSON-serialisable constructor arguments that rebuild ``model`` through any piip_* entry point
    (``timm.create_model(entry_point_name(model), **model_args(model))``)."""
    return dict(
        branches=[asdict(b) for b in model.branch_cfgs],
        interaction=asdict(model.interaction_cfg),
        head=model.head_style,
        merge=model.merge_style,
        pyramid=list(model.pyramid.level_names) if model.pyramid is not None else None,
        global_pool=model.global_pool,
    )


def entry_point_name(model: 'PIIP') -> str:
    """The registered variant whose branch widths ``model`` has (``piip_tsb`` if none): the architecture
    name a converted checkpoint's config.json gives timm; its ``model_args`` carry the whole architecture."""
    for name, variant in VARIANTS.items():
        if tuple(b.embed_dim for b in variant.branches) == tuple(model.embed_dims):
            return name
    return 'piip_tsb'


def _resolve_tag(variant: str, kwargs: Dict[str, Any]) -> Tuple[Optional[str], Optional[PretrainedTag]]:
    """The pretrained tag a create_model call refers to (the variant's first tag by default)."""
    cfg = kwargs.get('pretrained_cfg')
    if isinstance(cfg, str):
        tag = cfg
    elif cfg is not None:
        tag = cfg.get('tag') if isinstance(cfg, Mapping) else getattr(cfg, 'tag', None)
    else:
        tag = next(iter(PRETRAINED.get(variant, {})), None)
    return tag, PRETRAINED.get(variant, {}).get(tag)


def _create_piip(variant: str, pretrained: bool = False, **kwargs) -> PIIP:
    tag, weights = _resolve_tag(variant, kwargs)
    spec = weights.arch if weights else VARIANTS.get(variant)
    branches = kwargs.pop('branches', None) or (spec.branches if spec else None)
    if branches is None:
        raise ValueError(f'{variant} needs branches=[...] (a list of BranchCfg or their dicts).')
    branches = customize_branches(
        [_as_branch(b) for b in branches],
        kwargs.pop('img_size', None), kwargs.pop('window_size', -1), kwargs.pop('drop_path_rate', None))
    interaction = kwargs.pop('interaction', spec.interaction if spec else InteractionCfg())
    if isinstance(interaction, Mapping):
        interaction = InteractionCfg(**interaction)
    head = kwargs.pop('head', spec.head if spec else 'merged')
    merge = kwargs.pop('merge', spec.merge if spec else None)
    pyramid = kwargs.pop('pyramid', None)
    if kwargs.get('features_only'):
        # The dense path needs a merged map and its pyramid; classifiers get the detectors' conv merge.
        merge, pyramid = merge or 'conv', pyramid or ALL_LEVELS
    if head == 'merged' and weights is not None and not weights.is_classifier and not weights.branch_sources:
        # Detector backbones: no classifier unless asked for one.
        head = 'merged' if kwargs.get('num_classes') else None
        kwargs.setdefault('num_classes', 0)

    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    if pretrained and not any(overlay.get(k) for k in ('file', 'state_dict', 'url')):
        if weights is not None and weights.branch_sources:
            check_hub_files([f for s in weights.branch_sources for f in s.hub_files()])
            assembled = {}
            for i, source in enumerate(weights.branch_sources):
                assembled.update({f'branches.{i}.{k}': v for k, v in load_branch_state_dict(source).items()})
            kwargs['pretrained_cfg_overlay'] = dict(overlay, state_dict=assembled)
        else:
            cfg = kwargs.get('pretrained_cfg')
            repo = (cfg.get('hf_hub_id') if isinstance(cfg, Mapping) else None) or (
                PIIP_REPO if weights is not None and weights.file else None)
            if repo:
                filename = weights.file if weights is not None and weights.file else 'model.safetensors'
                check_hub_files([HubFile(repo, filename)])
    try:
        with allow_training_metadata():
            model = build_model_with_cfg(
                PIIP, variant, pretrained,
                pretrained_filter_fn=checkpoint_filter_fn,
                feature_cfg=dict(feature_cls='getter', out_indices=tuple(range(len(pyramid or ())))),
                branches=branches, interaction=interaction, head=head, merge=merge, pyramid=pyramid,
                **kwargs,
            )
    except Exception as e:
        raise _weights_error(e, variant, overlay, weights, kwargs) or e
    cfg = getattr(model, 'pretrained_cfg', None)
    if isinstance(cfg, dict) and cfg.get('state_dict') is not None:
        cfg['state_dict'] = None  # do not keep a second copy of the weights alive
    return model


def _weights_error(
        error: Exception,
        variant: str,
        overlay: Mapping[str, Any],
        weights: Optional[PretrainedTag],
        kwargs: Mapping[str, Any],
) -> Optional[Exception]:
    """A clear error for an unreadable or refused weight file (None for anything else)."""
    from safetensors import SafetensorError
    cfg = kwargs.get('pretrained_cfg')
    where = overlay.get('file') or overlay.get('hf_hub_id') or (
        cfg.get('hf_hub_id') if isinstance(cfg, Mapping) else None) or (
        f'{PIIP_REPO}/{weights.file}' if weights is not None and weights.file else variant)
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, (pickle.UnpicklingError, RuntimeError)) and (
            'weights_only' in str(error) or 'Unsupported global' in str(error)):
        return ValueError(
            f'the weights at {where} were refused: the file is a pickle that needs more than tensors to load '
            f'({first_line}); only weights-only checkpoints and safetensors are accepted.')
    if isinstance(error, (SafetensorError, pickle.UnpicklingError, EOFError)) or (
            isinstance(error, RuntimeError) and ('PytorchStreamReader' in str(error) or 'zip archive' in str(error))):
        return ValueError(
            f'the weights at {where} are not a readable checkpoint ({type(error).__name__}: {first_line}); the file '
            'may be truncated or corrupt: delete it (or its copy in the Hugging Face cache) and download it again.')
    return None


def _cfg(arch: VariantCfg, **kwargs) -> Dict[str, Any]:
    size = arch.branches[-1].img_size
    n = len(arch.branches)
    cfg = dict(
        url='', num_classes=1000, input_size=(3, size, size), pool_size=None, crop_pct=1.0,
        interpolation='bicubic', fixed_input_size=False,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv=tuple(f'branches.{i}.patch_embed.proj' for i in range(n)),
        classifier=tuple(f'head.{i}' for i in range(n)) if arch.head == 'separate' else 'head',
        license='mit', paper_ids='arXiv:2406.04330, arXiv:2501.07783',
    )
    cfg.update(kwargs)
    return cfg


def _tag_cfg(tag: PretrainedTag) -> Dict[str, Any]:
    if tag.file:
        extra = dict(hf_hub_id=PIIP_REPO, hf_hub_filename=tag.file, notes=tag.notes)
        if not tag.is_classifier:
            extra.update(num_classes=0, classifier=None)
        return _cfg(tag.arch, **extra)
    sources = ', '.join(str(s) for s in tag.branch_sources)
    return _cfg(tag.arch, notes=f'{tag.notes} (from {sources})')


default_cfgs = generate_default_cfgs({
    f'{variant}.{name}': _tag_cfg(tag) for variant, tags in PRETRAINED.items() for name, tag in tags.items()
})
for _variant, _tags in PRETRAINED.items():
    # The first tag is the default even when its weights are assembled from branch repos (timm would
    # otherwise prefer the first tag with a single weight file).
    default_cfgs[_variant].tags.remove(next(iter(_tags)))
    default_cfgs[_variant].tags.appendleft(next(iter(_tags)))


@register_model
def piip_tsb(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSB: DeiT-B/S/T on 128/192/368 px (ImageNet); COCO tags: the detectors' configuration."""
    return _create_piip('piip_tsb', pretrained=pretrained, **kwargs)


@register_model
def piip_sbl(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL: AugReg ViT-L/B/S on 128/192/384 px (ImageNet); COCO tags: DeiT III-L/B/S detectors."""
    return _create_piip('piip_sbl', pretrained=pretrained, **kwargs)


@register_model
def piip_tsbl(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSBL: DeiT III-L/B/S and DeiT-T on 448/672/896/1344 px (COCO configuration, windows of 28)."""
    return _create_piip('piip_tsbl', pretrained=pretrained, **kwargs)


@register_model
def piip_lh6b(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-LH6B: InternViT-6B / MAE ViT-H / DeiT III-L-384 on 512/1024/1536 px (COCO configuration)."""
    return _create_piip('piip_lh6b', pretrained=pretrained, **kwargs)


@register_model
def piip_h6b(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-H6B: InternViT-6B / MAE ViT-H on 512/1024 px (COCO configuration)."""
    return _create_piip('piip_h6b', pretrained=pretrained, **kwargs)

