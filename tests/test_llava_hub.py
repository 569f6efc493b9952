"""PIIP-LLaVA weights through timm's pretrained machinery and the real hf_hub_download, against a local Hub.

The released models are sharded LLaVA checkpoints: the tower under ``model.vision_tower.vision_tower.``, the
projector under ``model.mm_projector.``, beside the language model. The local Hub serves them in that layout
(an index and three shards, the first holding only language-model tensors), at full size (views of one small
storage, loaded on the meta device) and as the reference cases' original-code weights (run and compared).
"""
import io
import json
import textwrap
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save

from piip_timm.llava import convert_llava_tower_state_dict, translate_llava_config

from conftest import REFERENCE_DIR
from fixtures import RELEASED_TOWER_CONFIGS, shared_storage_state
from hubtools import LocalHub, run_python

LLAVA = REFERENCE_DIR / 'llava'
TOWER, PROJECTOR = 'model.vision_tower.vision_tower.', 'model.mm_projector.'
LLM_ONLY_SHARD = 'model-00001-of-00003'
# Reference cases standing in for a released model's weights (same model class and branch kinds).
CASE_FOR_TAG = {'piip_llava_clip_bl_512_448.llava_13b': 'llava2_clip_bl',
                'piip_llava_convnext_b_clip_l_1024_336.llava_7b': 'llava2_convnext_clip'}


def manifest(tag: str) -> dict:
    return json.loads((LLAVA / 'manifests' / f'llava_{RELEASED_TOWER_CONFIGS[tag]}.json').read_text())


def llava_repo_files(tower: dict, projector: dict, fmt: str) -> dict:
    """A LLaVA checkpoint as transformers shards it: the index and three shards; the first holds only
    language-model tensors, the tower is split over the other two, the projector sits in the last."""
    llm = {f'model.layers.{i}.mlp.up_proj.weight': torch.full((4, 4), float(i)) for i in range(3)}
    tower = {TOWER + k: v for k, v in tower.items()}
    keys = sorted(tower)
    shards = [
        {'model.embed_tokens.weight': torch.zeros(8, 4), **llm},
        {'model.norm.weight': torch.ones(4), **{k: tower[k] for k in keys[: len(keys) // 2]}},
        {'lm_head.weight': torch.zeros(8, 4), **{k: tower[k] for k in keys[len(keys) // 2:]},
         **{PROJECTOR + k: v for k, v in projector.items()}},
    ]
    suffix = '.safetensors' if fmt == 'safetensors' else '.bin'
    names = [f'model-0000{i + 1}-of-00003{suffix}' for i in range(3)]
    files = {}
    for name, shard in zip(names, shards):
        if fmt == 'safetensors':
            files[name] = save({k: v.contiguous() for k, v in shard.items()})
        else:  # torch.save keeps the views of one storage small
            buffer = io.BytesIO()
            torch.save(shard, buffer)
            files[name] = buffer.getvalue()
    index = {'metadata': {'total_size': 0}, 'weight_map': {k: n for n, s in zip(names, shards) for k in s}}
    files['model.safetensors.index.json' if fmt == 'safetensors' else 'pytorch_model.bin.index.json'] = \
        json.dumps(index).encode()
    return files


def never_downloaded(server: LocalHub, shard_stem: str) -> bool:
    return not any(shard_stem in request for request in server.requests)


FULL_SIZE_SCRIPT = textwrap.dedent('''
    import json, warnings, torch, timm
    import piip_timm
    from piip_timm.llava import create_llava_projector
    warnings.filterwarnings('ignore', message='.*non-meta parameter.*')  # loading into meta tensors is a no-op
    results = {{}}
    for tag in {tags!r}:
        with torch.device('meta'):
            model = timm.create_model(tag, pretrained=True)
        projector = create_llava_projector(tag, pretrained=True)
        results[tag] = dict(
            shapes={{k: list(v.shape) for k, v in model.state_dict().items()}},
            params=sum(p.numel() for p in model.parameters()),
            projector={{k: [list(v.shape), v.double().sum().item()] for k, v in projector.state_dict().items()}})
    open({out!r}, 'w').write(json.dumps(results))
''')


@pytest.fixture(scope='module')
def full_size(tmp_path_factory):
    """Every released tag built at full size (meta) from its repository's shards, with its projector."""
    root = tmp_path_factory.mktemp('llava_hub')
    server = LocalHub(root)
    served = {}
    for seed, tag in enumerate(RELEASED_TOWER_CONFIGS):
        m = manifest(tag)
        # a small storage: timm deep-copies the state dict it is handed, each view's storage with it
        tower = shared_storage_state(m['keys'], seed=seed, size=1 << 12)
        projector = shared_storage_state(m['projector_keys'], seed=100 + seed, size=1 << 12)
        for filename, data in llava_repo_files(tower, projector, 'bin').items():
            server.add(m['hub_repo'], filename, data)
        served[tag] = projector
    out = root / 'results.json'
    with server:
        result = run_python(FULL_SIZE_SCRIPT.format(tags=list(RELEASED_TOWER_CONFIGS), out=str(out)), server.endpoint,
                            root / 'hf_home', timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), served, server


@pytest.mark.parametrize('tag', sorted(RELEASED_TOWER_CONFIGS))
def test_released_tower_loads_strictly_at_full_size(full_size, tag):
    results, _, _ = full_size
    m = manifest(tag)
    got = results[tag]
    assert got['params'] == m['num_params_used_in_forward']
    original = {k: torch.empty(s, device='meta') for k, s in m['keys'].items()}
    assert got['shapes'] == {k: list(v.shape) for k, v in convert_llava_tower_state_dict(original).items()}


@pytest.mark.parametrize('tag', sorted(RELEASED_TOWER_CONFIGS))
def test_released_projector_loads_the_served_tensors(full_size, tag):
    results, served, _ = full_size
    got = results[tag]['projector']
    names = {'1': 'fc1', '3': 'norm', '6': 'fc2'}
    expected = {}
    for key, value in served[tag].items():  # branch{i}.{1,3,6}.{weight,bias}, written out independently
        branch, layer, param = key.split('.')
        expected[f'mlps.{int(branch[-1]) - 1}.{names[layer]}.{param}'] = [list(value.shape), value.double().sum().item()]
    assert set(got) == set(expected)
    for key, (shape, total) in expected.items():
        assert got[key][0] == shape
        assert got[key][1] == pytest.approx(total, rel=1e-9, abs=1e-6), key


def test_language_model_shards_are_never_downloaded(full_size):
    _, _, server = full_size
    assert server.requests, 'the loads made no request to the local Hub'
    assert never_downloaded(server, LLM_ONLY_SHARD)
    assert not never_downloaded(server, 'model-00002-of-00003') and not never_downloaded(server, 'model-00003-of-00003')


CASE_SCRIPT = textwrap.dedent('''
    import json, torch, timm
    from safetensors.torch import save_file
    import piip_timm
    for job in {jobs!r}:
        model = timm.create_model(job['tag'], pretrained=True, **job['kwargs']).eval()
        x = torch.load(job['input'])
        with torch.no_grad():
            maps = model.forward_features(x)
            levels = timm.create_model(job['tag'], pretrained=True, features_only=True, **job['kwargs']).eval()(x)
        save_file({{k: v.contiguous() for k, v in dict(zip(['output.0', 'output.1', 'level.0', 'level.1'], [*maps, *levels])).items()}},
                  job['out'])
''')


@pytest.fixture(scope='module')
def case_results(tmp_path_factory):
    """Two released tags loaded from safetensors shards holding a reference case's original-code weights."""
    root = tmp_path_factory.mktemp('llava_case_hub')
    server = LocalHub(root)
    jobs = []
    for tag, case_name in CASE_FOR_TAG.items():
        case = json.loads((LLAVA / 'cases' / f'{case_name}.json').read_text())
        tensors = load_file(str(LLAVA / 'cases' / f'{case_name}.safetensors'))
        tower = {k[len('state_dict.'):]: v for k, v in tensors.items() if k.startswith('state_dict.')}
        projector = {k[len('projector.'):]: v for k, v in tensors.items() if k.startswith('projector.')}
        for filename, data in llava_repo_files(tower, projector, 'safetensors').items():
            server.add(manifest(tag)['hub_repo'], filename, data)
        kwargs = translate_llava_config(case['constructor_kwargs'], case['pretrained_configs'])
        torch.save(tensors['input'], root / f'{case_name}.input.pt')
        jobs.append(dict(tag=tag, input=str(root / f'{case_name}.input.pt'), out=str(root / f'{case_name}.out.safetensors'),
                         kwargs=dict(branches=[asdict(b) for b in kwargs['branches']],
                                     interaction=asdict(kwargs['interaction']))))
    with server:
        result = run_python(CASE_SCRIPT.format(jobs=jobs), server.endpoint, root / 'hf_home')
        assert result.returncode == 0, result.stderr[-3000:]
        assert never_downloaded(server, LLM_ONLY_SHARD)
    return root


@pytest.mark.parametrize('tag', sorted(CASE_FOR_TAG))
def test_released_tower_reproduces_the_original_through_timm(case_results, tag):
    case_name = CASE_FOR_TAG[tag]
    got = load_file(str(case_results / f'{case_name}.out.safetensors'))
    ref = load_file(str(LLAVA / 'cases' / f'{case_name}.safetensors'))
    for i in range(2):
        out, expected = got[f'output.{i}'], ref[f'output.{i}']
        assert out.shape == expected.shape
        assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    # features_only: the same maps, finest (branch 2) first
    assert torch.equal(got['level.0'], got['output.1']) and torch.equal(got['level.1'], got['output.0'])


# ----------------------------------------------------------------------------- branch-weight tags
TINY_CLIP = dict(embed_dim=32, depth=2, num_heads=2)
TINY_CONVNEXT = dict(dims=(32, 32, 32, 32), depths=(1, 1, 1, 1))
# Where each tower's single models live (written out: timm's Hub repositories, OpenGVLab's CLIP-L repos).
BRANCH_REPOS = {
    'piip_llava_clip_bl_512_256': ('OpenGVLab/clip-vit-large-patch14to16-224', 'timm/vit_base_patch16_clip_224.openai'),
    'piip_llava_clip_bl_512_448': ('OpenGVLab/clip-vit-large-patch14to16-336', 'timm/vit_base_patch16_clip_224.openai'),
    'piip_llava_convnext_b_clip_l_640_224': ('OpenGVLab/clip-vit-large-patch14to16-224',
                                             'timm/convnext_base.clip_laiona_augreg_320'),
    'piip_llava_convnext_b_clip_l_1024_336': ('OpenGVLab/clip-vit-large-patch14to16-336',
                                              'timm/convnext_base.clip_laiona_augreg_320'),
    'piip_llava_convnext_b_clip_l_1024_336_13b': ('OpenGVLab/clip-vit-large-patch14to16-336',
                                                  'timm/convnext_base.clip_laiona_augreg_320'),
    'piip_llava_convnext_l_clip_l_1024_336': ('OpenGVLab/clip-vit-large-patch14to16-336',
                                              'timm/convnext_large_mlp.clip_laion2b_ft_320'),
    'piip_llava_convnext_l_clip_l_1024_336_13b': ('OpenGVLab/clip-vit-large-patch14to16-336',
                                                  'timm/convnext_large_mlp.clip_laion2b_ft_320'),
}


def tiny_timm_weights(repo: str, seed: int) -> dict:
    """A tiny twin of a timm repository's model (its architecture with small widths), random weights."""
    import timm
    arch = repo.split('/')[1].split('.')[0]
    kwargs = TINY_CONVNEXT if arch.startswith('convnext') else dict(TINY_CLIP, img_size=64)
    arch = 'vit_base_patch16_clip_quickgelu_224' if arch.startswith('vit') else arch
    model = timm.create_model(arch, pretrained=False, **kwargs)
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def as_transformers_clip(timm_state: dict) -> dict:
    """timm CLIP ViT weights in transformers' CLIPVisionModel layout (what the OpenGVLab repos hold)."""
    out = {}
    for key, value in timm_state.items():
        parts = key.split('.')
        if key == 'cls_token':
            out['embeddings.class_embedding'] = value.reshape(-1)
        elif key == 'pos_embed':
            out['embeddings.position_embedding.weight'] = value[0]
        elif key == 'patch_embed.proj.weight':
            out['embeddings.patch_embedding.weight'] = value
        elif parts[0] in ('norm_pre', 'norm'):
            out[f'{"pre_layrnorm" if parts[0] == "norm_pre" else "post_layernorm"}.{parts[1]}'] = value
        elif parts[0] == 'blocks':
            layer, rest = parts[1], '.'.join(parts[2:])
            if rest.startswith('attn.qkv.'):
                for name, chunk in zip('qkv', value.chunk(3)):
                    out[f'encoder.layers.{layer}.self_attn.{name}_proj.{parts[-1]}'] = chunk
            else:
                rest = {'norm1': 'layer_norm1', 'norm2': 'layer_norm2', 'attn.proj': 'self_attn.out_proj'}.get(
                    rest.rsplit('.', 1)[0], rest.rsplit('.', 1)[0]) + '.' + parts[-1]
                out[f'encoder.layers.{layer}.{rest}'] = value
        elif parts[0] != 'head':
            raise AssertionError(f'unexpected timm CLIP key {key}')
    return {f'vision_model.{k}': v for k, v in out.items()}


BRANCH_SCRIPT = textwrap.dedent('''
    import torch, timm
    from safetensors.torch import save_file
    import piip_timm
    for job in {jobs!r}:
        model = timm.create_model(job['tag'], pretrained=True, **job['kwargs'])
        save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, job['out'])
''')


@pytest.fixture(scope='module')
def branch_results(tmp_path_factory):
    from piip_timm.clip_branch import CLIPBranchCfg
    from piip_timm.convnext_branch import ConvNeXtBranchCfg
    root = tmp_path_factory.mktemp('llava_branch_hub')
    server = LocalHub(root)
    weights = {}
    for seed, repo in enumerate(sorted({r for pair in BRANCH_REPOS.values() for r in pair})):
        twin = tiny_timm_weights('timm/vit_base_patch16_clip_224' if repo.startswith('OpenGVLab') else repo, seed)
        served = as_transformers_clip(twin) if repo.startswith('OpenGVLab') else twin
        server.add(repo, 'model.safetensors', save({k: v.contiguous() for k, v in served.items()}))
        weights[repo] = twin
    clip = CLIPBranchCfg(img_size=64, block_ranges=((0, 0), (1, 1)), pos_embed_grid=4, **TINY_CLIP)
    jobs = []
    for variant, (coarse, fine) in BRANCH_REPOS.items():
        fine_cfg = ConvNeXtBranchCfg(img_size=128, block_ranges=((0, 2), (3, 6)), **TINY_CONVNEXT) \
            if 'convnext' in fine else CLIPBranchCfg(img_size=128, block_ranges=((0, 0), (1, 1)), pos_embed_grid=4,
                                                     **TINY_CLIP)
        jobs.append(dict(tag=f'{variant}.branches', out=str(root / f'{variant}.safetensors'), kwargs=dict(
            branches=[asdict(clip), asdict(fine_cfg)], interaction=dict(num_heads=4))))
    with server:
        result = run_python(BRANCH_SCRIPT.format(jobs=jobs), server.endpoint, root / 'hf_home')
        assert result.returncode == 0, result.stderr[-3000:]
    return root, weights


@pytest.mark.parametrize('variant', sorted(BRANCH_REPOS))
def test_branch_weight_tag_loads_each_single_model(branch_results, variant):
    """Each branch holds its single model's weights (the CLIP-L converted from transformers' layout; final
    norms and classifier heads left out), the interactions start fresh (their gammas at zero)."""
    root, weights = branch_results
    state = load_file(str(root / f'{variant}.safetensors'))
    for i, repo in enumerate(BRANCH_REPOS[variant]):
        expected = {k: v for k, v in weights[repo].items() if not k.startswith(('head.', 'norm.'))}
        got = {k[len(f'branches.{i}.'):]: v for k, v in state.items() if k.startswith(f'branches.{i}.')}
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    gammas = [v for k, v in state.items() if k.endswith(('attn_gamma', 'ffn_gamma'))]
    assert gammas and all(not g.any() for g in gammas)
