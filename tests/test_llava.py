"""PIIP-LLaVA (TPAMI 2025): vision towers and the separate_2branch_v1 projector against the original code's
outputs (reference cases) and full-size structure (manifests, meta device)."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

import piip_timm
from piip_timm import PIIP
from piip_timm.llava import UNUSED_BRANCH_PARTS, convert_llava_projector_state_dict, translate_llava_config, \
    convert_llava_tower_state_dict, projector_from_config
from piip_timm.weights import load_strict

from conftest import REFERENCE_DIR
from fixtures import RELEASED_TOWER_CONFIGS

LLAVA = REFERENCE_DIR / 'llava'
CASES = ('llava2_clip_bl', 'llava2_convnext_clip')
MANIFESTS = sorted(p.stem for p in (LLAVA / 'manifests').glob('llava_*.json'))


def load_llava_case(name: str):
    """(case json, tower weights, projector weights, all tensors) of a reference case."""
    case = json.loads((LLAVA / 'cases' / f'{name}.json').read_text())
    tensors = load_file(str(LLAVA / 'cases' / f'{name}.safetensors'))

    def under(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return case, under('state_dict.'), under('projector.'), tensors


def manifest(stem: str) -> dict:
    return json.loads((LLAVA / 'manifests' / f'{stem}.json').read_text())


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    error = (out - ref).abs().max().item()
    assert error <= 1e-5 * ref.abs().max().item(), f'max error {error:.3g} vs max|ref| {ref.abs().max().item():.3g}'


def test_reference_data_present():
    assert len(MANIFESTS) == 9, f'expected the 9 PIIP-LLaVA manifests in {LLAVA / "manifests"}, got {MANIFESTS}'


@pytest.mark.parametrize('name', CASES)
def test_tower_reproduces_original(name):
    case, tower_state, _, tensors = load_llava_case(name)
    tower = piip_timm.from_original(case['constructor_kwargs'], 'llava_vision_tower', checkpoint=tower_state,
                                    pretrained_configs=case['pretrained_configs']).eval()
    with torch.no_grad():
        outputs = tower(tensors['input'])
    assert len(outputs) == 2
    for i, out in enumerate(outputs):
        assert_close_to_reference(out, tensors[f'output.{i}'])


@pytest.mark.parametrize('name', CASES)
def test_projector_reproduces_original(name):
    case, _, projector_state, tensors = load_llava_case(name)
    projector = piip_timm.from_original(case['projector_kwargs'], 'llava_projector', checkpoint=projector_state)
    with torch.no_grad():
        tokens = projector(tensors['output.0'], tensors['output.1'])
    assert list(tokens.shape) == case['projector_output_shape']
    assert_close_to_reference(tokens, tensors['projector_output'])
    assert sum(p.numel() for p in projector.parameters()) == case['projector_num_params']


@pytest.mark.parametrize('name', CASES)
def test_tower_drops_exactly_the_unused_parameters(name):
    """The conversion drops what the original's forward never uses (the case lists the parameters that got
    no gradient there) and nothing else; the tower holds every other parameter."""
    case, tower_state, _, _ = load_llava_case(name)
    converted = convert_llava_tower_state_dict(tower_state)
    dropped = sum(tower_state[k].numel() for k in case['params_without_grad_in_forward'])
    assert sum(v.numel() for v in converted.values()) == case['num_params'] - dropped
    # the same count again from the built model (the tower loaded strictly above holds exactly these)
    tower = piip_timm.from_original(case['constructor_kwargs'], 'llava_vision_tower',
                                    pretrained_configs=case['pretrained_configs'])
    assert sum(p.numel() for p in tower.parameters()) == case['num_params'] - dropped


@pytest.mark.parametrize('name', CASES)
def test_tower_gradients_reach_every_parameter(name):
    case, tower_state, _, tensors = load_llava_case(name)
    tower = piip_timm.from_original(case['constructor_kwargs'], 'llava_vision_tower', checkpoint=tower_state,
                                    pretrained_configs=case['pretrained_configs']).eval()
    outputs = tower(tensors['input'])
    sum(o.square().mean() for o in outputs).backward()
    no_grad = [n for n, p in tower.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert no_grad == []


def test_tower_outputs_in_timm_idiom():
    """forward_features: the maps, coarsest branch first (the original's order); features_only
    (feature_levels='branches'): the same maps in timm's order of increasing stride; the plain tower's
    forward_intermediates: both branches' maps after each interaction step; forward: pooled features."""
    case, tower_state, _, tensors = load_llava_case('llava2_clip_bl')
    model = piip_timm.from_original(case['constructor_kwargs'], 'llava_vision_tower', checkpoint=tower_state,
                                    pretrained_configs=case['pretrained_configs']).model.eval()
    kwargs = translate_llava_config(case['constructor_kwargs'], case['pretrained_configs'])
    as_levels = PIIP(**{**kwargs, 'feature_levels': 'branches'}).eval()
    load_strict(as_levels, model.state_dict())
    x = tensors['input']
    with torch.no_grad():
        maps = model.forward_features(x)
        final, steps = model.forward_intermediates(x)
        final_levels, levels = as_levels.forward_intermediates(x)
        pooled = model(x)
    assert [f['num_chs'] for f in as_levels.feature_info] == [48, 56]
    assert [f['reduction'] for f in as_levels.feature_info] == [8, 8 / 0.875]
    assert torch.equal(levels[0], maps[1]) and torch.equal(levels[1], maps[0])
    assert all(torch.equal(a, b) for a, b in zip(final, maps)) and all(
        torch.equal(a, b) for a, b in zip(final_levels, maps))
    num_steps = len(case['constructor_kwargs']['branch1']['interaction_indexes'])
    # both branches after each step, by increasing stride: the fine branch's steps, then the coarse branch's
    assert len(model.feature_info) == len(steps) == 2 * num_steps >= 4
    assert [f['num_chs'] for f in model.feature_info] == [48] * num_steps + [56] * num_steps
    assert [f['reduction'] for f in model.feature_info] == [8] * num_steps + [8 / 0.875] * num_steps
    assert [s.shape[1:] for s in steps] == [maps[1].shape[1:]] * num_steps + [maps[0].shape[1:]] * num_steps
    assert torch.equal(steps[num_steps - 1], maps[1]) and torch.equal(steps[-1], maps[0])  # after the last step
    assert not torch.equal(steps[0], steps[num_steps - 1])
    # a coarse level of an early step: pruning keeps that step only, and returns where the level now is
    early = model.forward_intermediates(x, indices=[num_steps], intermediates_only=True)[0]
    kept = model.prune_intermediate_layers([num_steps])
    assert len(model.interactions) == 1 and len(model.feature_info) == 2 and kept == [1]
    with torch.no_grad():
        assert torch.equal(model.forward_intermediates(x, indices=kept, intermediates_only=True)[0], early)
    assert torch.allclose(pooled, torch.cat([tensors['output.0'].mean((2, 3)), tensors['output.1'].mean((2, 3))], 1),
                          atol=1e-5 * pooled.abs().max().item())
    assert model.num_features == pooled.shape[1] == 56 + 48
    with pytest.raises(ValueError, match="feature_levels='branches' needs a model without head and merge"):
        PIIP(**{**kwargs, 'head': 'merged', 'merge': 'linear', 'feature_levels': 'branches'})


@pytest.mark.parametrize('stem', MANIFESTS)
def test_manifest_full_size_structure(stem):
    """Every released tower and projector on the meta device: the original's keys converted give exactly
    the tower's tensors and shapes (the unused ones dropped), and the parameter counts are the manifest's."""
    m = manifest(stem)
    with torch.device('meta'):
        tower = piip_timm.from_original(m['constructor_kwargs'], 'llava_vision_tower',
                                        pretrained_configs=m['pretrained_configs']).model
        original = {k: torch.empty(s) for k, s in m['keys'].items()}
        projector = projector_from_config(m['projector_config'], m['projector_out_dim'])
        original_projector = {k: torch.empty(s) for k, s in m['projector_keys'].items()}
    converted = convert_llava_tower_state_dict(original)
    ours = tower.state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    count = sum(p.numel() for p in tower.parameters())
    assert count == m['num_params_used_in_forward'] == m['num_params'] - m['unused_in_forward_params']
    unused = sorted(k for k in original if UNUSED_BRANCH_PARTS.match(_package_key(k)))
    assert unused == sorted(m['unused_in_forward_keys'])
    assert [list(o.shape) for o in _meta_outputs(tower, m)] == m['output_shapes_for_batch1']
    assert sum(p.numel() for p in projector.parameters()) == m['projector_params']
    projector_shapes = {k: tuple(v.shape) for k, v in convert_llava_projector_state_dict(original_projector).items()}
    assert projector_shapes == {k: tuple(v.shape) for k, v in projector.state_dict().items()}


def _package_key(original_key: str) -> str:
    """Where an original branch key lands before the unused parts are dropped (branch index and timm name)."""
    m = re.match(r'^branch(\d)\.(clip_model|convnext_model)\.(.+)$', original_key)
    if m is None:
        return original_key
    rest = m.group(3).replace('post_layernorm.', 'norm.')
    return f'branches.{int(m.group(1)) - 1}.{rest}'


def _meta_outputs(tower, m):
    with torch.device('meta'):
        size = m['input_image_size']
        return tower.forward_features(torch.empty(1, 3, size, size))


# The single models behind each original ``pretrained`` name: timm tags, or the transformers repo itself.
BRANCH_WEIGHTS = {
    'openai/clip-vit-base-patch16': 'vit_base_patch16_clip_quickgelu_224.openai',
    'OpenGVLab/clip-vit-large-patch14to16-224': 'OpenGVLab/clip-vit-large-patch14to16-224',
    'OpenGVLab/clip-vit-large-patch14to16-336': 'OpenGVLab/clip-vit-large-patch14to16-336',
    'convnext_base.clip_laiona_augreg_320': 'convnext_base.clip_laiona_augreg_320',
    'convnext_large_mlp.clip_laion2b_ft_320': 'convnext_large_mlp.clip_laion2b_ft_320',
}


def test_every_released_model_has_a_tag():
    from piip_timm.llava import TOWER_TAGS
    released = {f'{v}.{n}' for v, tags in TOWER_TAGS.items() for n, t in tags.items() if t.repo}
    assert released == set(RELEASED_TOWER_CONFIGS)
    assert len(TOWER_TAGS) == 7


@pytest.mark.parametrize('tag', sorted(RELEASED_TOWER_CONFIGS))
def test_tag_is_the_architecture_it_was_released_with(tag):
    """The registered tower, its Hub repository, language-model width and branch-weight sources against the
    original config (the reference manifest) of the released model."""
    from piip_timm.llava import TOWER_TAGS, TOWERS, translate_llava_config
    m = manifest(f'llava_{RELEASED_TOWER_CONFIGS[tag]}')
    variant, name = tag.split('.')
    expected = translate_llava_config(m['constructor_kwargs'], m['pretrained_configs'])
    assert TOWERS[variant].branches == tuple(expected['branches'])
    # the real names need no pretrained_configs (the CLIP repos' and timm's architectures are known)
    assert translate_llava_config(m['constructor_kwargs']) == expected
    assert TOWERS[variant].interaction == expected['interaction']
    assert (TOWER_TAGS[variant][name].repo, TOWER_TAGS[variant][name].llm_width) == (m['hub_repo'], m['llm_hidden_size'])
    sources = [str(s) for s in TOWER_TAGS[variant]['branches'].branch_sources]
    assert sources == [BRANCH_WEIGHTS[m['constructor_kwargs'][b]['pretrained']] for b in ('branch1', 'branch2')]
    import timm
    cfg = timm.models.get_pretrained_cfg(tag)
    size = m['input_image_size']
    assert (cfg.input_size, cfg.mean, cfg.std, cfg.crop_pct) == ((3, size, size), (0.485, 0.456, 0.406),
                                                                 (0.229, 0.224, 0.225), 1.0)


# ----------------------------------------------------------------------------- preprocessing
def original_preprocessing(image, size: int) -> torch.Tensor:
    """LLaVA's expand2square (background int(mean*255)) then CLIPImageProcessor (shortest edge to ``size``,
    bicubic; centre crop; /255; ImageNet mean/std), written with PIL and numpy."""
    import numpy as np
    from PIL import Image
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    w, h = image.size
    if w != h:
        side = max(w, h)
        canvas = Image.new('RGB', (side, side), tuple(int(x * 255) for x in mean))
        canvas.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
        image = canvas
    image = image.resize((size, size), Image.BICUBIC)
    array = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize('shape', [(300, 200), (120, 250), (256, 256)])
def test_llava_transform_is_the_original_preprocessing(shape):
    import numpy as np
    from PIL import Image
    from piip_timm.llava import create_llava_transform
    rng = np.random.default_rng(sum(shape))
    image = Image.fromarray(rng.integers(0, 256, (shape[1], shape[0], 3), dtype=np.uint8))
    ours = create_llava_transform(64)(image)
    assert ours.shape == (3, 64, 64)
    assert (ours - original_preprocessing(image, 64)).abs().max() < 1e-5


def test_timm_transform_from_the_pretrained_cfg_matches_on_square_images():
    import numpy as np
    import timm
    from PIL import Image
    from piip_timm.llava import create_llava_transform
    with torch.device('meta'):
        model = timm.create_model('piip_llava_clip_bl_512_256')
    config = timm.data.resolve_data_config({}, model=model)
    assert config['input_size'] == (3, 512, 512) and config['crop_mode'] == 'border'
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))
    timm_input = timm.data.create_transform(**config)(image)
    assert (timm_input - create_llava_transform(model)(image)).abs().max() < 1e-5
    assert (timm_input - original_preprocessing(image, 512)).abs().max() < 1e-5


# ----------------------------------------------------------------------------- cost
@pytest.mark.parametrize('variant, paper_gflops', [
    ('piip_llava_clip_bl_512_256', 193),  # the original README's FLOPs of the 7B towers (written out)
    ('piip_llava_convnext_b_clip_l_640_224', 191),
])
def test_tower_cost_in_the_papers_convention(variant, paper_gflops):
    import timm
    from piip_timm.flops import count_macs
    model = timm.create_model(variant, device='meta')
    size = model.branch_cfgs[-1].img_size
    count = count_macs(model, (3, size, size), device='meta').paper
    assert abs(count - paper_gflops) < 0.003 * paper_gflops, count  # 193.5 and 191.3 G


def test_tower_classifier_and_fx_trace():
    """timm's contract on a tower: num_classes puts a Linear on the pooled maps (gradients reach every
    parameter), torch.fx traces it (the CLIP pos-embed resampling is one wrapped node) with the same outputs."""
    from piip_timm.llava import translate_llava_config
    from piip_timm.piip import PIIP
    case, tower_state, _, tensors = load_llava_case('llava2_convnext_clip')
    kwargs = dict(translate_llava_config(case['constructor_kwargs'], case['pretrained_configs']), num_classes=5)
    model = PIIP(**kwargs).eval()
    model.load_state_dict(dict(model.state_dict(), **convert_llava_tower_state_dict(tower_state)))
    x = tensors['input']
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.square().sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-6)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    expected = torch.cat([tensors['output.0'].mean((2, 3)), tensors['output.1'].mean((2, 3))], 1)
    assert torch.allclose(pooled, expected, atol=1e-5 * expected.abs().max().item())


def test_errors_say_what_to_do():
    from piip_timm.llava import create_llava_projector
    case, _, _, _ = load_llava_case('llava2_clip_bl')
    with pytest.raises(ValueError, match=r"architecture of 'test/clip-vit-case-large' is unknown; pass pretrained_configs"):
        piip_timm.from_original(case['constructor_kwargs'], 'llava_vision_tower')
    wrong = dict(case['constructor_kwargs'], model_cls='3branch')
    with pytest.raises(ValueError, match=r"model_cls '3branch' is not one of"):
        piip_timm.from_original(wrong, 'llava_vision_tower', pretrained_configs=case['pretrained_configs'])
    with pytest.raises(ValueError, match=r"projector type 'mlp2x_gelu' is not supported"):
        piip_timm.from_original({'config': {'type': 'mlp2x_gelu'}, 'out_dim': 64}, 'llava_projector')
    with pytest.raises(ValueError, match=r'has no released projector'):
        create_llava_projector('piip_llava_clip_bl_512_256.branches', pretrained=True, device='meta')
    with pytest.raises(ValueError, match=r'checkpoint does not fit'):  # a tower's weights for another tower
        _, other_state, _, _ = load_llava_case('llava2_convnext_clip')
        piip_timm.from_original(case['constructor_kwargs'], 'llava_vision_tower', checkpoint=other_state,
                                pretrained_configs=case['pretrained_configs'])
