"""Compiled PIIP: regional against whole-model compilation, and the one-command device run.

    python benchmarks/run.py --device cuda              # bf16, eager and compiled, batch 1 and a throughput batch
    python benchmarks/run.py --device cpu --quick       # the same code path on tiny stand-ins (CI)

The device run writes ``report.md`` and ``results.json`` to ``--out`` (default ``benchmarks/results/<device>``).
"""
import contextlib
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from piip_timm.benchmark import alternate, device, forward_fn, ratio, set_device, synchronize

import models

# Per pair of the device run: the speed pairs (ImageNet, TSB and SBL detectors) and their throughput batch;
# quick: the tiny TSB detector (the ImageNet pair takes the same path).
DEVICE_PAIRS = {'full': ((0, 64), (2, 8), (4, 4)), 'quick': ((1, 2),)}


def _cold_compile_caches() -> contextlib.AbstractContextManager:
    """Compile from scratch inside this context: no graph from an earlier process or an earlier compile in this
    one. Caches are on again after it (the setting is not left on for the rest of the process)."""
    torch._dynamo.reset()
    return torch._inductor.config.patch(force_disable_caches=True)


def _first_call_s(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def compile_section(quick: bool, repeats: int) -> Dict:
    """PIIP-TSB 368 (ImageNet) eager, compiled per region (``compile_regions('steps')``, the default, and
    ``compile_regions('layers')``) and compiled whole (``torch.compile(model)``), inductor, fp32, batch 1: compile
    time (first call, caches off) and latency (the four alternated)."""
    pair = (models.tiny_pairs() if quick else models.speed_pairs())[0]
    eager = pair.piip().to(device()).eval()
    x = torch.randn(1, 3, pair.piip_input, pair.piip_input, device=device())
    compiled, compile_s = {}, {}
    for kind in ('regional', 'layers', 'whole'):
        model = copy.deepcopy(eager)
        with _cold_compile_caches():
            if kind == 'whole':
                model = torch.compile(model)
            else:
                model.compile_regions('steps' if kind == 'regional' else 'layers')
            compile_s[kind] = _first_call_s(forward_fn(model, x))
        compiled[kind] = model
    with torch.inference_mode():
        reference = eager(x)
        max_diff = max((m(x) - reference).abs().max().item() for m in compiled.values())
    # A round takes seconds and the compiles minutes: at least 15 rounds, enough to tell 1-2% apart.
    rounds = repeats if quick else max(repeats, 15)
    times = alternate([forward_fn(m, x) for m in (eager, *compiled.values())], rounds)
    row = dict(model=pair.name, eager_s=statistics.median(times[0]), max_abs_diff=max_diff, rounds=rounds)
    by_kind = dict(zip(compiled, times[1:]))
    for kind, kind_times in by_kind.items():
        row.update({f'{kind}_s': statistics.median(kind_times), f'{kind}_compile_s': compile_s[kind],
                    f'{kind}_vs_eager': ratio(kind_times, times[0])})
    row['regional_vs_whole'] = ratio(by_kind['regional'], by_kind['whole'])
    print(f'compile: {pair.name}: ' + '; '.join(
        f"{kind} {compile_s[kind]:.0f} s to compile, {row[kind + '_vs_eager']:.2f}x eager" for kind in compiled),
        flush=True)
    return row


def compile_report(c: Dict) -> List[str]:
    rows = [('regional, steps (default)', 'regional'), ('regional, layers', 'layers'), ('whole model', 'whole')]
    rounds = f" ({c['rounds']} rounds)" if 'rounds' in c else ''
    return ['## Compilation', '',
            f"{c['model']}, batch 1, fp32, inductor; compile time: the first call from cold caches; latency: medians "
            f"of the four alternated{rounds}. Regional, steps: `model.compile_regions()` (each interaction step, "
            "i.e. every "
            "branch's layers of the step and its interaction units, one graph shared by the steps alike); regional, "
            "layers: `model.compile_regions('layers')` (each branch layer and interaction unit on its own); whole: "
            '`torch.compile(model)`.', '',
            '| | compile (s) | latency (s) | vs eager |', '|---|---|---|---|',
            f"| eager | - | {c['eager_s']:.3f} | 1.00x |",
            *(f"| {label} | {c[kind + '_compile_s']:.0f} | {c[kind + '_s']:.3f} | {c[kind + '_vs_eager']:.2f}x |"
              for label, kind in rows if kind + '_s' in c), '',
            f"Regional (steps) / whole-model latency: {c['regional_vs_whole']:.2f}x; largest output difference to "
            f"eager: {c['max_abs_diff']:.1e}.", '']


def _peak_mb(fn: Callable[[], None]) -> Optional[float]:
    """Peak allocated device memory of one call beyond what was allocated before (CUDA only)."""
    if device().type != 'cuda':
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _measure(piip: nn.Module, base: nn.Module, x1, y1, xb, yb, repeats: int) -> Dict:
    lat = alternate([forward_fn(piip, x1), forward_fn(base, y1)], repeats)
    thr = alternate([forward_fn(piip, xb), forward_fn(base, yb)], max(1, repeats // 2))
    batch = xb.shape[0]
    return dict(piip_s=statistics.median(lat[0]), baseline_s=statistics.median(lat[1]), ratio=ratio(*lat),
                piip_img_s=batch / statistics.median(thr[0]), baseline_img_s=batch / statistics.median(thr[1]),
                piip_peak_mb=_peak_mb(forward_fn(piip, xb)), baseline_peak_mb=_peak_mb(forward_fn(base, yb)))


def device_pair(index: int, batch: int, quick: bool, repeats: int) -> Dict:
    """One pair, eager then compiled (PIIP per region, the baseline whole; CUDA graphs on a GPU)."""
    pair = (models.tiny_pairs() if quick else models.speed_pairs())[index]
    piip, base = pair.piip().to(device()).eval(), pair.baseline().to(device()).eval()
    x1 = torch.randn(1, 3, pair.piip_input, pair.piip_input, device=device())
    y1 = torch.randn(1, 3, pair.baseline_input, pair.baseline_input, device=device())
    xb, yb = x1.expand(batch, -1, -1, -1).contiguous(), y1.expand(batch, -1, -1, -1).contiguous()
    eager = _measure(piip, base, x1, y1, xb, yb, repeats)
    mode = 'reduce-overhead' if device().type == 'cuda' else None
    models.piip_inside(piip).compile_regions(mode=mode)
    base = torch.compile(base, mode=mode)
    compile_s = dict(piip=_first_call_s(forward_fn(piip, x1)), baseline=_first_call_s(forward_fn(base, y1)))
    compiled = _measure(piip, base, x1, y1, xb, yb, repeats)
    return dict(name=pair.name, baseline=pair.baseline_name, batch=batch, eager=eager, compiled=compiled,
                compile_s=compile_s, compile_mode=mode or 'default')


def device_report(results: Dict) -> str:
    def mb(value):
        return '-' if value is None else f'{value:.0f}'
    lines = ['# PIIP on one device', '',
             f"Device: {results['device_name']}; autocast bf16; torch {results['torch']}; command: "
             f"`python benchmarks/run.py {results['command']}`.", '',
             'Batch 1 latency (median; PIIP and baseline alternated), throughput at the given batch, peak allocated '
             'memory of one forward at that batch (`torch.cuda.max_memory_allocated`; not measured on a CPU). '
             'Compiled: PIIP with `compile_regions`, the baseline with `torch.compile` (CUDA graphs: '
             "`mode='reduce-overhead'` on a GPU); compile time: the first call.", '',
             '| PIIP | baseline | | latency (s) | ratio | throughput (img/s, batch) | peak MB | compile (s) |',
             '|---|---|---|---|---|---|---|---|']
    for r in results['pairs']:
        for kind in ('eager', 'compiled'):
            m = r[kind]
            compile_s = (f"{r['compile_s']['piip']:.0f} / {r['compile_s']['baseline']:.0f}"
                         if kind == 'compiled' else '-')
            lines.append(f"| {r['name']} | {r['baseline']} | {kind} | {m['piip_s']:.4f} / {m['baseline_s']:.4f} | "
                         f"**{m['ratio']:.2f}** | {m['piip_img_s']:.1f} / {m['baseline_img_s']:.1f} ({r['batch']}) | "
                         f"{mb(m['piip_peak_mb'])} / {mb(m['baseline_peak_mb'])} | {compile_s} |")
    return '\n'.join(lines) + '\n'


def device_main(name: str, quick: bool, repeats: Optional[int], out: Path, command: str) -> None:
    """The device run: every pair of ``DEVICE_PAIRS`` in bf16, eager and compiled; report.md and results.json."""
    set_device(name, torch.bfloat16)
    if out.resolve() == (Path(__file__).resolve().parent / 'results'):
        out = out / torch.device(name).type
    out.mkdir(parents=True, exist_ok=True)
    repeats = repeats or (1 if quick else 10)
    kind = torch.device(name).type
    results = dict(command=command, device=kind, torch=torch.__version__,
                   device_name=torch.cuda.get_device_name() if kind == 'cuda' else f'CPU, {os.cpu_count()} cores',
                   pairs=[])
    for index, batch in DEVICE_PAIRS['quick' if quick else 'full']:
        results['pairs'].append(device_pair(index, batch, quick, repeats))
        row = results['pairs'][-1]
        print(f"{row['name']}: eager {row['eager']['ratio']:.2f}x, compiled {row['compiled']['ratio']:.2f}x "
              f"{row['baseline']}", flush=True)
        (out / 'results.json').write_text(json.dumps(results, indent=1))
        (out / 'report.md').write_text(device_report(results))
    print(f'wrote {out / "report.md"}')
