"""MAC and parameter counts in the paper's convention against the paper's published cost tables."""
import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from piip_timm.flops import count_macs

from helpers import benchmark_models

ROOT = Path(__file__).resolve().parents[1]
# #Param (M) and #FLOPs (G) as printed in the original README's ImageNet and COCO tables (written out here).
PAPER = {
    'PIIP-TSB 368/192/128 (ImageNet)': ('144', '17.4'),
    'PIIP-SBL 320/160/96 (ImageNet)': ('489', '39.0'),
    'PIIP-SBL 384/192/128 (ImageNet)': ('489', '61.2'),
    'ViT-B 1024 (COCO)': ('90', '463'),
    'PIIP-TSB 1120/896/448 (COCO)': ('146', '243'),
    'PIIP-TSB 1568/896/448 (COCO)': ('147', '287'),
    'PIIP-TSB 1568/1120/672 (COCO)': ('149', '453'),
    'ViT-L 1024 (COCO)': ('308', '1542'),
    'PIIP-SBL 1120/672/448 (COCO)': ('493', '727'),
    'PIIP-SBL 1344/896/448 (COCO)': ('495', '1002'),
    'PIIP-SBL 1568/896/672 (COCO)': ('497', '1464'),
    'PIIP-TSBL 1344/896/672/448 (COCO)': ('506', '755'),
    'PIIP-TSBL 1568/1120/672/448 (COCO)': ('507', '861'),
    'PIIP-TSBL 1792/1568/1120/448 (COCO)': ('512', '1535'),
    'InternViT-6B 1024 (COCO)': ('5919', '29323'),
    'PIIP-H6B 1024/512 (COCO)': ('6872', '11080'),
}
# #FLOPs (G) of the README's ConvNeXt table (Mask R-CNN 1x; no #Param column), written out here.
PAPER_CONVNEXT = {
    'ConvNeXt-B 1024 (COCO)': 321,
    'PIIP-CT-CS-CB 1024/672/448 (COCO)': 326,
    'PIIP-CT-VS-VB 1024/672/448 (COCO)': 373,
    'PIIP-CT-CS-VB 1024/672/448 (COCO)': 431,
    'PIIP-CT-VS-CB 1024/672/448 (COCO)': 297,
    'PIIP-VT-CS-VB 1024/672/448 (COCO)': 291,
    'PIIP-VT-CS-CB 1024/672/448 (COCO)': 231,
    'PIIP-VT-VS-CB 1024/672/448 (COCO)': 193,
}

# #Param (M) and #FLOPs (G) of the README's ADE20K UperNet table (PIIP-H6B, input 512), written out here.
PAPER_UPERNET = {
    'PIIP-H6B 512/192 (ADE20K)': (6745, 1663),
    'PIIP-H6B 512/256 (ADE20K)': (6745, 2354),
    'PIIP-H6B 512/384 (ADE20K)': (6746, 4374),
    'PIIP-H6B 512/512 (ADE20K)': (6747, 7308),
}


def as_printed(value: float, printed: str) -> str:
    """``value`` rounded to the decimals the paper prints (half up, like a table)."""
    step = Decimal(1).scaleb(Decimal(printed).as_tuple().exponent)
    return str(Decimal(repr(value)).quantize(step, rounding='ROUND_HALF_UP'))


def _paper_rows():
    return {row.name: row for row in benchmark_models().paper_rows()}


@pytest.mark.parametrize('name', [
    'PIIP-TSB 368/192/128 (ImageNet)',
    'PIIP-SBL 320/160/96 (ImageNet)',
    'PIIP-TSB 1120/896/448 (COCO)',
])
def test_macs_and_params_round_to_the_papers_figures(name):
    """Every module of the interaction path must be counted: the paper prints 3-5 significant digits."""
    row = _paper_rows()[name]
    torch.manual_seed(0)
    model = row.build().eval()
    count = count_macs(model, (3, row.input_size, row.input_size))
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    params, gmacs = PAPER[name]
    assert (as_printed(params_m, params), as_printed(count.paper, gmacs)) == (params, gmacs)
    assert count.sampling_actual > 0


def test_recorded_costs_and_the_readme_claim_agree_with_the_paper():
    """benchmarks/results/results.json (the 16 ViT rows) rounds to every printed figure, and the README states
    the largest relative difference that the rounding hides; its ConvNeXt rows are within 1% of the paper's,
    its UperNet rows within 0.1% (parameters and MACs)."""
    rows = {row['name']: row for row in json.loads((ROOT / 'benchmarks/results/results.json').read_text())['cost']}
    assert set(rows) == set(PAPER) | set(PAPER_CONVNEXT) | set(PAPER_UPERNET)
    for name, gmacs in PAPER_CONVNEXT.items():
        assert rows[name]['gmacs'] == pytest.approx(gmacs, rel=1e-2), name
    for name, (params, gmacs) in PAPER_UPERNET.items():
        assert (rows[name]['params_m'], rows[name]['gmacs']) == pytest.approx((params, gmacs), rel=1e-3), name
    deviations = []
    for name, (params, gmacs) in PAPER.items():
        row = rows[name]
        assert (as_printed(row['params_m'], params), as_printed(row['gmacs'], gmacs)) == (params, gmacs), name
        deviations += [(abs(row['params_m'] / float(params) - 1), f'{row["params_m"]:.2f} M printed as {params} M'),
                       (abs(row['gmacs'] / float(gmacs) - 1), f'{row["gmacs"]:.1f} G printed as {gmacs} G')]
    largest, example = max(deviations)
    readme = ' '.join((ROOT / 'README.md').read_text().split())
    claim = re.search(r'the largest relative difference, ([\d.]+)%, is [^(]*\(([^)]*)\)', readme)
    assert claim, 'README: the cost claim is missing'
    assert (claim.group(1), claim.group(2)) == (f'{100 * largest:.2f}', example)


@pytest.mark.parametrize('name', [
    'ConvNeXt-B 1024 (COCO)',
    'PIIP-CT-CS-CB 1024/672/448 (COCO)',
    'PIIP-VT-VS-CB 1024/672/448 (COCO)',
])
def test_convnext_rows_match_the_paper(name):
    """get_flops_det.py's convention (ConvNeXt norms uncounted, deformable terms on each interaction's grids
    and widths), recomputed on the meta device: within 1% of the paper's printed GMACs (it gives no #params)."""
    row = _paper_rows()[name]
    with torch.device('meta'):
        model = row.build()
    count = count_macs(model, (3, row.input_size, row.input_size), device=torch.device('meta'))
    assert count.paper == pytest.approx(PAPER_CONVNEXT[name], rel=1e-2)


def test_upernet_row_matches_the_readme_on_the_meta_device():
    """An ADE20K PIIP-H6B backbone (6.7 B parameters: never with real tensors) as classification/get_flops.py counts
    it, recomputed: within 0.1% of the README's figures."""
    name = 'PIIP-H6B 512/192 (ADE20K)'
    row = _paper_rows()[name]
    with torch.device('meta'):
        model = row.build()
    count = count_macs(model, (3, row.input_size, row.input_size), device=torch.device('meta'))
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert (params_m, count.paper) == pytest.approx(PAPER_UPERNET[name], rel=1e-3)
