"""Full-size structure of the original models, built on the meta device."""
import json

import pytest
import torch

import piip_timm
from piip_timm.convert import convert_original_state_dict

from conftest import reference_files

MANIFESTS = reference_files('manifests') + reference_files('convnext/manifests') + \
    reference_files('vit-families/manifests')


def test_all_manifests_are_found():
    names = {p.stem for p in MANIFESTS}
    assert {'det_dino_deit384_sbl_1792_1120_672', 'det_dino_h6b_1024_768', 'det_beit_sbl_1568_1120_672',
            'det_uniperceiver_sbl_1568_1120_672', 'det_dinov2_sbl_1568_1120_672', 'det_mae_sbl_1568_1120_672',
            'det_augreg_sbl_1568_1120_672'} <= names
    assert {f'seg_upernet_h6b_{size}_512' for size in (192, 256, 384, 512)} <= names


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
