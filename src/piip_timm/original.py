"""Build a PIIP model from a config of the original code, and load its checkpoints.

``from_original(config, task)`` takes ``model['backbone']`` of an original config file
(``classification/configs/*.py`` for ``task='cls'``; ``mmdetection/configs/piip/**`` minus
``type`` for ``task='det'``; ``mmsegmentation/configs/piip/**`` for ``task='seg'``) and honours the
original code's semantics, quirks included:
the defaults of each original class, the branch class chosen from the ``pretrained``
string in detection configs (the string is never opened; a ConvNeXt's architecture comes from
the real model's name or from ``pretrained_configs``), and ``piip_4branch.py`` building its fourth
detection branch from branch3's settings.
"""
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from timm.models._features import FeatureGetterNet
from torch import nn

from .convert import to_package_layout
from .beit_branch import BeitBranchCfg
from .convnext_branch import CONVNEXT_SIZES, ConvNeXtBranchCfg, convnext_layer_strides
from .piip import PIIP, BranchCfg, InteractionCfg
from .uniperceiver_branch import UniPerceiverBranchCfg
from .weights import load_checkpoint_file, load_strict

__all__ = ['from_original', 'translate_original_config']

_IGNORED_BRANCH_KEYS = {
    'pretrained', 'with_cp', 'use_flash_attn', 'drop_rate', 'attn_drop_rate', 'qk_scale', 'layerscale_force_fp32',
    'cal_flops', 'output_dtype', 'out_indices', 'use_simple_fpn', 'pretrain_patch_size', 'in_chans',
}


@dataclass
class _Options:
    """The original constructors' keyword defaults, popped one by one so leftovers can be reported."""
    values: Dict[str, Any]
    where: str

    def pop(self, key: str, default: Any = None) -> Any:
        return self.values.pop(key, default)

    def finish(self, ignore_unknown: bool = False) -> None:
        leftover = sorted(k for k in self.values if k not in _IGNORED_BRANCH_KEYS)
        if leftover and not ignore_unknown:
            raise ValueError(f'{self.where}: unsupported or unknown keys {leftover}.')


def _ranges(indexes: Any, where: str) -> Tuple[Tuple[int, int], ...]:
    if indexes is None:
        raise ValueError(f'{where}: interaction_indexes is required.')
    return tuple((int(r[0]), int(r[-1])) for r in indexes)


def _windows(window_attn: Any, window_size: Any, depth: int, exact_true: bool) -> Tuple[Optional[int], ...]:
    """Per-block window sizes from the original's window_attn / window_size (bools and ints or lists).

    ``exact_true``: deit.py windows a block only if its flag ``is True``; InternViT takes any truthy flag.
    """
    attn = list(window_attn) if isinstance(window_attn, (list, tuple)) else [bool(window_attn)] * depth
    size = list(window_size) if isinstance(window_size, (list, tuple)) else [window_size] * depth
    if len(attn) != depth or len(size) != depth:
        raise ValueError(f'window_attn/window_size need {depth} entries, got {len(attn)} and {len(size)}.')
    on = [(a is True) if exact_true else bool(a) for a in attn]
    return tuple(int(s) if a and s and s > 0 else None for a, s in zip(on, size))


def _mlp_act(block_option: Any) -> str:
    # flash_attn's FusedMLP ('fused_mlp') uses the tanh approximation of GELU.
    return 'gelu_tanh' if block_option == 'fused_mlp' else 'gelu'


def _deit_branch(config: Mapping[str, Any], where: str, task: str) -> BranchCfg:
    """``vit_models`` (deit.py): LayerScale blocks, pos_embed without class slot."""
    o = _Options(dict(config), where)
    ranges = _ranges(o.pop('interaction_indexes'), where)
    patch_size = o.pop('patch_size', 16)
    depth = o.pop('depth', 12)
    if task == 'cls':
        img_size = o.pop('img_size', 224)
        grid = img_size // patch_size
        class_token = o.pop('use_cls_token', True)
        o.pop('num_classes', None)
        o.pop('use_final_norm_and_head', None)
        o.pop('pretrain_img_size', None)
    else:
        img_size = o.pop('real_size')
        grid = o.pop('pretrain_img_size', 224) // patch_size
        class_token = o.pop('use_cls_token', False)
        if class_token:
            raise ValueError(f'{where}: use_cls_token=True is not supported for detection branches.')
        if o.pop('with_fpn', False):
            raise ValueError(f'{where}: with_fpn=True (a per-branch FPN) is not supported.')
    init_scale = o.pop('init_scale', 1e-4)
    if not init_scale:
        raise ValueError(f'{where}: init_scale must be non-zero.')
    windows = _windows(o.pop('window_attn', None) or [False] * depth,
                       o.pop('window_size', None) or [-1] * depth, depth, exact_true=True)
    use_flash = o.values.get('use_flash_attn', False)
    cfg = BranchCfg(
        img_size=img_size,
        embed_dim=o.pop('embed_dim', 768),
        depth=depth,
        num_heads=o.pop('num_heads', 12),
        block_ranges=ranges,
        mlp_ratio=o.pop('mlp_ratio', 4.0),
        patch_size=patch_size,
        qkv_bias=o.pop('qkv_bias', False),
        init_values=init_scale,
        class_token=class_token,
        pos_embed_grid=grid,
        mlp_act=_mlp_act(o.pop('Mlp_block', None)),
        window_size=windows,
        # The original pads windows' q/k/v with zeros, but its flash-attention path pads the tokens.
        window_padding='tokens' if use_flash else 'qkv',
        drop_path_rate=o.pop('drop_path_rate', 0.0),
        drop_path_schedule='constant',
    )
    o.finish()
    return cfg


def _internvit_branch(config: Mapping[str, Any], where: str, task: str) -> BranchCfg:
    """``InternViT6B`` (intern_vit_6b.py / internvit_6b.py): also used for AugReg and MAE weights."""
    o = _Options(dict(config), where)
    ranges = _ranges(o.pop('interaction_indexes'), where)
    depth = o.pop('depth', 48)
    if task == 'cls':
        patch_size = o.pop('patch_size', 16)
        img_size = o.pop('img_size', 224)
        grid = img_size // patch_size
        class_token = o.pop('use_cls_token', True)
        o.pop('num_classes', None)
        o.pop('pretrain_img_size', None)
        init_values = o.pop('init_values', None)
        qk_norm = o.pop('qk_normalization', False)
        norm_type = o.pop('norm_layer_type', 'ln')
        schedule = 'constant'
    else:
        patch_size = o.pop('patch_size', 14)
        img_size = o.pop('real_size')
        if task == 'seg':
            # mmseg builds pos_embed at the branch's img_size and adds it unresized; pretrain_img_size
            # only matters when the original loads a pretrained file.
            o.pop('pretrain_img_size', None)
            grid = o.pop('img_size', 224) // patch_size
        else:
            grid = o.pop('pretrain_img_size', 224) // patch_size
        class_token = False
        init_values = o.pop('init_values', 0.1)
        qk_norm = o.pop('qk_normalization', True)
        norm_type = o.pop('norm_layer_type', 'RMSNorm')
        schedule = 'linear'
        if o.pop('with_fpn', False):
            raise ValueError(f'{where}: with_fpn=True (a per-branch FPN) is not supported.')
    windows = _windows(o.pop('window_attn', False), o.pop('window_size', 14), depth, exact_true=False)
    mlp_type = o.pop('mlp_type', 'regular')
    if mlp_type not in ('regular', 'fused_mlp'):
        raise ValueError(f'{where}: unknown mlp_type {mlp_type!r}.')
    cfg = BranchCfg(
        img_size=img_size,
        embed_dim=o.pop('embed_dim', 3200),
        depth=depth,
        num_heads=o.pop('num_heads', 25),
        block_ranges=ranges,
        mlp_ratio=o.pop('mlp_ratio', 4.0),
        patch_size=patch_size,
        qkv_bias=o.pop('qkv_bias', False),
        init_values=init_values or None,
        class_token=class_token,
        pos_embed_class_slot=True,
        pos_embed_grid=grid,
        norm='rmsnorm' if norm_type == 'RMSNorm' else 'layernorm',
        qk_norm=qk_norm,
        mlp_act=_mlp_act(mlp_type),
        window_size=windows,
        window_padding='tokens',
        drop_path_rate=o.pop('drop_path_rate', 0.0),
        drop_path_schedule=schedule,
    )
    # The mmdet/mmseg InternViT6B swallows unknown keyword arguments (**kwargs); the classification one does not.
    o.finish(ignore_unknown=task != 'cls')
    return cfg


def _base_sized_fields(o: _Options, where: str) -> Dict[str, Any]:
    """Fields that mmdet's beit.py and uniperceiver.py read alike (both default to a ViT-B, linear drop path)."""
    return dict(
        img_size=o.pop('real_size'),
        embed_dim=o.pop('embed_dim', 768),
        depth=o.pop('depth', 12),
        num_heads=o.pop('num_heads', 12),
        block_ranges=_ranges(o.pop('interaction_indexes'), where),
        mlp_ratio=o.pop('mlp_ratio', 4.0),
        drop_path_rate=o.pop('drop_path_rate', 0.0),
        drop_path_schedule='linear',
    )


def _beit_branch(config: Mapping[str, Any], where: str) -> BeitBranchCfg:
    """``BEiT`` (mmdet beit.py, BEiTv2 weights): per-block window tables, no absolute pos-embed."""
    o = _Options(dict(config), where)
    fields = _base_sized_fields(o, where)
    if o.pop('use_abs_pos_emb', False):
        raise ValueError(f'{where}: use_abs_pos_emb=True is not supported for BEiT branches (no released config uses it).')
    if o.pop('use_shared_rel_pos_bias', False):
        raise ValueError(f'{where}: use_shared_rel_pos_bias=True is not supported; every block owns its table.')
    if o.pop('with_fpn', False):
        raise ValueError(f'{where}: with_fpn=True (a per-branch FPN) is not supported.')
    o.pop('use_rel_pos_bias', None)  # accepted and unused by the original: every block has a table
    for unused in ('pretrain_img_size', 'use_checkpoint', 'num_classes'):
        o.pop(unused, None)
    windows = _windows(o.pop('window_attn', False), o.pop('window_size', 14), fields['depth'], exact_true=False)
    if not all(windows):
        raise ValueError(f'{where}: every BEiT block needs window_attn (a global block with a window-sized '
                         f'table only runs on a grid of exactly that window); got windows {list(windows)}.')
    cfg = BeitBranchCfg(
        **fields,
        patch_size=o.pop('patch_size', 16),
        qkv_bias=o.pop('qkv_bias', False),
        init_values=o.pop('init_values', None),
        window_size=windows,
    )
    o.finish()
    return cfg


def _uniperceiver_branch(config: Mapping[str, Any], where: str) -> UniPerceiverBranchCfg:
    """``UnifiedBertEncoder`` (mmdet uniperceiver.py) as a timm ViT (see uniperceiver_branch.py)."""
    o = _Options(dict(config), where)
    fields = _base_sized_fields(o, where)
    patch_size = o.pop('patch_size', 16)
    if patch_size != 16:
        raise ValueError(f'{where}: Uni-Perceiver branches need patch_size 16 (the original hard-codes its grid '
                         f'as H // 16), got {patch_size}.')
    cfg = UniPerceiverBranchCfg(
        **fields,
        patch_size=patch_size,
        pos_embed_grid=o.pop('pretrain_img_size', 224) // 16,
        window_size=_windows(o.pop('window_attn', False), o.pop('window_size', 14), fields['depth'], exact_true=False),
        window_padding='tokens',
    )
    o.finish()
    return cfg


# transformers ConvNextModel repositories the original names in ``pretrained``: (hidden_sizes, depths).
KNOWN_CONVNEXT = {
    f'facebook/convnext-{name}-{res}': (CONVNEXT_SIZES[size][0], CONVNEXT_SIZES[size][1])
    for name, size in (('tiny', 'T'), ('small', 'S'), ('base', 'B'), ('large', 'L'))
    for res in ('224', '224-22k', '224-22k-1k', '384', '384-22k-1k')
}
# ConvNextConfig fields a pretrained_configs entry may carry, and the values this package can build.
_CONVNEXT_FIXED = {'num_channels': 3, 'patch_size': 4, 'num_stages': 4, 'hidden_act': 'gelu'}
_CONVNEXT_FREE = {'hidden_sizes', 'depths', 'layer_scale_init_value', 'layer_norm_eps', 'image_size',
                  'drop_path_rate'}


def _convnext_architecture(name: str, pretrained_configs: Mapping[str, Any], where: str) -> Tuple[tuple, tuple, float]:
    """(hidden_sizes, depths, layer-scale init) of the transformers ConvNextModel the original loads by name."""
    if name in pretrained_configs:
        config = dict(pretrained_configs[name])
        unknown = sorted(set(config) - _CONVNEXT_FREE - set(_CONVNEXT_FIXED))
        if unknown:
            raise ValueError(f'{where}: pretrained_configs[{name!r}] has unsupported keys {unknown}.')
        for key, value in _CONVNEXT_FIXED.items():
            if config.get(key, value) != value:
                raise ValueError(f'{where}: pretrained_configs[{name!r}] needs {key}={value!r}, got {config[key]!r}.')
        if 'hidden_sizes' not in config or 'depths' not in config:
            raise ValueError(f'{where}: pretrained_configs[{name!r}] needs hidden_sizes and depths.')
        dims, depths = tuple(config['hidden_sizes']), tuple(config['depths'])
        if len(dims) != 4 or len(depths) != 4:
            raise ValueError(f'{where}: pretrained_configs[{name!r}] needs 4 hidden_sizes and 4 depths.')
        return dims, depths, float(config.get('layer_scale_init_value', 1e-6))
    if name in KNOWN_CONVNEXT:
        dims, depths = KNOWN_CONVNEXT[name]
        return dims, depths, 1e-6
    raise ValueError(f'{where}: the architecture of {name!r} is unknown; pass '
                     f"pretrained_configs={{{name!r}: {{'hidden_sizes': [...], 'depths': [...]}}}}.")


def _convnext_branch(config: Mapping[str, Any], where: str, pretrained_configs: Mapping[str, Any]) -> ConvNeXtBranchCfg:
    """``ConvNextHFWrapper`` (convnext_hf_wrapper.py): a transformers ConvNextModel named by ``pretrained``."""
    o = _Options(dict(config), where)
    ranges = _ranges(o.pop('interaction_indexes'), where)
    dims, depths, ls_init = _convnext_architecture(o.pop('pretrained'), pretrained_configs, where)
    strides = convnext_layer_strides(depths)
    ratios = o.pop('downsample_ratios')
    if ratios is None or tuple(ratios) != strides:
        raise ValueError(f'{where}: downsample_ratios must give the stride after each of the {len(strides)} '
                         f'counted layers, {list(strides)}; got {ratios}.')
    if ranges[-1][1] >= len(strides):
        raise ValueError(f'{where}: interaction_indexes reach layer {ranges[-1][1]}; the branch has {len(strides)}.')
    cfg = ConvNeXtBranchCfg(
        img_size=o.pop('real_size'), dims=dims, depths=depths, block_ranges=ranges, ls_init_value=ls_init,
        drop_path_rate=o.pop('drop_path_rate', None) or 0.0,
        head_norm=True,  # the transformers model's final LayerNorm: in the state dict, never run
    )
    o.finish()
    return cfg


def _branch_configs(config: Mapping[str, Any], task: str, pretrained_configs: Mapping[str, Any]) -> List[Union[BranchCfg, ConvNeXtBranchCfg]]:
    names = [f'branch{i}' for i in range(1, 5) if f'branch{i}' in config]
    if names != [f'branch{i}' for i in range(1, len(names) + 1)] or len(names) < 2:
        raise ValueError(f'the config needs branch1..branchN (N = 2, 3 or 4), got {names}.')
    branches = []
    for n, name in enumerate(names, start=1):
        branch = dict(config[name])
        if task == 'cls':
            model_type = branch.pop('model_type', 'deit')
            if model_type == 'deit':
                branches.append(_deit_branch(branch, name, task))
            elif model_type == 'augreg':
                branches.append(_internvit_branch(branch, name, task))
            else:
                raise ValueError(f"{name}: model_type {model_type!r} is not 'deit' or 'augreg'.")
            continue
        branch.pop(f'branch{n}_w_cls_token', None)
        if len(names) == 4:
            # piip_4branch.py builds every branch as vit_models and branch4 as vit_models(**branch3):
            # only branch4's real_size and interaction_indexes are its own.
            if n == 4:
                source = dict(config['branch3'])
                source.pop('branch3_w_cls_token', None)
                source['real_size'] = branch['real_size']
                source['interaction_indexes'] = branch['interaction_indexes']
                branch = source
            branches.append(_deit_branch(branch, name, task))
            continue
        if task == 'seg':
            if len(names) != 2:
                raise ValueError(f'task "seg" is the mmseg PIIPTwoBranch: it needs 2 branches, got {len(names)}.')
            if 'deit' in str(branch.get('pretrained')):
                raise ValueError(f'{name}: DeiT branches of the mmseg backbone are not supported (no released '
                                 'config uses them); only InternViT6B-class branches are.')
            branches.append(_internvit_branch(branch, name, task))  # mmseg knows no other branch class
            continue
        pretrained = branch.get('pretrained')
        if not isinstance(pretrained, str):
            raise ValueError(f'{name}: detection configs choose the branch class from the "pretrained" string; '
                             f'got {pretrained!r}.')
        # The original's order of tests on the pretrained string.
        if 'deit' in pretrained:
            branches.append(_deit_branch(branch, name, task))
        elif 'beit' in pretrained:
            branches.append(_beit_branch(branch, name))
        elif 'perceiver' in pretrained:
            branches.append(_uniperceiver_branch(branch, name))
        elif 'convnext' in pretrained:
            if len(names) != 3:
                raise ValueError(f'{name}: ConvNeXt branches exist only in the three-branch original (PIIPThreeBranch).')
            branches.append(_convnext_branch(branch, name, pretrained_configs))
        else:
            branches.append(_internvit_branch(branch, name, task))
    return branches


def translate_original_config(
        config: Mapping[str, Any],
        task: str,
        pretrained_configs: Optional[Mapping[str, Any]] = None,
) -> Tuple[Dict[str, Any], Optional[List[int]]]:
    """PIIP constructor kwargs for an original backbone config, and the pyramid levels the
    original detector returns (None for classifiers).

    ``pretrained_configs``: ``{name: {'hidden_sizes': [...], 'depths': [...]}}`` for ConvNeXt branches whose
    ``pretrained`` name is not one of the real ``facebook/convnext-*`` models.
    """
    if task not in ('cls', 'det', 'seg'):
        raise ValueError(f"task must be 'cls', 'det' or 'seg', got {task!r}.")
    o = _Options({k: v for k, v in config.items() if k not in ('type', '_delete_')}, 'backbone config')
    branches = _branch_configs(config, task, pretrained_configs or {})
    for name in [k for k in o.values if k.startswith('branch')]:
        o.pop(name)
    attn_type = o.pop('interact_attn_type', 'normal')
    if attn_type != 'deform':
        raise ValueError(f"interact_attn_type={attn_type!r} is not supported; only 'deform' is.")
    norm_layer = o.pop('norm_layer', 'layernorm')
    interaction = InteractionCfg(
        num_heads=o.pop('deform_num_heads', 6),
        num_points=o.pop('n_points', 4),
        value_ratio=o.pop('deform_ratio', 1.0),
        with_ffn=o.pop('with_cffn', False),
        ffn_ratio=o.pop('cffn_ratio', 0.25),
        drop_path=o.pop('interaction_drop_path_rate', 0.3),
        project=o.pop('interaction_proj', True),
        norm=norm_layer != 'none',
    )
    kwargs: Dict[str, Any] = dict(branches=branches, interaction=interaction)
    returned = None
    if task == 'cls':
        separate = o.pop('separate_head', False)
        num_classes = o.pop('num_classes', 1000)
        if separate:
            branch_classes = {dict(config[f'branch{i + 1}']).get('num_classes', 1000) for i in range(len(branches))}
            if len(branch_classes) != 1:
                raise ValueError(f'separate heads need one num_classes in every branch, got {branch_classes}.')
            kwargs.update(head='separate', num_classes=branch_classes.pop(), global_pool='first_patch')
            o.pop('use_cls_head', None)
        else:
            if not o.pop('use_cls_head', True):
                raise ValueError('use_cls_head=False (a merged map without head) is not supported for task="cls".')
            kwargs.update(head='merged', merge='linear', num_classes=num_classes, global_pool='avg')
    else:
        # mmseg's PIIPTwoBranch has no is_dino or with_simple_fpn (unknown keys there) and returns four maps.
        is_dino = o.pop('is_dino', False) if task == 'det' else False
        simple_fpn = o.pop('with_simple_fpn', True) if task == 'det' else True
        out_interactions = o.pop('out_interaction_indexes', None)
        o.pop('pretrained', None)
        o.pop('cal_flops', None)
        if not simple_fpn:
            # piip_3branch's regular-FPN outputs: merges after three interactions and at the end.
            if len(branches) != 3:
                raise ValueError('with_simple_fpn=False exists only in the three-branch original (PIIPThreeBranch).')
            if is_dino:
                raise ValueError('is_dino=True with with_simple_fpn=False is not supported.')
            if out_interactions is None or len(out_interactions) != 3:
                raise ValueError(f'with_simple_fpn=False needs three out_interaction_indexes, got {out_interactions}.')
            kwargs.update(head=None, merge='single_conv', out_interactions=tuple(int(i) for i in out_interactions),
                          num_classes=0)
            returned = [0, 1, 2, 3]
        elif isinstance(branches[-1], ConvNeXtBranchCfg):
            raise ValueError('with_simple_fpn=True needs a ViT as branch3 (the original asserts it); '
                             'a ConvNeXt branch3 takes with_simple_fpn=False.')
        else:
            if is_dino and len(branches) != 3:
                levels = ['up2', 'same', 'down2']  # piip_2branch/4branch build no fpn1 for DINO
            else:
                levels = ['up4', 'up2', 'same', 'down2']  # piip_3branch builds fpn1 even for DINO
            returned = [levels.index(name) for name in (['up2', 'same', 'down2'] if is_dino else levels)]
            kwargs.update(head=None, merge='conv', pyramid=levels, num_classes=0)
    o.finish()
    return kwargs, returned


def from_original(
        config: Mapping[str, Any],
        task: str,
        checkpoint: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
        pretrained_configs: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """A model equivalent to the original PIIP backbone built from ``config``.

    Args:
        config: ``model['backbone']`` of an original config file (``type`` may be left in).
        task: ``'cls'``: the module's forward returns logits; ``'det'`` / ``'seg'``: it returns the list
            of feature maps the mmdet / mmseg backbone returns; ``'llava_vision_tower'``: ``config`` is a
            PIIP-LLaVA ``model['backbone']``, the forward returns the two branch maps; ``'llava_projector'``:
            ``config`` is ``{'config': model['projector'], 'out_dim': LLM width}``, the forward maps the two maps
            to image tokens (see ``piip_timm.llava``).
        checkpoint: optional weights in the original layout (or this package's): a state dict, or a path to a ``.pth``/``.bin``
            (loaded with ``weights_only=True``) or ``.safetensors`` file; ``model``/``state_dict``/``module``
            wrappers and mmdet's ``backbone.`` prefix are accepted. Loading is strict.
        pretrained_configs: architectures of ConvNeXt branches named in ``pretrained`` other than the real
            ``facebook/convnext-*`` models: ``{name: {'hidden_sizes': [...], 'depths': [...]}}`` (the original
            loads the architecture with the weights, so the config does not hold it).
    """
    if task in ('llava_vision_tower', 'llava_projector'):
        from .llava import from_original_llava
        return from_original_llava(config, task, checkpoint, pretrained_configs)
    kwargs, returned = translate_original_config(config, task, pretrained_configs)
    model = PIIP(**kwargs)
    if checkpoint is not None:
        state = load_checkpoint_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
        load_strict(model, to_package_layout(state))
    if task in ('det', 'seg'):
        return FeatureGetterNet(model, out_indices=returned, prune=False)
    return model
