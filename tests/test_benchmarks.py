"""Every benchmark section runs end to end on tiny settings (the real runs are not timed tests)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_quick_run_writes_report_plot_and_results(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'run.py'), '--quick', '--out', str(tmp_path)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / 'report.md').read_text()
    for heading in ('## Parameters and multiply-accumulates', '## Speed and memory', '## Deformable sampling',
                    '## Training memory: gradient checkpointing', '## Compilation'):
        assert heading in report
    assert (tmp_path / 'latency_vs_flops.png').stat().st_size > 10_000
    results = json.loads((tmp_path / 'results.json').read_text())
    cost = {row['name']: row for row in results['cost']}
    assert abs(cost['PIIP-TSB 368/192/128 (ImageNet)']['gmacs'] - 17.4) < 0.05
    assert abs(cost['PIIP-TSB 1120/896/448 (COCO)']['params_m'] - 146.44) < 0.01
    for row in results['speed']:
        assert row['fwd_ratio'] > 0 and row['train_ratio'] > 0 and row['piip_eval_mb'] >= 0
    assert results['deform']['rows'] and 0 < results['deform']['share']['time_share'] < 1
    assert all(0 < r['sample_kernel_ms'] < r['reference_fwd_ms'] and 0 < r['backward_kernel_ms'] < r['reference_fwd_bwd_ms']
               and 0 < r['backward_kernel_share_of_reference'] < 1 and r['kernel_floor_speedup'] > 0
               for r in results['deform']['rows'])
    breakdown = results['breakdown']
    assert '## Where the ImageNet PIIP-TSB forward spends its time' in report
    assert set(breakdown['kernels_alone_ms']) == {'Linear', 'Conv2d', 'LayerNorm', 'grid_sample'}
    assert all(ms > 0 for ms in breakdown['kernels_alone_ms'].values())
    unhooked = breakdown['unhooked']
    assert unhooked['branches_alone_s'] < breakdown['floor_s'] < breakdown['piip_fwd_s']
    assert unhooked['branches_alone_s'] < unhooked['piip_s']
    assert breakdown['matmul_floor_ratio'] < unhooked['piip_ratio']
    # Each unit: two projections and, per direction, value/output projections and the ConvFFN's fc1/fc2 as
    # Linear calls, and one fused offset/weight product (baddbmm) per direction.
    ops = breakdown['unit_ops']
    assert ops['aten::linear']['calls'] == 5 * ops['aten::baddbmm']['calls'] > 0
    assert ops['_WeightedBilinearSampling']['calls'] == ops['aten::baddbmm']['calls']
    assert 0 < breakdown['unit_matmul_s'] < unhooked['piip_s']
    assert 'torch.profiler' in report
    [checkpointing] = results['checkpointing']
    modes = checkpointing['modes']
    assert list(modes) == ['none', 'interactions', 'blocks', 'all']
    assert all(m['peak_mb'] > 0 and m['train_s'] > 0 for m in modes.values())
    assert modes['none']['time_vs_none'] == 1.0
    compiled = results['compile']
    assert all(compiled[f'{kind}_compile_s'] > 0 and compiled[f'{kind}_s'] > 0 for kind in ('regional', 'layers', 'whole'))
    assert compiled['max_abs_diff'] < 1e-4


def test_device_run_on_cpu_writes_report_and_results(tmp_path):
    """`--device cpu --quick`: the one-command device run (bf16, eager and compiled) on a tiny pair."""
    result = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'run.py'), '--device', 'cpu', '--quick',
                             '--out', str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '# PIIP on one device' in (tmp_path / 'report.md').read_text()
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['device'] == 'cpu' and len(results['pairs']) == 1
    row = results['pairs'][0]
    for kind in ('eager', 'compiled'):
        assert row[kind]['piip_s'] > 0 and row[kind]['baseline_s'] > 0 and row[kind]['piip_img_s'] > 0
    assert row['compile_s']['piip'] > 0 and row['compile_mode'] == 'default'


def test_only_remeasures_the_named_rows_and_update_keeps_the_others(tmp_path):
    """`--only NAME --update`: the chosen detector's checkpointing row is measured, another pair's stored row
    is kept as it was (the way the SBL and TSBL rows were added beside the TSB row), in the pairs' order."""
    stored_mode = dict(peak_mb=1.0, peak_vs_baseline=1.0, train_s=1.0, time_vs_none=1.0)
    kept = dict(name='tiny PIIP-CT-CS-CB detector', baseline='stored', baseline_peak_mb=1.0,
                modes=dict(none=stored_mode))
    (tmp_path / 'results.json').write_text(json.dumps(dict(command='earlier', checkpointing=[kept])))
    command = [sys.executable, str(ROOT / 'benchmarks' / 'run.py'), '--quick', '--sections', 'checkpointing',
               '--update', '--out', str(tmp_path)]
    result = subprocess.run(command + ['--only', 'tiny PIIP-TSB detector'], capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / 'results.json').read_text())
    measured, stored = results['checkpointing']
    assert measured['name'] == 'tiny PIIP-TSB detector' and measured['modes']['blocks']['peak_mb'] > 0
    assert stored == kept
    assert '| tiny PIIP-CT-CS-CB detector | none | 1 | 1.00x stored (1 MB) |' in (tmp_path / 'report.md').read_text()
    assert results['command'].startswith('earlier; then python benchmarks/run.py') and '--only' in results['command']
    # a prefix that names no detector measures nothing and keeps both rows
    result = subprocess.run(command + ['--only', 'PIIP-nothing'], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / 'results.json').read_text())['checkpointing'] == [measured, stored]
