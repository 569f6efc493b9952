"""Equivalence with the original PIIP code on the shared reference cases (every family's folder)."""
import re

import pytest
import torch
from timm.layers import DropPath

import piip_timm
from piip_timm.convert import convert_original_state_dict

from conftest import load_case, reference_files

CASES = reference_files('cases') + reference_files('convnext/cases') + reference_files('vit-families/cases')


def _build(case, state):
    return piip_timm.from_original(case['constructor_kwargs'], case['task'], checkpoint=state,
                                   pretrained_configs=case.get('pretrained_configs')).eval()


def test_all_published_cases_are_found():
    names = {p.stem for p in CASES}
    assert {'cls2', 'cls3_augreg', 'cls3_merged', 'cls3_sephead', 'cls4', 'det3', 'det3_lh6b_like', 'det4',
            'det3_cnn_ctcscb', 'det3_hybrid_ctvsvb', 'det3_hybrid_vtcscb'} <= names
    assert {'det3_beit_sbl', 'det3_uniperceiver_sbl', 'det3_dinov2_sbl', 'det3_mae_sbl', 'det3_augreg_sbl',
            'det3_dino_sbl384', 'det2_dino_h6b', 'seg2_h6b'} <= names


@pytest.mark.parametrize('path', CASES, ids=[p.stem for p in CASES])
def test_reproduces_original_outputs(path):
    case, state, x, expected = load_case(path)
    model = _build(case, state)
    assert sum(p.numel() for p in model.parameters()) == case['num_params']
    with torch.no_grad():
        out = model(x)
    outs = out if isinstance(out, list) else [out]
    assert [list(o.shape) for o in outs] == case['output_shapes']
    for ours, ref in zip(outs, expected):
        err = (ours - ref).abs().max().item()
        assert err <= 1e-5 * ref.abs().max().item(), f'max |diff| {err:.3g} vs max |ref| {ref.abs().max():.3g}'


@pytest.mark.parametrize('path', CASES, ids=[p.stem for p in CASES])
def test_loading_is_strict_and_complete(path):
    """Every original tensor lands in exactly one of ours, and every one of ours comes from the file."""
    case, state, _, _ = load_case(path)
    converted = convert_original_state_dict(state)
    # Scalar merge weights (w1.., intermediate_merging_{i}_w1..) become one vector per merge; BEiT's index
    # buffers are checked and dropped (the model computes them).
    scalars = [k for k in state if re.search(r'(^|_)w\d$', k)]
    index_buffers = [k for k in state if k.endswith('.attn.relative_position_index')]
    assert len(converted) == len(state) - len(scalars) + len({k[:-1] for k in scalars}) - len(index_buffers)
    model = _build(case, state)
    inner = model.model if hasattr(model, 'model') else model
    assert set(inner.state_dict()) == set(converted)
    for key, value in converted.items():
        assert torch.equal(inner.state_dict()[key], value), key

    missing = dict(state)
    dropped = next(k for k in missing if 'interactions' in k)
    del missing[dropped]
    with pytest.raises(ValueError, match='1 missing'):
        _build(case, missing)
    extra = dict(state, **{'branch1.blocks.0.unexpected': torch.zeros(1)})
    with pytest.raises(ValueError, match='1 unexpected'):
        _build(case, extra)
    wrong = dict(state)
    key = next(k for k in wrong if k.endswith('attn.value_proj.weight'))
    wrong[key] = wrong[key][:-1]
    with pytest.raises(ValueError, match='1 of another shape'):
        _build(case, wrong)


@pytest.mark.parametrize('path', CASES, ids=[p.stem for p in CASES])
def test_gradients_reach_every_parameter_in_training(path):
    case, state, x, _ = load_case(path)
    model = _build(case, state).train()
    for module in model.modules():  # stochastic depth could drop a whole path for this 2-image batch
        if isinstance(module, DropPath):
            module.drop_prob = 0.0
    out = model(x)
    loss = sum(o.square().mean() for o in out) if isinstance(out, list) else out.square().mean()
    loss.backward()
    # Parameters the original leaves out of its forward (e.g. fpn1 of DINO detectors) may have no gradient.
    unused = set(convert_original_state_dict({k: torch.zeros(1) for k in case['params_without_grad_in_forward']}))
    inner = model.model if hasattr(model, 'model') else model
    for name, p in inner.named_parameters():
        if name in unused:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f'no gradient for {name}'
