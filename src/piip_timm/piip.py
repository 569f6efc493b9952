"""Parameter-Inverted Image Pyramid networks (PIIP): the model, generic over its branches.

Zhu et al., "Parameter-Inverted Image Pyramid Networks", NeurIPS 2024, and
Wang et al., "Parameter-Inverted Image Pyramid Networks for Visual Perception
and Multimodal Understanding", TPAMI 2025 (https://github.com/OpenGVLab/PIIP).

An image pyramid is fed to pretrained models of different sizes, inverted: the
smallest model sees the largest image. After chosen ranges of each branch's layers,
adjacent branches exchange information through bidirectional deformable
cross-attention units, from the highest-resolution pair down. Classifiers average
per-branch heads (``head='separate'``) or pool one merged map (``head='merged'``);
dense models merge the branches onto the highest-resolution grid and either build a
simple feature pyramid on the final merge (the ViT detectors) or also merge after
chosen interactions and bring each merge to its stride (the regular-FPN detectors of
the ConvNeXt and hybrid configurations): strides 4/8/16/32 of the input either way.

Branches are stock timm models behind one interface (``branch.PIIPBranch``): timm
ViTs (``vit_branch``), ConvNeXts (``convnext_branch``), BEiTs (``beit_branch``) and
Uni-Perceiver's ViT (``uniperceiver_branch``), listed in ``branch_kinds``; any number
of them, in any mix; the model never asks which kind a branch is. Variants and pretrained tags
are declared in ``variants``; weight conversion lives in ``convert``.
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices
from torch import nn
from torch.fx import _symbolic_trace
from torch.utils.checkpoint import checkpoint

from .branch import Grid, PIIPBranch, even_block_ranges, on_meta
from .convnext_branch import ConvNeXtBranchCfg
from .layers import BidirectionalInteraction, BranchMerge, ConvMerge, DeformableCrossAttention, FeatureLevels, \
    LinearMerge, PYRAMID_SCALES, SimpleFeaturePyramid, SingleConvMerge, merge_branch_maps
from .layers.token_map import token_map
from .limits import check_fits
from .vit_branch import BranchCfg, build_branch

__all__ = ['PIIP', 'BranchCfg', 'ConvNeXtBranchCfg', 'BranchSpec', 'InteractionCfg', 'even_block_ranges',
           'build_branch']

torch.fx.wrap('token_map')

HeadStyle = Optional[Literal['separate', 'merged']]
MergeStyle = Literal['linear', 'conv', 'single_conv']
BranchSpec = Union[BranchCfg, ConvNeXtBranchCfg]

# Output strides of the dense outputs, finest first (the regular-FPN detectors' levels).
OUTPUT_STRIDES = (4, 8, 16, 32)


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


def _merge_factory(style: MergeStyle, out_dim: int, **dd) -> Callable[[int, int], nn.Module]:
    """index, in_dim -> the merge module of that branch (the coarsest is already at ``out_dim``)."""
    if out_dim % 32:
        raise ValueError(f'branches are merged at the coarsest branch\'s width, {out_dim} here, which the merges\' '
                         'GroupNorm(32) needs to be a multiple of 32; use another coarsest model.')
    if style == 'linear':
        return lambda i, d: LinearMerge(d, out_dim, project=i > 0, **dd)
    if style == 'conv':
        return lambda i, d: ConvMerge(d, out_dim, **dd)
    if style == 'single_conv':
        return lambda i, d: SingleConvMerge(d, out_dim, project=i > 0, **dd)
    raise ValueError(f"merge must be 'linear', 'conv', 'single_conv' or None, got {style!r}.")


def run_interaction_step(
        branches: Sequence[PIIPBranch],
        layers: Sequence[Sequence[nn.Module]],
        units: Sequence[nn.Module],
        tokens: Sequence[torch.Tensor],
        prefixes: Sequence[Optional[torch.Tensor]],
        grids: Sequence[Grid],
        checkpoint_layers: bool = False,
        checkpoint_units: bool = False,
) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]], List[Grid]]:
    """One interaction step: every branch runs its ``layers`` of the step, then the ``units`` exchange
    between adjacent branches, from the highest-resolution pair down."""
    tokens, prefixes, grids = list(tokens), list(prefixes), list(grids)
    for i, branch in enumerate(branches):
        tokens[i], prefixes[i], grids[i] = branch.forward_layers(
            layers[i], tokens[i], prefixes[i], grids[i], checkpoint_layers)
    for u in reversed(range(len(units))):
        args = (tokens[u], grids[u], tokens[u + 1], grids[u + 1])
        if checkpoint_units:
            tokens[u], tokens[u + 1] = checkpoint(units[u], *args, use_reentrant=False)
        else:
            tokens[u], tokens[u + 1] = units[u](*args)
    return tokens, prefixes, grids


class InteractionStep(nn.Module):
    """One interaction step as a module, the region ``PIIP.compile_regions`` compiles.

    Its forward is one code object for every step and the step's layers and units are its children, so
    dynamo traces one graph for all steps of the same shapes (module attributes, not step indices, tell the
    steps apart). It shares the model's modules and is kept outside the model's module tree: parameter
    names, state dicts and ``.to()`` are the model's own.
    """

    def __init__(self, branches: Sequence[PIIPBranch], step: int, units: nn.ModuleList) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleList(branch.step_layers(step)) for branch in branches)
        self.units = units
        self.branches = tuple(branches)  # a tuple: referenced for their forward_layers, not registered

    def forward(self, tokens, prefixes, grids, checkpoint_layers: bool = False, checkpoint_units: bool = False):
        return run_interaction_step(self.branches, self.layers, self.units, tokens, prefixes, grids,
                                    checkpoint_layers, checkpoint_units)


class PIIP(nn.Module):
    """Parameter-inverted image pyramid of pretrained branches with bidirectional interactions.

    Args:
        branches: branch configs (``BranchCfg`` for ViTs, ``ConvNeXtBranchCfg`` for ConvNeXts,
            ``BeitBranchCfg``, ``UniPerceiverBranchCfg``) from the coarsest image (largest model) to the finest.
        interaction: interaction-unit hyper-parameters.
        head: ``'separate'``: every branch keeps its final norm and has its own linear head,
            logits are their mean (PIIP's ImageNet classifiers; ViT branches only); ``'merged'``: norm,
            average pool and one linear head on the merged map; None: a pure backbone (the detectors;
            with ``merge=None`` too, the branches' own final maps: the PIIP-LLaVA vision towers).
        merge: how branches are merged onto the finest grid: ``'linear'`` (GroupNorm/Linear, the
            ImageNet classifiers), ``'conv'`` (two conv-GroupNorm-ReLU, the simple-pyramid detectors) or
            ``'single_conv'`` (one conv-GroupNorm-ReLU, none on the coarsest branch: the regular-FPN
            detectors); None: no merge.
        pyramid: levels of the simple feature pyramid built on the final merged map, a subset of
            ``('up4', 'up2', 'same', 'down2')``; None: no pyramid.
        out_interactions: interactions after which the branches are also merged (the regular-FPN
            detectors' ``out_interaction_indexes``); these merges and the final one are the dense
            outputs, each brought to stride 4, 8, 16, 32... of the input by deconvolutions, identity or
            max-pooling (``pyramid`` must then be None).
        num_classes: classes of the head(s); 0 for none.
        global_pool: ``'first_patch'`` (default for separate heads: the released PIIP classifiers
            read the first patch token), ``'token'`` (class token), ``'avg'`` (default for the merged
            head) or ``''`` (no pooling).
        in_chans: input channels.
        drop_rate: dropout before the head(s).
        feature_levels: what ``feature_info`` / ``forward_intermediates`` describe when the model has no pyramid:
            ``'steps'`` (default), maps after each interaction step; ``'branches'`` (only with ``head=None,
            merge=None``), every branch's final map, finest first (the towers' ``features_only``).
        device, dtype: where and in which dtype parameters are created (timm's factory kwargs);
            ``device='meta'`` builds the structure without allocating.

    ``feature_info`` / ``forward_intermediates``: with a pyramid, its levels; with out_interactions,
    the merged maps at their output strides; otherwise the finest branch's token map after each interaction
    step (like timm's ViTs, one level per step of the network). A model without head and merge (the PIIP-LLaVA
    towers), whose output is every branch's map, has every branch's map after each step (by increasing
    reduction: the finest branch's steps first), or, with ``feature_levels='branches'``, every branch's final
    map, finest first (the towers built with ``features_only=True``).
    """

    def __init__(
            self,
            branches: Sequence[BranchSpec],
            interaction: InteractionCfg = InteractionCfg(),
            head: HeadStyle = 'separate',
            merge: Optional[MergeStyle] = None,
            pyramid: Optional[Sequence[str]] = None,
            out_interactions: Optional[Sequence[int]] = None,
            num_classes: int = 1000,
            global_pool: Optional[str] = None,
            in_chans: int = 3,
            drop_rate: float = 0.0,
            feature_levels: str = 'steps',
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
        if head == 'merged' and merge is None:
            raise ValueError(f"head={head!r} needs a merge ('linear', 'conv' or 'single_conv').")
        if (pyramid is not None or out_interactions is not None) and merge is None:
            raise ValueError("dense outputs (a pyramid or out_interactions) need a merge ('conv' or 'single_conv').")
        if pyramid is not None and out_interactions is not None:
            raise ValueError('give either a simple pyramid or out_interactions, not both.')
        if feature_levels not in ('steps', 'branches'):
            raise ValueError(f"feature_levels must be 'steps' or 'branches', got {feature_levels!r}.")
        if feature_levels == 'branches' and (head is not None or merge is not None):
            raise ValueError("feature_levels='branches' needs a model without head and merge (head=None, merge=None).")
        self.interaction_cfg = interaction
        # No head and no merge: the output is every branch's own map after the last interaction
        # (what the PIIP-LLaVA towers hand to their projector).
        self.branch_maps = head is None and merge is None
        self.branch_levels = feature_levels == 'branches'
        self.head_style = head
        self.merge_style = merge
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.grad_checkpointing = False
        self._compiled_steps: Optional[List[InteractionStep]] = None  # set by compile_regions('steps')
        self._compiled_regions: Optional[str] = None  # the regions compile_regions compiled
        self.image_ratios = tuple(b.img_size / branches[-1].img_size for b in branches)

        self.branches = nn.ModuleList([b.build(in_chans, final_norm=head == 'separate', **dd) for b in branches])
        for i, branch in enumerate(self.branches):
            if any(end >= branch.num_layers or start > end for start, end in branch.cfg.block_ranges):
                raise ValueError(f'branch {i} has {branch.num_layers} layers; its block_ranges '
                                 f'{branch.cfg.block_ranges} do not fit.')
        self.embed_dims = tuple(b.layer_widths[-1] for b in self.branches)
        self.num_prefix_tokens = tuple(b.prefix_count for b in self.branches)
        self.patch_size = self.branches[-1].layer_strides[-1]  # stride of the finest branch's final tokens

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
        # Each unit is built for the widths its two branches have after that step's layers.
        self.interactions = nn.ModuleList([
            nn.ModuleList([
                BidirectionalInteraction(
                    self.branches[u].range_width(step), self.branches[u + 1].range_width(step), **unit_kwargs)
                for u in range(len(branches) - 1)
            ])
            for step in range(num_interactions)
        ])

        out_dim = self.embed_dims[0]
        if merge is not None:
            make_merge = _merge_factory(merge, out_dim, **dd)
            self.merges = nn.ModuleList([make_merge(i, d) for i, d in enumerate(self.embed_dims)])
            self.branch_weights = nn.Parameter(torch.ones(len(branches), **dd))
        else:
            self.merges = self.branch_weights = None
        self.out_interactions = tuple(int(i) for i in out_interactions) if out_interactions is not None else None
        self.out_merges = self._make_out_merges(merge, **dd) if self.out_interactions is not None else None
        self.level_taps: List[Tuple[int, int]] = []  # (interaction step, branch) of each per-step level
        if pyramid:
            self.pyramid = SimpleFeaturePyramid(out_dim, pyramid, **dd)
            self.feature_info = [
                dict(num_chs=out_dim, reduction=int(self.patch_size / PYRAMID_SCALES[name]), module=f'pyramid.{name}')
                for name in pyramid
            ]
        elif self.out_interactions is not None:
            widths = [self.branches[0].range_width(i) for i in self.out_interactions] + [out_dim]
            strides = [self.branches[-1].range_stride(i) for i in self.out_interactions] + [self.patch_size]
            targets = OUTPUT_STRIDES[:len(strides)] if len(strides) <= len(OUTPUT_STRIDES) else None
            if targets is None:
                raise ValueError(f'at most {len(OUTPUT_STRIDES) - 1} out_interactions, got {self.out_interactions}.')
            self.pyramid = FeatureLevels([s / t for s, t in zip(strides, targets)], widths, **dd)
            self.feature_info = [dict(num_chs=w, reduction=t, module=f'pyramid.{j}')
                                 for j, (w, t) in enumerate(zip(widths, targets))]
        elif self.branch_levels:
            # Finest branch first: timm's feature levels go from the smallest stride to the largest.
            self.pyramid = None
            self.feature_info = [
                dict(num_chs=w, reduction=_input_stride(b.layer_strides[-1], r), module=f'branches.{i}')
                for i, w, b, r in reversed(list(zip(range(len(branches)), self.embed_dims, self.branches,
                                                    self.image_ratios)))
            ]
        else:
            # One level per interaction step: the finest branch's map after it or, for a model whose output
            # is every branch's map (no head, no merge), every branch's map after it. timm wants the levels
            # in non-decreasing reduction: sorted by it, then finest branch first, then by step.
            self.pyramid = None
            tapped = range(len(branches)) if self.branch_maps else [len(branches) - 1]

            def reduction(step: int, i: int) -> Union[int, float]:
                return _input_stride(self.branches[i].range_stride(step), self.image_ratios[i])
            self.level_taps = sorted(((k, i) for k in range(num_interactions) for i in tapped),
                                     key=lambda ki: (reduction(*ki), -ki[1], ki[0]))
            self.feature_info = [
                dict(num_chs=self.branches[i].range_width(k), reduction=reduction(k, i), module=f'interactions.{k}')
                for k, i in self.level_taps
            ]

        self.head_drop = nn.Dropout(drop_rate)
        if head == 'separate':
            self.num_features = self.head_hidden_size = sum(self.embed_dims)
            self.norm = None
        elif head == 'merged':
            self.num_features = self.head_hidden_size = out_dim
            self.norm = nn.LayerNorm(out_dim, eps=1e-6, **dd)
        elif head is None:
            # Branch maps may get a classifier on their pooled features (timm's num_classes); merged maps not.
            if num_classes and not self.branch_maps:
                raise ValueError(f'a model without head (head=None) needs num_classes=0, got {num_classes}.')
            self.num_features = self.head_hidden_size = sum(self.embed_dims) if self.branch_maps else out_dim
            self.norm = nn.Identity()
        else:
            raise ValueError(f"head must be 'separate', 'merged' or None, got {head!r}.")
        self.global_pool = self._check_pool(global_pool)
        self.head = self._make_head(num_classes, **dd)
        if not on_meta(device):
            self.init_weights()

    # ----------------------------------------------------------------- construction helpers
    @property
    def branch_cfgs(self) -> Tuple[BranchSpec, ...]:
        return tuple(b.cfg for b in self.branches)

    def _make_out_merges(self, merge: MergeStyle, **dd) -> nn.ModuleDict:
        """A merge after each of ``out_interactions``, at the widths the branches have there."""
        num_steps = len(self.interactions)
        if any(not 0 <= i < num_steps - 1 for i in self.out_interactions) or \
                list(self.out_interactions) != sorted(set(self.out_interactions)):
            raise ValueError(f'out_interactions must be increasing interaction indices below the last '
                             f'({num_steps - 1}), got {self.out_interactions}.')
        merges = nn.ModuleDict()
        for step in self.out_interactions:
            widths = [b.range_width(step) for b in self.branches]
            merges[str(step)] = BranchMerge(widths, _merge_factory(merge, widths[0], **dd), **dd)
        return merges

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
            own = branch.no_weight_decay() if hasattr(branch, 'no_weight_decay') else set()
            params = dict(branch.named_parameters())  # (BEiT names its per-block tables by their full path)
            names |= {f'branches.{i}.{n}' for n in own if n in params}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """Layer ids for layer-wise LR decay: embeddings 0, interaction step k (its layers and units) k+1,
        merge/pyramid/norms/heads last."""
        num_steps = len(self.interactions)
        step_of_layer = [
            {j: k for k, (start, end) in enumerate(b.cfg.block_ranges) for j in range(start, end + 1)}
            for b in self.branches
        ]

        def layer_id(name: str) -> int:
            parts = name.split('.', 2)
            if parts[0] == 'branches':
                index = int(parts[1])
                layer = self.branches[index].layer_of_parameter(parts[2])
                if layer is None:
                    return num_steps + 1
                return 0 if layer < 0 else step_of_layer[index].get(layer, num_steps - 1) + 1
            if parts[0] == 'interactions':
                return int(parts[1]) + 1
            return num_steps + 1

        return layer_id

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: Union[bool, str] = True) -> None:
        """Recompute activations in the backward instead of keeping them: ``True`` / ``'all'`` (branch layers
        and interaction units), ``'interactions'`` (only the units: the smaller saving, little recompute),
        ``'blocks'`` (only the branch layers), ``False`` (none). The benchmark's checkpointing section measures them."""
        modes = {True: 'all', False: False, 'all': 'all', 'interactions': 'interactions', 'blocks': 'blocks'}
        if not isinstance(enable, (bool, str)) or enable not in modes:
            raise ValueError(f"grad checkpointing must be True, False, 'all', 'interactions' or 'blocks', "
                             f"got {enable!r}.")
        self.grad_checkpointing = modes[enable]

    @torch.jit.ignore
    def compile_regions(self, regions: Literal['steps', 'layers'] = 'steps', **compile_kwargs: Any) -> None:
        """Regional compilation: ``torch.compile`` the repeated parts of the network instead of the whole
        forward as one graph; the embeddings, merges and heads around them stay eager.

        ``regions='steps'`` (default) compiles each interaction step (every branch's layers of the step and
        its interaction units, an ``InteractionStep``): one graph serves all steps of the same shapes, so it
        compiles in a fraction of the whole model's time and runs about as fast. ``'layers'`` compiles every
        branch layer and interaction unit on its own (``nn.Module.compile``): fewer, smaller graphs, the
        quickest to compile, slower to run (the glue between layers stays eager). The benchmark's compile
        section measures both against ``torch.compile(model)``.

        ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode``, ``backend``); ``dynamic`` defaults to False
        (one specialised graph per shape: faster than shape-generic code; pass ``dynamic=None`` when input
        sizes vary a lot). Parameter names and state dicts do not change; the checkpointing mode is an
        argument of the compiled step, so ``set_grad_checkpointing`` works before or after; pruning afterwards
        keeps the compiled steps that remain.
        """
        if regions not in ('steps', 'layers'):
            raise ValueError(f"regions must be 'steps' or 'layers', got {regions!r}.")
        if self._compiled_regions not in (None, regions):
            # Steps over compiled layers would nest one compiled region in another.
            raise ValueError(f"this model's {self._compiled_regions} are already compiled; compile_regions("
                             f"{regions!r}) needs a model that has not been (build a new one, or deepcopy "
                             f"before compiling).")
        self._compiled_regions = regions
        compile_kwargs.setdefault('dynamic', False)
        # One code object (InteractionStep.forward, timm's Block.forward) serves every region of its kind: a
        # graph per branch width or step layout, mode and batch size. Past dynamo's recompile limit (8) further
        # shapes would silently run eager.
        shapes = len(self.branches) * 2 * 4
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
        if regions == 'steps':
            steps = [InteractionStep(self.branches, step, units) for step, units in enumerate(self.interactions)]
            for step in steps:
                step.compile(**compile_kwargs)
            self._compiled_steps = steps
            return
        for branch in self.branches:
            for index in range(branch.num_layers):
                branch.layer(index).compile(**compile_kwargs)
        for units in self.interactions:
            for unit in units:
                unit.compile(**compile_kwargs)

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
        weight = next(self.branches[0].parameters())
        if not x.is_floating_point():
            raise TypeError(f'PIIP expects a floating-point (normalised) image batch, got {x.dtype}; '
                            'convert it with x.float() and normalise it.')
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f'the input is {x.dtype} but the model weights are {weight.dtype}; use x.to({weight.dtype}), '
                            f'model.to({x.dtype}) or torch.autocast.')
        if x.device != weight.device:
            raise ValueError(f'the input is on {x.device} but the model is on {weight.device}; move one with .to().')
        height, width = x.shape[-2:]
        state = transient = 0
        for i, (ratio, branch) in enumerate(zip(self.image_ratios, self.branches)):
            h = math.floor(height * ratio) if ratio < 1 else height
            w = math.floor(width * ratio) if ratio < 1 else width
            if h < branch.max_stride or w < branch.max_stride:
                min_side = math.ceil(branch.max_stride / min(ratio, 1.0))
                raise ValueError(
                    f'image {height}x{width} is too small: branch {i} sees it at {h}x{w}, less than its '
                    f'{branch.max_stride}px stride; use at least {min_side}x{min_side}.')
            tokens, largest = branch.activation_elements(h, w)
            state += tokens
            transient = max(transient, largest)
        # A lower bound of the peak: every branch's tokens stay alive while one layer holds its largest
        # transient, or while the pyramid's 4x level is upsampled.
        if isinstance(self.pyramid, SimpleFeaturePyramid) and 'up4' in self.pyramid.level_names:
            grid = (height // self.patch_size) * (width // self.patch_size)
            transient = max(transient, 20 * grid * self.embed_dims[0])
        check_fits(x.shape[0] * (state + transient) * x.element_size(), x.device,
                   f'a {x.shape[0]}x{x.shape[1]}x{height}x{width} batch')

    def image_pyramid(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The input at every branch's scale (bilinear, scale-factor based, as in the original)."""
        return [
            F.interpolate(x, scale_factor=r, mode='bilinear', align_corners=False) if r < 1 else x
            for r in self.image_ratios
        ]

    def forward_branches(
            self, x: torch.Tensor,
    ) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]], List[Grid]]:
        """Run all branches and interactions: per-branch patch tokens, prefix tokens and grids."""
        return self._forward_steps(x)[:3]

    def _forward_steps(
            self,
            x: torch.Tensor,
            tap_levels: Sequence[int] = (),
            last_step: Optional[int] = None,
    ) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]], List[Grid], List[torch.Tensor], List[torch.Tensor]]:
        """``forward_branches`` up to step ``last_step``, with the map of level ``j`` (``level_taps[j]``: one
        branch's (B, C, H, W) map after one step) for each ``j`` in ``tap_levels``, in that order, and the merges
        after ``out_interactions`` (if the model has them)."""
        self._check_input(x)
        tokens, prefixes, grids, merged = [], [], [], []
        taps = {}
        for branch, image in zip(self.branches, self.image_pyramid(x)):
            t, p, hw = branch.embed(image)
            tokens.append(t)
            prefixes.append(p)
            grids.append(hw)
        mode = self.grad_checkpointing if torch.is_grad_enabled() else False
        checkpoint_layers, checkpoint_units = mode in ('all', 'blocks'), mode in ('all', 'interactions')
        compiled = self._compiled_steps
        flags = (checkpoint_layers, checkpoint_units)
        for step, units in enumerate(self.interactions):
            if compiled is not None:
                # Prefix tokens come in as an expanded parameter (stride 0), a slice of the last step's sequence
                # or an inference tensor: copied to one layout (a few hundred elements) so that one graph serves
                # every step instead of a recompile on their strides.
                prefixes = [p if p is None else p.clone(memory_format=torch.contiguous_format) for p in prefixes]
                tokens, prefixes, grids = compiled[step](tokens, prefixes, grids, *flags)
            else:
                layers = [branch.step_layers(step) for branch in self.branches]
                tokens, prefixes, grids = run_interaction_step(
                    self.branches, layers, units, tokens, prefixes, grids, *flags)
            for level in tap_levels:
                tap_step, tapped = self.level_taps[level]
                if tap_step == step:
                    taps[level] = token_map(tokens[tapped], grids[tapped])
            if self.out_merges is not None and str(step) in self.out_merges:
                merged.append(self.out_merges[str(step)](tokens, grids))
            if step == last_step:
                break
        return tokens, prefixes, grids, [taps[level] for level in tap_levels], merged

    def merge_branches(self, tokens: Sequence[torch.Tensor], grids: Sequence[Grid]) -> torch.Tensor:
        """Weighted sum of the merged branch maps on the finest grid: (B, embed_dims[0], H, W)."""
        if self.merges is None:
            raise RuntimeError(
                'this PIIP model has no branch merge; build it with merge="conv" (or features_only=True).')
        return merge_branch_maps(self.merges, self.branch_weights, tokens, grids)

    def forward_merged(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The merged maps the dense outputs are made of (before the pyramid): the merges after
        ``out_interactions`` (if any), then the final merge."""
        tokens, _, grids, _, merged = self._forward_steps(x)
        return merged + [self.merge_branches(tokens, grids)]

    def _head_features(self, tokens, prefixes, grids) -> Union[torch.Tensor, List[torch.Tensor]]:
        if self.branch_maps:
            return [token_map(t, hw) for t, hw in zip(tokens, grids)]
        if self.head_style == 'separate':
            return [
                branch.norm(t if p is None else torch.cat((p, t), dim=1))
                for branch, t, p in zip(self.branches, tokens, prefixes)
            ]
        merged = self.merge_branches(tokens, grids)
        return self.norm(merged.flatten(2).transpose(1, 2))

    def forward_features(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Separate heads: per-branch normalised tokens (prefix + patches), like timm's CrossViT.
        Merged head: normalised tokens of the merged map, (B, H*W, C). No head and no merge (the
        PIIP-LLaVA towers): every branch's (B, C_i, H_i, W_i) map after the last interaction, coarsest
        first, without final norm or prefix tokens."""
        tokens, prefixes, grids = self.forward_branches(x)
        return self._head_features(tokens, prefixes, grids)

    def _pool_branch(self, x: torch.Tensor, num_prefix: int) -> torch.Tensor:
        if self.global_pool == 'first_patch':
            return x[:, num_prefix]
        if self.global_pool == 'token':
            return x[:, 0]
        return x[:, num_prefix:].mean(dim=1)

    def forward_head(self, x: Union[torch.Tensor, List[torch.Tensor]], pre_logits: bool = False) -> torch.Tensor:
        if self.branch_maps:  # each branch map averaged, concatenated
            if not self.global_pool:
                return x
            x = self.head_drop(torch.cat([m.mean(dim=(2, 3)) for m in x], dim=1))
            return x if pre_logits else self.head(x)
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

        With a pyramid (``features_only=True``, the detectors) the maps are its levels, made from the
        merged maps (``norm``/``stop_early`` change nothing). Without one they are branch maps after
        each interaction step (the finest branch's; every branch's for a model without head and merge);
        ``stop_early`` then stops after the last step asked for (the features returned are those of
        that step), and ``norm`` applies each level's branch's final norm (classifiers with separate
        heads have one). With ``feature_levels='branches'`` they are the branches' final maps, finest
        first (``forward_features`` gives them coarsest first; ``norm``/``stop_early`` change nothing).
        ``indices``: positions in ``feature_info`` (an int n: the last n).
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}.")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if isinstance(self.pyramid, SimpleFeaturePyramid):
            tokens, prefixes, grids = self.forward_branches(x)
            intermediates = self.pyramid(self.merge_branches(tokens, grids), take_indices)
        elif self.branch_levels:
            tokens, prefixes, grids = self.forward_branches(x)
            maps = self._head_features(tokens, prefixes, grids)
            intermediates = [maps[::-1][i] for i in take_indices]
        elif self.pyramid is not None:
            tokens, prefixes, grids, _, merged = self._forward_steps(x)
            intermediates = self.pyramid(merged + [self.merge_branches(tokens, grids)], take_indices)
        else:
            last_step = self._last_step(take_indices) if stop_early or intermediates_only else None
            tokens, prefixes, grids, intermediates, _ = self._forward_steps(x, take_indices, last_step)
            if norm:  # each level through the final norm of the branch it comes from
                norms = [self.branches[self.level_taps[j][1]].norm for j in take_indices]
                intermediates = [n(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for n, t in zip(norms, intermediates)]
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
        (with their layers). Pyramid levels all need every branch, so nothing else is pruned for them."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if self.pyramid is None and not self.branch_levels:
            kept = self._keep_steps(self._last_step(take_indices) + 1)
            take_indices = [kept.index(j) for j in take_indices]  # positions in the pruned feature_info
        if prune_head:
            self.reset_classifier(0, '')
        if prune_norm:
            if self.head_style == 'separate':
                for branch in self.branches:
                    branch.norm = nn.Identity()
            else:
                self.norm = nn.Identity()
        return take_indices

    def _last_step(self, levels: Sequence[int]) -> int:
        """The last interaction step any of these per-step levels needs."""
        return max(self.level_taps[j][0] for j in levels)

    def _keep_steps(self, num_steps: int) -> List[int]:
        """Keep the first ``num_steps`` interaction steps, the layers they run and their feature levels
        (returned: the indices, in the old ``feature_info``, of the levels kept).

        A branch cut inside its stages (a ConvNeXt) ends at another width: the final merge, and the norm
        and head on it, are then made anew for the widths the branches end at (freshly initialised).
        """
        self.interactions = self.interactions[:num_steps]
        if self._compiled_steps is not None:
            self._compiled_steps = self._compiled_steps[:num_steps]
        kept = [j for j, (k, _) in enumerate(self.level_taps) if k < num_steps]
        self.feature_info = [self.feature_info[j] for j in kept]
        self.level_taps = [self.level_taps[j] for j in kept]
        for branch in self.branches:
            branch.keep_layers(branch.cfg.block_ranges[num_steps - 1][1] + 1)
        widths = tuple(b.layer_widths[-1] for b in self.branches)
        if widths == self.embed_dims:
            return kept
        self.embed_dims = widths
        reference = next(self.parameters())
        dd = dict(device=reference.device, dtype=reference.dtype)
        rebuilt = []
        if self.merges is not None:
            make_merge = _merge_factory(self.merge_style, widths[0], **dd)
            self.merges = nn.ModuleList([make_merge(i, d) for i, d in enumerate(widths)])
            rebuilt.append(self.merges)
        if self.head_style == 'merged':
            self.norm = nn.LayerNorm(widths[0], eps=1e-6, **dd)
            rebuilt.append(self.norm)
        self.num_features = self.head_hidden_size = (
            sum(widths) if self.head_style == 'separate' or self.branch_maps else widths[0])
        if not reference.is_meta:
            for module in rebuilt:
                module.apply(_init_neck_weights)
        self.reset_classifier(self.num_classes)
        return kept


def _input_stride(stride: int, image_ratio: float) -> Union[int, float]:
    """Input pixels per token of a branch whose image is the input scaled by ``image_ratio``."""
    reduction = stride / min(image_ratio, 1.0)
    return int(reduction) if float(reduction).is_integer() else reduction


def _is_fx_symbolic_tracing() -> bool:
    """True inside torch.fx.symbolic_trace (older torch only has the broader ``is_fx_tracing``)."""
    check = getattr(_symbolic_trace, 'is_fx_symbolic_tracing', None) or _symbolic_trace.is_fx_tracing
    return check()


# Names this module held before variants, tags and checkpoint conversion moved to their own modules.
_MOVED = {
    'variants': ('VARIANTS', 'PRETRAINED', 'PIIP_REPO', 'VariantCfg', 'PretrainedTag', 'ALL_LEVELS', 'VIT_SIZES',
                 'vit_branch', 'tsb_detector', 'sbl_detector', 'tsbl_detector', 'customize_branches', 'model_args',
                 'entry_point_name'),
    'convert': ('checkpoint_filter_fn', 'adapt_branch_weights'),
}


def __getattr__(name: str) -> Any:
    for module, names in _MOVED.items():
        if name in names:
            import importlib
            import warnings
            warnings.warn(f'piip_timm.piip.{name} moved to piip_timm.{module}.{name}; import it from there.',
                          DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(f'.{module}', __package__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
