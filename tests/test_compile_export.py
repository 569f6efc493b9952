"""torch.compile, ONNX and torch.export on the variants' structures (tiny widths for speed)."""
import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from piip_timm import PIIP, InteractionCfg
from piip_timm.convnext_branch import ConvNeXtBranchCfg
from piip_timm.variants import VARIANTS as VARIANT_CFGS

from helpers import disable_drop_path, perturb, tiny_variant

# (variant, interactions): LH6B's tiny twin keeps its block grouping, so one interaction already has
# 12/8/6 blocks per branch; two would double the compile time of the slowest test here.
VARIANTS = [('piip_tsb', 2), ('piip_sbl', 2), ('piip_tsbl', 2), ('piip_lh6b', 1)]


@pytest.mark.parametrize('name, interactions', VARIANTS, ids=[name for name, _ in VARIANTS])
def test_compile_forward_and_backward_without_graph_breaks(name, interactions):
    """Dynamo + AOTAutograd (backend aot_eager) capture the whole model in one graph, backward included."""
    torch._dynamo.reset()
    counters.clear()
    model = disable_drop_path(perturb(tiny_variant(name, depth=interactions))).train()
    x = torch.randn(2, 3, 128, 96)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    out = compiled(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = model(x)
    expected.square().mean().backward()
    assert sum(counters['graph_break'].values()) == 0
    assert torch.allclose(out, expected, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6, rtol=1e-4), n


def _hybrid_convnext_vit() -> torch.nn.Module:
    """A ConvNeXt (coarse) and a DeiT-T (fine) branch, two interactions, merged classifier."""
    convnext = ConvNeXtBranchCfg(img_size=64, dims=(32, 32, 32, 32), depths=(1, 1, 1, 1),
                                 block_ranges=((0, 3), (4, 6)))
    vit = replace(VARIANT_CFGS['piip_vt_cs_cb'].branches[-1], depth=2, block_ranges=((0, 0), (1, 1)), img_size=128)
    return PIIP([convnext, vit], InteractionCfg(num_heads=4), head='merged', merge='linear', num_classes=3)


REGIONAL = {'piip_tsb': lambda: tiny_variant('piip_tsb', depth=2), 'convnext+vit': _hybrid_convnext_vit}


def _compiled_regions(model, regions):
    if regions == 'steps':
        return model._compiled_steps
    return [b.layer(j) for b in model.branches for j in range(b.num_layers)] + [
        u for units in model.interactions for u in units]


@pytest.mark.parametrize('regions', ['steps', 'layers'])
@pytest.mark.parametrize('name', list(REGIONAL))
def test_regional_compilation_matches_eager_and_shares_graphs_between_regions(name, regions):
    """compile_regions: outputs, per-step features and gradients of eager, with and without checkpointing
    inside the regions; names unchanged; dynamo traces one graph per distinct region signature, not one per
    region (the tiny TSB's two steps are alike: one graph; the hybrid's ConvNeXt steps differ: two)."""
    torch._dynamo.reset()
    counters.clear()
    model = disable_drop_path(perturb(REGIONAL[name]())).train()
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 128, 96)
    expected = model(x)
    expected.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.no_grad():
        expected_levels = model.forward_intermediates(x, indices=[0], intermediates_only=True)
    model.compile_regions(regions, backend='aot_eager')
    out = model(x)
    out.square().mean().backward()
    compiled = _compiled_regions(model, regions)
    assert compiled and all(r._compiled_call_impl is not None for r in compiled)
    assert list(model.state_dict()) == keys
    assert sum(counters['graph_break'].values()) == 0
    graphs = counters['stats']['unique_graphs']
    if regions == 'steps':
        assert graphs == {'piip_tsb': 1, 'convnext+vit': 2}[name]
    else:
        assert 0 < graphs < len(compiled)
    assert torch.allclose(out, expected, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6, rtol=1e-4), n
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6, rtol=1e-4), n
    with torch.no_grad():
        levels = model.forward_intermediates(x, indices=[0], intermediates_only=True)
    assert torch.allclose(levels[0], expected_levels[0], atol=1e-6)


def test_compile_regions_rejects_unknown_regions_and_a_second_kind():
    model = tiny_variant('piip_tsb', depth=1)
    with pytest.raises(ValueError, match="regions must be 'steps' or 'layers'"):
        model.compile_regions('blocks')
    model.compile_regions('layers', backend='eager')
    with pytest.raises(ValueError, match=r"layers are already compiled; compile_regions\('steps'\) needs a model"):
        model.compile_regions('steps', backend='eager')
    assert model._compiled_steps is None


@pytest.mark.parametrize('regions', ['steps', 'layers'])
def test_deepcopy_of_region_compiled_model_runs_its_own_parameters(regions):
    """A copy (e.g. an EMA model) of a region-compiled model computes with the copy's weights, the original
    with its own."""
    torch._dynamo.reset()
    model = perturb(tiny_variant('piip_tsb', depth=2)).eval()
    x = torch.randn(1, 3, 128, 96)
    model.compile_regions(regions, backend='aot_eager')
    with torch.no_grad():
        before = model(x)
        copied = copy.deepcopy(model)
        for p in copied.parameters():
            p.mul_(0.5)
        halved = tiny_variant('piip_tsb', depth=2).eval()  # the halved weights, eager
        halved.load_state_dict(copied.state_dict())
        assert torch.equal(model(x), before)
        assert torch.allclose(copied(x), halved(x), atol=1e-6)
        assert not torch.allclose(copied(x), before, atol=1e-3)


def test_inductor_forward_matches_eager():
    torch._dynamo.reset()
    model = perturb(tiny_variant('piip_tsb', depth=1)).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model)(x), model(x), atol=1e-5)


def _onnx_check(module, x, path, batches=(1, 3)):
    import onnxruntime
    batch = torch.export.Dim('batch', min=1, max=64)
    torch.onnx.export(module, (x,), str(path), dynamo=True, dynamic_shapes={'x': {0: batch}})
    session = onnxruntime.InferenceSession(str(path))
    for b in batches:
        xb = torch.randn(b, *x.shape[1:])
        got = session.run(None, {session.get_inputs()[0].name: xb.numpy()})
        with torch.no_grad():
            ref = module(xb)
        ref = ref if isinstance(ref, (list, tuple)) else [ref]
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert g.shape == tuple(r.shape)
            assert np.abs(g - r.numpy()).max() <= 1e-4 * max(1.0, float(r.abs().max()))


class Pyramid(torch.nn.Module):
    """What features_only returns, as a plain forward for export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_intermediates(x, intermediates_only=True)


def test_onnx_export_of_classifier_and_pyramid_with_dynamic_batch(tmp_path):
    classifier = perturb(tiny_variant('piip_tsb')).eval()
    _onnx_check(classifier, torch.randn(2, 3, 128, 128), tmp_path / 'classifier.onnx')
    # One interaction: the classifier above already exports the interaction loop; this one adds four
    # branches, the conv merge and the pyramid.
    dense = perturb(tiny_variant('piip_tsbl', depth=1, head=None, num_classes=0, merge='conv',
                                 pyramid=('up4', 'up2', 'same', 'down2'))).eval()
    _onnx_check(Pyramid(dense).eval(), torch.randn(2, 3, 128, 128), tmp_path / 'pyramid.onnx')


def test_torch_export_round_trip():
    model = perturb(tiny_variant('piip_lh6b', depth=1)).eval()  # one interaction: 12/8/6 blocks
    x = torch.randn(2, 3, 128, 128)
    program = torch.export.export(model, (x,), dynamic_shapes={'x': {0: torch.export.Dim('batch', max=32)}})
    y = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(program.module()(y), model(y), atol=1e-5)
