"""MAC counts in the paper's convention against the paper's published cost table."""
import importlib.util
from pathlib import Path

import pytest
import torch

from piip_timm.flops import count_macs

_MODELS = Path(__file__).resolve().parents[1] / 'benchmarks' / 'models.py'


def _paper_rows():
    spec = importlib.util.spec_from_file_location('piip_benchmark_models', _MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {row.name: row for row in module.paper_rows()}


@pytest.mark.parametrize('name', [
    'PIIP-TSB 368/192/128 (ImageNet)',
    'PIIP-SBL 320/160/96 (ImageNet)',
    'PIIP-TSB 1120/896/448 (COCO)',
])
def test_macs_and_params_match_the_paper(name):
    """Every module of the interaction path must be counted: the paper's figures are given to 3 digits."""
    row = _paper_rows()[name]
    torch.manual_seed(0)
    model = row.build().eval()
    count = count_macs(model, (3, row.input_size, row.input_size))
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert count.paper == pytest.approx(row.paper_gmacs, rel=5e-3)
    assert params_m == pytest.approx(row.paper_params_m, rel=5e-3)
    assert count.sampling_actual > 0


@pytest.mark.parametrize('name', [
    'ConvNeXt-B 1024 (COCO)',
    'PIIP-CT-CS-CB 1024/672/448 (COCO)',
    'PIIP-VT-VS-CB 1024/672/448 (COCO)',
])
def test_convnext_rows_match_the_paper(name):
    """get_flops_det.py's convention (ConvNeXt norms uncounted, deformable terms on each interaction's grids
    and widths), counted on the meta device: the paper gives these rows to 3 digits, no #params."""
    row = _paper_rows()[name]
    with torch.device('meta'):
        model = row.build()
    count = count_macs(model, (3, row.input_size, row.input_size), device=torch.device('meta'))
    assert count.paper == pytest.approx(row.paper_gmacs, rel=1e-2)
