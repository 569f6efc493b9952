"""Full-size structure of the original models, built on the meta device."""
import json

import pytest
import torch

import piip_timm
from piip_timm.convert import convert_original_state_dict

from conftest import reference_files

MANIFESTS = reference_files('manifests') + reference_files('convnext/manifests')


@pytest.mark.parametrize('path', MANIFESTS, ids=[p.stem for p in MANIFESTS])
def test_full_size_structure_matches_original(path):
    manifest = json.loads(path.read_text())
    with torch.device('meta'):
        model = piip_timm.from_original(manifest['constructor_kwargs'], manifest['task'],
                                        pretrained_configs=manifest.get('pretrained_configs'))
    assert sum(p.numel() for p in model.parameters()) == manifest['num_params']
    inner = model.model if hasattr(model, 'model') else model
    ours = {k: list(v.shape) for k, v in inner.state_dict().items()}
    converted = convert_original_state_dict({k: torch.empty(v, device='meta') for k, v in manifest['keys'].items()})
    assert ours == {k: list(v.shape) for k, v in converted.items()}
