"""State-dict conversion: the original PIIP code's layout to this package's, and the filter function
that turns any PIIP checkpoint into a complete state dict for a model.

The original names branches ``branch1..branch4`` and interaction units
``interaction_units_12/23/34``; this package has ``branches.{i}`` (timm ViT keys),
``interactions.{step}.{pair}``, ``merges.{i}``, ``branch_weights``, ``pyramid`` and
``head``. ConvNeXt branches (``branchK.convnext_model.*``, transformers ``ConvNextModel`` names)
get timm's ``convnext_*`` names, Uni-Perceiver branches (``visual_embed.*``, ``layers.*``) timm ViT
names, and BEiT branches keep timm Beit's names (their ``relative_position_index`` buffers are checked
and dropped); each kind of branch recognises its own keys (``branch_kinds.ORIGINAL_LAYOUTS``). The
regular-FPN detectors' merges after interaction ``i`` (``intermediate_merging_{i}_*``) become
``out_merges.{i}`` and their ``fpn{k}`` ``pyramid.{k-1}``. The mapping depends only on the keys (and,
for merges, on which keys exist), so it runs without building a model.
"""
import re
from typing import Any, Dict, Mapping, MutableMapping, Optional

import torch

from .branch_kinds import ORIGINAL_LAYOUTS
from .weights import complete_state_dict

__all__ = ['convert_original_state_dict', 'unwrap_state_dict', 'is_original_layout', 'to_package_layout',
           'checkpoint_filter_fn', 'adapt_branch_weights']

_BRANCH = re.compile(r'^branch(\d)\.(.+)$')
_UNIT = re.compile(r'^interactions\.(\d+)\.interaction_units_(\d)(\d)\.(.+)$')
_MERGE = re.compile(r'^merge_branch(\d)\.(.+)$')
_BRANCH_WEIGHT = re.compile(r'^w(\d)$')
_OUT_MERGE = re.compile(r'^intermediate_merging_(\d+)_branch(\d)\.(.+)$')
_OUT_MERGE_WEIGHT = re.compile(r'^intermediate_merging_(\d+)_w(\d)$')
_REGULAR_FPN_LEVEL = re.compile(r'^fpn(\d)\.(.+)$')

_UNIT_RENAMES = (
    ('branch2to1_proj.', 'fine_to_coarse_proj.'),
    ('branch1to2_proj.', 'coarse_to_fine_proj.'),
    ('branch2to1_injector.', 'fine_to_coarse.'),
    ('branch1to2_injector.', 'coarse_to_fine.'),
)
_INJECTOR_RENAMES = (
    ('.ca_gamma', '.attn_gamma'),
    ('.cffn_gamma', '.ffn_gamma'),
    ('.ffn.dwconv.dwconv.', '.ffn.dwconv.'),
)
_LINEAR_MERGE = {'0': 'norm_in', '2': 'proj', '4': 'norm_out'}
_CONV_MERGE = {'0': 'conv1', '1': 'norm1', '3': 'conv2', '4': 'norm2'}
# Regular-FPN merges: GroupNorm-ReLU on the coarsest branch, conv-GroupNorm-ReLU on the others.
_SINGLE_CONV_MERGE = ({'0': 'norm'}, {'0': 'conv', '1': 'norm'})
_TOP_LEVEL = {
    'cls_norm.weight': 'norm.weight',
    'cls_norm.bias': 'norm.bias',
    'cls_head.weight': 'head.weight',
    'cls_head.bias': 'head.bias',
    'fpn1.0.weight': 'pyramid.up4.0.weight',
    'fpn1.0.bias': 'pyramid.up4.0.bias',
    'fpn1.1.weight': 'pyramid.up4.1.weight',
    'fpn1.1.bias': 'pyramid.up4.1.bias',
    'fpn1.3.weight': 'pyramid.up4.3.weight',
    'fpn1.3.bias': 'pyramid.up4.3.bias',
    'fpn2.0.weight': 'pyramid.up2.0.weight',
    'fpn2.0.bias': 'pyramid.up2.0.bias',
}


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Take the tensors out of a training checkpoint.

    Accepts a bare state dict or one wrapped in ``model``/``state_dict``/``module`` (as saved by
    DeiT/mmcv/DeepSpeed), and drops mmdet's ``backbone.`` prefix; other detector parts (neck, heads)
    are left out only when the checkpoint has a ``backbone.`` part.
    """
    state = checkpoint
    for wrapper in ('model', 'state_dict', 'module'):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ValueError(f'expected a state dict (a mapping of names to tensors), got {type(state).__name__}.')
    if any(k.startswith('backbone.') for k in state):
        state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f'these checkpoint entries are not tensors: {not_tensors[:5]}; pass a state dict.')
    return dict(state)


def is_original_layout(state_dict: Mapping[str, Any]) -> bool:
    """True for the original PIIP code's key layout (``branch1.*``)."""
    return any(_BRANCH.match(k) for k in state_dict)


def to_package_layout(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Unwrap a checkpoint and convert it if it is in the original layout; this package's passes as is."""
    state_dict = unwrap_state_dict(checkpoint)
    return convert_original_state_dict(state_dict) if is_original_layout(state_dict) else state_dict


def _branch_keys(index: int, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """One original branch's tensors (keys after ``branchK.``) -> this package's keys: a ViT branch's
    classifier becomes one of the separate heads; the rest is converted by the kind of branch whose
    layout the keys have."""
    out = {f'head.{index}.{k[len("head."):]}': v for k, v in state.items() if k.startswith('head.')}
    body = {k: v for k, v in state.items() if not k.startswith('head.')}
    converted = next(c for c in (kind.original_state(body) for kind in ORIGINAL_LAYOUTS) if c is not None)
    out.update({f'branches.{index}.{k}': v for k, v in converted.items()})
    return out


def _unit_key(step: str, coarse: int, fine: int, rest: str) -> str:
    if fine != coarse + 1:
        raise ValueError(f'interaction unit {coarse}{fine} does not join adjacent branches.')
    for old, new in _UNIT_RENAMES:
        if rest.startswith(old):
            rest = new + rest[len(old):]
            break
    else:
        raise ValueError(f'unknown interaction-unit parameter {rest!r}.')
    rest = '.' + rest
    for old, new in _INJECTOR_RENAMES:
        rest = rest.replace(old, new)
    return f'interactions.{step}.{coarse - 1}{rest}'


def convert_original_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map an original-layout PIIP state dict (classification or mmdet backbone) to this package's layout.

    Raises ValueError naming any key the original code would not have produced.
    """
    state_dict = unwrap_state_dict(state_dict)
    regular_fpn = any(_OUT_MERGE.match(k) for k in state_dict)
    conv_merge = any(re.match(r'^merge_branch\d\.(1|3)\.', k) for k in state_dict)
    out: MutableMapping[str, torch.Tensor] = {}
    branch_states: Dict[int, Dict[str, torch.Tensor]] = {}  # branch index -> its tensors, original names
    weights: Dict[str, Dict[int, torch.Tensor]] = {}  # stacked weight name -> branch number -> scalar
    unknown = []

    def merge_key(prefix: str, index: int, rest: str) -> Optional[str]:
        if regular_fpn:
            names = _SINGLE_CONV_MERGE[min(index, 1)]
        elif conv_merge:
            names = _CONV_MERGE
        else:
            names = _LINEAR_MERGE
            if rest in ('weight', 'bias'):  # the target branch's linear merge is a bare GroupNorm
                return f'{prefix}.{index}.norm_in.{rest}'
        layer, _, param = rest.partition('.')
        return f'{prefix}.{index}.{names[layer]}.{param}' if layer in names else None

    for key, value in state_dict.items():
        if m := _BRANCH.match(key):
            branch_states.setdefault(int(m.group(1)) - 1, {})[m.group(2)] = value
        elif m := _UNIT.match(key):
            out[_unit_key(m.group(1), int(m.group(2)), int(m.group(3)), m.group(4))] = value
        elif (m := _MERGE.match(key)) and (new := merge_key('merges', int(m.group(1)) - 1, m.group(2))):
            out[new] = value
        elif (m := _OUT_MERGE.match(key)) and (
                new := merge_key(f'out_merges.{m.group(1)}.merges', int(m.group(2)) - 1, m.group(3))):
            out[new] = value
        elif m := _BRANCH_WEIGHT.match(key):
            weights.setdefault('branch_weights', {})[int(m.group(1))] = value
        elif m := _OUT_MERGE_WEIGHT.match(key):
            weights.setdefault(f'out_merges.{m.group(1)}.branch_weights', {})[int(m.group(2))] = value
        elif regular_fpn and (m := _REGULAR_FPN_LEVEL.match(key)):
            out[f'pyramid.{int(m.group(1)) - 1}.{m.group(2)}'] = value
        elif key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f'{len(unknown)} keys are not part of an original PIIP model this package can build: {unknown[:8]}.')
    for index, branch_state in sorted(branch_states.items()):
        out.update(_branch_keys(index, branch_state))
    for name, scalars in weights.items():
        if sorted(scalars) != list(range(1, len(scalars) + 1)):
            raise ValueError(f'branch weights of {name} are incomplete: found w{sorted(scalars)}.')
        out[name] = torch.stack([scalars[i].reshape(()) for i in sorted(scalars)])
    return dict(out)


# --------------------------------------------------------------------------- filter function
# Groups of keys a checkpoint may lack as a whole (they are then freshly initialised) or carry
# as a whole when the model lacks them (they are then dropped). Anything else must match exactly.
_OPTIONAL_GROUPS = {
    'classifier': lambda k: k.startswith(('head.', 'norm.')),
    'merge': lambda k: k.startswith('merges.') or k == 'branch_weights',
    'intermediate merges': lambda k: k.startswith('out_merges.'),
    'pyramid': lambda k: k.startswith('pyramid.'),
    # The final norm of a ConvNeXt checkpoint (the original keeps transformers' unused one).
    'ConvNeXt final norms': lambda k: re.match(r'^branches\.\d+\.head\.norm\.', k) is not None,
}
_BRANCH_ONLY_FRESH = {'interactions': lambda k: k.startswith('interactions.')}


def _is_branch_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Branch weights assembled from single-model repositories: no interaction has been trained."""
    return not any(k.startswith('interactions.') for k in state_dict)


def adapt_branch_weights(state_dict: Dict[str, torch.Tensor], model) -> Dict[str, torch.Tensor]:
    """Single-model weights under ``branches.{i}.`` -> what each PIIP branch needs (each branch kind's
    ``from_pretrained_weights``); with separate heads, a ViT's own classifier seeds its branch's head."""
    out = {k: v for k, v in state_dict.items() if not k.startswith('branches.')}
    for i, branch in enumerate(model.branches):
        prefix = f'branches.{i}.'
        source = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not source:
            raise ValueError(f'the checkpoint has no weights for branch {i}.')
        if model.head_style == 'separate':
            for name in ('weight', 'bias'):
                if f'head.{name}' in source:
                    out[f'head.{i}.{name}'] = source.pop(f'head.{name}')
        out.update({prefix + k: v for k, v in branch.from_pretrained_weights(source, i).items()})
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model) -> Dict[str, torch.Tensor]:
    """Any PIIP checkpoint (this package's layout, the original's, or assembled branch weights) ->
    a complete state dict for ``model``."""
    state_dict = to_package_layout(state_dict)
    groups = dict(_OPTIONAL_GROUPS)
    if _is_branch_checkpoint(state_dict):
        state_dict = adapt_branch_weights(state_dict, model)
        groups.update(_BRANCH_ONLY_FRESH)
    else:
        for i, branch in enumerate(model.branches):
            state_dict = branch.adapt_checkpoint(state_dict, f'branches.{i}.')
    return complete_state_dict(state_dict, model, groups)
