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
import math
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, GELUTanh, LayerNorm, RmsNorm, resample_abs_pos_embed, trunc_normal_
from timm.models import VisionTransformer, build_model_with_cfg, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Attention as TimmAttention
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import Attention, BidirectionalInteraction, ConvMerge, DeformableCrossAttention, LinearMerge, \
    SimpleFeaturePyramid, PYRAMID_SCALES

__all__ = ['PIIP', 'BranchCfg', 'InteractionCfg', 'even_block_ranges']

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


def build_branch(cfg: BranchCfg, in_chans: int = 3, final_norm: bool = False) -> VisionTransformer:
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
    ) -> None:
        super().__init__()
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
            [build_branch(b, in_chans, final_norm=head == 'separate') for b in branches])

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
                [LinearMerge(d, out_dim, project=i > 0) for i, d in enumerate(self.embed_dims)])
        elif merge == 'conv':
            self.merges = nn.ModuleList([ConvMerge(d, out_dim) for d in self.embed_dims])
        elif merge is None:
            self.merges = None
        else:
            raise ValueError(f"merge must be 'linear', 'conv' or None, got {merge!r}.")
        self.branch_weights = nn.Parameter(torch.ones(len(branches))) if merge else None
        self.pyramid = SimpleFeaturePyramid(out_dim, pyramid) if pyramid else None
        self.feature_info = [
            dict(num_chs=out_dim, reduction=int(self.patch_size / PYRAMID_SCALES[name]), module=f'pyramid.{name}')
            for name in (pyramid or ())
        ]

        self.head_drop = nn.Dropout(drop_rate)
        if head == 'separate':
            self.num_features = self.head_hidden_size = sum(self.embed_dims)
            self.norm = None
        elif head == 'merged':
            self.num_features = self.head_hidden_size = out_dim
            self.norm = nn.LayerNorm(out_dim, eps=1e-6)
        elif head is None:
            if num_classes:
                raise ValueError(f'a model without head (head=None) needs num_classes=0, got {num_classes}.')
            self.num_features = self.head_hidden_size = out_dim
            self.norm = nn.Identity()
        else:
            raise ValueError(f"head must be 'separate', 'merged' or None, got {head!r}.")
        self.global_pool = self._check_pool(global_pool)
        self.head = self._make_head(num_classes)
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

    def _make_head(self, num_classes: int) -> nn.Module:
        if self.head_style == 'separate':
            return nn.ModuleList([
                nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity() for d in self.embed_dims])
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

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
        device = next(self.parameters()).device
        self.head = self._make_head(num_classes).to(device)
        self.head.apply(_init_neck_weights)

    # ----------------------------------------------------------------- forward pieces
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'PIIP expects a torch.Tensor image batch, got {type(x).__name__}.')
        if x.ndim != 4:
            raise ValueError(f'PIIP expects a 4-D (batch, channels, height, width) tensor, got shape {tuple(x.shape)}.')
        if x.shape[1] != self.in_chans:
            raise ValueError(f'PIIP expects {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)}).')
        height, width = x.shape[-2:]
        for i, (ratio, cfg) in enumerate(zip(self.image_ratios, self.branch_cfgs)):
            h = math.floor(height * ratio) if ratio < 1 else height
            w = math.floor(width * ratio) if ratio < 1 else width
            if h < cfg.patch_size or w < cfg.patch_size:
                min_side = math.ceil(cfg.patch_size / min(ratio, 1.0))
                raise ValueError(
                    f'image {height}x{width} is too small: branch {i} sees it at {h}x{w}, less than one '
                    f'{cfg.patch_size}px patch; use at least {min_side}x{min_side}.')

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
        x = branch.patch_embed.norm(x.flatten(2).transpose(1, 2))
        stored = self.branch_cfgs[index].grid
        pos_embed = branch.pos_embed[:, 1:] if self.branch_cfgs[index].pos_embed_class_slot else branch.pos_embed
        pos_embed = resample_abs_pos_embed(
            pos_embed, (grid_h, grid_w), old_size=(stored, stored), num_prefix_tokens=0, antialias=False)
        x = branch.pos_drop(x + pos_embed)
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
        self._check_input(x)
        tokens, prefixes, grids = [], [], []
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
        return tokens, prefixes, grids

    def merge_branches(self, tokens: Sequence[torch.Tensor], grids: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """Weighted sum of the merged branch maps on the finest grid: (B, embed_dims[0], H, W)."""
        if self.merges is None:
            raise RuntimeError(
                'this PIIP model has no branch merge; build it with merge="conv" (or features_only=True).')
        target = tuple(grids[-1])
        out = None
        for i, (merge, t, hw) in enumerate(zip(self.merges, tokens, grids)):
            fmap = merge(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], hw[0], hw[1]))
            if tuple(hw) != target:
                fmap = F.interpolate(fmap, size=target, mode='bilinear', align_corners=False)
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

    # ----------------------------------------------------------------- dense features
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[Any, List[torch.Tensor]]]:
        """The simple-pyramid levels of the merged map (strides in ``feature_info``), timm style.

        ``indices`` select pyramid levels (int n: the last n). ``norm`` and ``stop_early`` have no
        effect: the levels all come from the final merged map.
        """
        if self.pyramid is None:
            raise RuntimeError('this PIIP model has no feature pyramid; create it with features_only=True '
                               'or pyramid=("up4", "up2", "same", "down2").')
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}.")
        take_indices, _ = feature_take_indices(len(self.pyramid.level_names), indices)
        tokens, prefixes, grids = self.forward_branches(x)
        intermediates = self.pyramid(self.merge_branches(tokens, grids), take_indices)
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
        """For ``features_only``: drop the classifier (and the norms that only feed it); every
        pyramid level needs every branch, so no block is pruned."""
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        if prune_head:
            self.reset_classifier(0, '')
        if prune_norm:
            if self.head_style == 'separate':
                for branch in self.branches:
                    branch.norm = nn.Identity()
            else:
                self.norm = nn.Identity()
        return take_indices


# --------------------------------------------------------------------------- checkpoints
def _resample_pos_embeds(state_dict: Dict[str, torch.Tensor], model: PIIP) -> None:
    """Bring stored pos_embeds to the model's grid the way the original did (bicubic, no antialias)."""
    for i, cfg in enumerate(model.branch_cfgs):
        key = f'branches.{i}.pos_embed'
        target = model.branches[i].pos_embed
        if key not in state_dict or state_dict[key].shape == target.shape:
            continue
        slot = 1 if cfg.pos_embed_class_slot else 0
        pos = state_dict[key]
        old = int(round(math.sqrt(pos.shape[1] - slot)))
        if old * old != pos.shape[1] - slot:
            raise ValueError(f'{key} has {pos.shape[1]} positions, not a square grid (+{slot} class slot).')
        resized = resample_abs_pos_embed(
            pos[:, slot:], (cfg.grid, cfg.grid), old_size=(old, old), num_prefix_tokens=0, antialias=False)
        state_dict[key] = torch.cat((pos[:, :slot], resized), dim=1)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: PIIP) -> Dict[str, torch.Tensor]:
    """Checkpoint in this package's layout or the original PIIP layout -> this model's state dict."""
    from .convert import convert_original_state_dict, is_original_layout, unwrap_state_dict
    state_dict = unwrap_state_dict(state_dict)
    if is_original_layout(state_dict):
        state_dict = convert_original_state_dict(state_dict)
    _resample_pos_embeds(state_dict, model)
    return state_dict


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
DEIT3_DET = dict(init_values=1.0, pos_embed_grid=14)  # DeiT III / DeiT at 224 (detectors)
INTERNVIT_6B = dict(
    qkv_bias=False, init_values=0.1, norm='rmsnorm', qk_norm=True, mlp_act='gelu_tanh', pos_embed_class_slot=True,
    pos_embed_grid=14, drop_path_schedule='linear')
MAE_H = dict(init_values=1.0, mlp_act='gelu_tanh', pos_embed_class_slot=True, pos_embed_grid=14,
             drop_path_schedule='linear')
DEIT3_L_384 = dict(init_values=1.0, mlp_act='gelu_tanh', pos_embed_grid=24)


def vit_branch(size: str, img_size: int, drop_path_rate: float, num_interactions: int, **kwargs) -> BranchCfg:
    """A branch of one of the standard ViT sizes with its blocks split evenly over the interactions."""
    embed_dim, depth, num_heads = VIT_SIZES[size]
    return BranchCfg(
        img_size=img_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        block_ranges=even_block_ranges(depth, num_interactions), drop_path_rate=drop_path_rate, **kwargs)


@dataclass(frozen=True)
class VariantCfg:
    """A registered PIIP variant: the paper's branches, interactions and heads.

    No variant builds a feature pyramid for classification (it would get no gradient);
    ``features_only=True`` adds the detectors' conv merge and simple pyramid.
    """
    branches: Tuple[BranchCfg, ...]
    interaction: InteractionCfg = InteractionCfg()
    head: HeadStyle = 'separate'
    merge: Optional[MergeStyle] = None
    pyramid: Optional[Tuple[str, ...]] = None


ALL_LEVELS = ('up4', 'up2', 'same', 'down2')

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
    # COCO PIIP-TSBL 1344/896/672/448 (mmdetection/configs/piip/4branch/mask_rcnn_deit_tsbl_1344_896_672_448_*)
    'piip_tsbl': VariantCfg(
        branches=(
            vit_branch('L', 448, 0.4, 12, window_size=28, **DEIT3_DET),
            vit_branch('B', 672, 0.15, 12, window_size=28, **DEIT3_DET),
            vit_branch('S', 896, 0.05, 12, window_size=28, **DEIT3_DET),
            vit_branch('T', 1344, 0.05, 12, window_size=28, **DEIT3_DET),
        ),
        head='merged', merge='conv'),
    # COCO PIIP-LH6B 1536/1024/512 (mmdetection/configs/piip/3branch/*_internvit_lh6b_1536_1024_512_*)
    'piip_lh6b': VariantCfg(
        branches=(
            vit_branch('6B', 512, 0.4, 4, **INTERNVIT_6B),
            vit_branch('H', 1024, 0.4, 4, **MAE_H),
            vit_branch('L', 1536, 0.4, 4, **DEIT3_L_384),
        ),
        interaction=InteractionCfg(project=False, norm=False),
        head='merged', merge='conv'),
}


def _per_branch(value: Any, count: int, name: str) -> List[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f'{name} needs one value per branch ({count}), got {len(value)}.')
        return list(value)
    return [value] * count


def variant_branches(
        variant: str,
        img_size: Union[None, int, Sequence[int]] = None,
        window_size: Union[None, int, Sequence[Optional[int]]] = -1,
        drop_path_rate: Optional[float] = None,
) -> Tuple[BranchCfg, ...]:
    """The variant's branches, with user choices applied.

    ``img_size``: the finest branch's size (the others keep their ratios) or one size per branch.
    ``window_size``: window side for every block (None: global attention), or one per branch;
    -1 keeps the variant's. ``drop_path_rate``: the same rate for every branch.
    """
    branches = VARIANTS[variant].branches
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


def _create_piip(variant: str, pretrained: bool = False, **kwargs) -> PIIP:
    spec = VARIANTS[variant]
    branches = variant_branches(
        variant, kwargs.pop('img_size', None), kwargs.pop('window_size', -1), kwargs.pop('drop_path_rate', None))
    merge, pyramid = kwargs.pop('merge', spec.merge), kwargs.pop('pyramid', spec.pyramid)
    if kwargs.get('features_only'):
        # The dense path needs a merged map and its pyramid; classifiers get the detectors' conv merge.
        merge, pyramid = merge or 'conv', pyramid or ALL_LEVELS
    return build_model_with_cfg(
        PIIP, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=tuple(range(len(pyramid or ())))),
        branches=branches,
        interaction=kwargs.pop('interaction', spec.interaction),
        head=kwargs.pop('head', spec.head),
        merge=merge,
        pyramid=pyramid,
        **kwargs,
    )


def _cfg(variant: str, **kwargs) -> Dict[str, Any]:
    spec = VARIANTS[variant]
    size = spec.branches[-1].img_size
    n = len(spec.branches)
    return dict(
        url='', num_classes=1000, input_size=(3, size, size), pool_size=None, crop_pct=1.0,
        interpolation='bicubic', fixed_input_size=False,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv=tuple(f'branches.{i}.patch_embed.proj' for i in range(n)),
        classifier=tuple(f'head.{i}' for i in range(n)) if spec.head == 'separate' else 'head',
        license='mit', paper_ids='arXiv:2406.04330', **kwargs,
    )


from timm.models import generate_default_cfgs  # noqa: E402  (kept beside the table it serves)

default_cfgs = generate_default_cfgs({
    'piip_tsb.untrained': _cfg('piip_tsb'),
    'piip_sbl.untrained': _cfg('piip_sbl'),
    'piip_tsbl.untrained': _cfg('piip_tsbl'),
    'piip_lh6b.untrained': _cfg('piip_lh6b'),
})


@register_model
def piip_tsb(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSB: DeiT-T/S/B on 368/192/128 px (ImageNet config)."""
    return _create_piip('piip_tsb', pretrained=pretrained, **kwargs)


@register_model
def piip_sbl(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL: AugReg ViT-S/B/L on 384/192/128 px (ImageNet config)."""
    return _create_piip('piip_sbl', pretrained=pretrained, **kwargs)


@register_model
def piip_tsbl(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSBL: DeiT-T / DeiT III-S/B/L on 1344/896/672/448 px (COCO config, windows of 28)."""
    return _create_piip('piip_tsbl', pretrained=pretrained, **kwargs)


@register_model
def piip_lh6b(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-LH6B: DeiT III-L-384 / MAE ViT-H / InternViT-6B on 1536/1024/512 px (COCO config)."""
    return _create_piip('piip_lh6b', pretrained=pretrained, **kwargs)
