"""PIIP cost, speed and memory, side by side with the paper's baselines.

    python benchmarks/run.py                 # full run (about two hours on a 2-core CPU)
    python benchmarks/run.py --quick         # small stand-ins of every section (CI smoke run)

Writes ``report.md``, ``results.json`` and ``latency_vs_flops.png`` to ``--out``
(default ``benchmarks/results``). Models of a pair are timed alternately in one process with
the same threads, to cancel drift; each speed pair, each checkpointing detector and each model's memory
figure runs in a fresh process.
"""
import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / 'tests'))  # the plain deformable-sampling oracle lives with the tests

import piip_timm  # noqa: E402,F401
from piip_timm.benchmark import synchronize, alternate, device, forward_fn, ratio, train_fn  # noqa: E402
from piip_timm.flops import _module_macs, count_macs  # noqa: E402
from piip_timm.layers import deform_sample  # noqa: E402
from piip_timm.layers.deform_sampling import _bilinear_samples, _kernel_layout  # noqa: E402

import models  # noqa: E402
from device_run import compile_report, compile_section, device_main  # noqa: E402


# ----------------------------------------------------------------------------- sections
def cost_section(quick: bool) -> List[Dict]:
    rows = models.paper_rows()
    if quick:
        rows = [rows[0], rows[4], next(r for r in rows if r.name.startswith('PIIP-CT-CS-CB'))]
    out = []
    for row in rows:
        with torch.device('meta'):
            model = row.build()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        macs = count_macs(model, (3, row.input_size, row.input_size), device=torch.device('meta'))
        out.append(dict(name=row.name, params_m=params, paper_params_m=row.paper_params_m, gmacs=macs.paper,
                        paper_gmacs=row.paper_gmacs, attention=macs.attention, deformable=macs.deformable,
                        sampling_actual=macs.sampling_actual))
        print(f'cost: {row.name}: {params:.1f} M ({row.paper_params_m or "-"} M), {macs.paper:.1f} G ({row.paper_gmacs} G)',
              flush=True)
    return out


def _gmacs(build, size) -> float:
    with torch.device('meta'):
        model = build()
    return count_macs(model, (3, size, size), device=torch.device('meta')).paper


def _rss_mb() -> float:
    """Current resident set size (Linux)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def _reset_peak_rss() -> None:
    """Start a fresh resident-set high-water mark (Linux: VmHWM, reset through /proc/self/clear_refs)."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def _peak_rss_mb() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CHECKPOINTING_MODES = ('none', 'interactions', 'blocks', 'all')


def _set_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """``PIIP.set_grad_checkpointing`` on the PIIP model inside a benchmark wrapper ('none': off)."""
    models.piip_inside(model).set_grad_checkpointing(False if mode == 'none' else mode)


def memory_probe(pair_index: int, role: str, mode: str, quick: bool) -> Dict:
    """Peak memory of one model's forward (``mode`` 'eval') or forward+backward ('train', or
    'train:<checkpointing mode>' for a PIIP model), from a fresh process."""
    pair = (models.tiny_pairs() if quick else models.speed_pairs())[pair_index]
    build, size = (pair.piip, pair.piip_input) if role == 'piip' else (pair.baseline, pair.baseline_input)
    model = build().to(device())
    mode, _, checkpointing = mode.partition(':')
    model.train(mode == 'train')
    if checkpointing:
        _set_checkpointing(model, checkpointing)
    x = torch.randn(1, 3, size, size, device=device())
    run = train_fn(model, x) if mode == 'train' else forward_fn(model, x)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return dict(peak_mb=(torch.cuda.max_memory_allocated() - base) / 2 ** 20)
    before = _rss_mb()
    _reset_peak_rss()
    run()
    return dict(peak_mb=_peak_rss_mb() - before)


def _probe(pair_index: int, role: str, mode: str, quick: bool, threads: int) -> float:
    command = [sys.executable, __file__, '--probe', str(pair_index), role, mode, '--threads', str(threads)]
    if quick:
        command.append('--quick')
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f'memory probe failed: {result.stderr[-2000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])['peak_mb']


def speed_pair(index: int, quick: bool, repeats: int, threads: int) -> Dict:
    """One pair of the speed section; run in a process of its own (see ``speed_section``)."""
    pair = (models.tiny_pairs() if quick else models.speed_pairs())[index]
    # Memory first, each from a fresh process, while this one holds no model (two large models and a
    # probe at once would not fit in 24 GB).
    memory = {f'{role}_{mode}_mb': _probe(index, role, mode, quick, threads)
              for role in ('piip', 'baseline') for mode in ('eval', 'train')}
    piip, base = pair.piip().to(device()).eval(), pair.baseline().to(device()).eval()
    x1 = torch.randn(1, 3, pair.piip_input, pair.piip_input, device=device())
    y1 = torch.randn(1, 3, pair.baseline_input, pair.baseline_input, device=device())
    fwd = alternate([forward_fn(piip, x1), forward_fn(base, y1)], repeats)
    xb = x1.expand(pair.batch, -1, -1, -1).contiguous()
    yb = y1.expand(pair.batch, -1, -1, -1).contiguous()
    thr = alternate([forward_fn(piip, xb), forward_fn(base, yb)], max(1, repeats // 2))
    piip.train(), base.train()
    bwd = alternate([train_fn(piip, x1), train_fn(base, y1)], max(1, repeats // 2))
    del piip, base
    piip_g, base_g = _gmacs(pair.piip, pair.piip_input), _gmacs(pair.baseline, pair.baseline_input)
    row = dict(name=pair.name, baseline=pair.baseline_name, batch=pair.batch,
               piip_gmacs=piip_g, baseline_gmacs=base_g, flop_ratio=piip_g / base_g,
               piip_fwd_s=statistics.median(fwd[0]), baseline_fwd_s=statistics.median(fwd[1]),
               fwd_ratio=ratio(*fwd),
               piip_train_s=statistics.median(bwd[0]), baseline_train_s=statistics.median(bwd[1]),
               train_ratio=ratio(*bwd),
               piip_throughput=pair.batch / statistics.median(thr[0]),
               baseline_throughput=pair.batch / statistics.median(thr[1]),
               throughput_ratio=1 / ratio(*thr), **memory)
    return row


def _chosen(pairs, indices: Sequence[int], only: Sequence[str]) -> List[int]:
    """The pairs of ``indices`` whose PIIP name starts with one of ``only`` (all of them if it is empty)."""
    return [i for i in indices if not only or any(pairs[i].name.startswith(prefix) for prefix in only)]


def _with_kept_rows(pairs, kept: Sequence[Dict], measured: Sequence[Dict]) -> List[Dict]:
    """The rows just measured and the kept rows of the other pairs, in the pairs' order (``--only``)."""
    by_name = {r['name']: r for r in kept}
    by_name.update({r['name']: r for r in measured})
    return [by_name[p.name] for p in pairs if p.name in by_name]


def _pair_in_fresh_process(section: str, index: int, quick: bool, repeats: int, threads: int) -> Dict:
    """One pair of ``section`` ('speed' or 'checkpointing') measured by a process of its own: a process that
    has run a large model keeps its freed heap, and that plus the next pair's memory probe did not fit in
    24 GB (the TSBL detector's probe was killed after the SBL detector had run in the same process)."""
    command = [sys.executable, __file__, '--pair', section, str(index), '--repeats', str(repeats),
               '--threads', str(threads)] + (['--quick'] if quick else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=4 * 3600)
    if result.returncode != 0:
        raise RuntimeError(f'{section} of pair {index} failed: {result.stderr[-2000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def speed_section(quick: bool, repeats: int, threads: int, save, only: Sequence[str] = (),
                  kept: Sequence[Dict] = ()) -> List[Dict]:
    """Every pair in a fresh process (``_pair_in_fresh_process``). ``save`` is called after each pair."""
    pairs = models.tiny_pairs() if quick else models.speed_pairs()
    # Quick: the two detector pairs alone (they cover the ViTDet and ConvNeXt baselines; the ImageNet pair
    # takes the same path), as each pair starts five processes that each import torch and timm.
    indices = _chosen(pairs, [1, 2] if quick else range(len(pairs)), only)
    out = []
    for index in indices:
        pair = pairs[index]
        print(f'speed: {pair.name} vs {pair.baseline_name}', flush=True)
        row = _pair_in_fresh_process('speed', index, quick, repeats, threads)
        print(f'  fwd {row["piip_fwd_s"]:.3f} s vs {row["baseline_fwd_s"]:.3f} s = {row["fwd_ratio"]:.2f}x '
              f'(FLOPs {row["flop_ratio"]:.2f}x); fwd+bwd {row["train_ratio"]:.2f}x', flush=True)
        out.append(row)
        save(_with_kept_rows(pairs, kept, out))
    return _with_kept_rows(pairs, kept, out)


def checkpointing_pair(index: int, quick: bool, repeats: int, threads: int) -> Dict:
    """One detector of the checkpointing section: peak of one fwd+bwd from a fresh process per mode, and
    fwd+bwd time with the modes alternated on one model; run in a process of its own."""
    pair = (models.tiny_pairs() if quick else models.speed_pairs())[index]
    peaks = {mode: _probe(index, 'piip', f'train:{mode}', quick, threads) for mode in CHECKPOINTING_MODES}
    baseline_peak = _probe(index, 'baseline', 'train', quick, threads)
    model = pair.piip().to(device()).train()
    x = torch.randn(1, 3, pair.piip_input, pair.piip_input, device=device())

    def step(mode: str) -> Callable[[], None]:
        run = train_fn(model, x)

        def call() -> None:
            _set_checkpointing(model, mode)
            run()
        return call
    times = alternate([step(mode) for mode in CHECKPOINTING_MODES], repeats)
    rows = {mode: dict(peak_mb=peaks[mode], peak_vs_baseline=peaks[mode] / baseline_peak,
                       train_s=statistics.median(t), time_vs_none=ratio(t, times[0]))
            for mode, t in zip(CHECKPOINTING_MODES, times)}
    return dict(name=pair.name, baseline=pair.baseline_name, baseline_peak_mb=baseline_peak, modes=rows)


def checkpointing_section(quick: bool, repeats: int, threads: int, save, only: Sequence[str] = (),
                          kept: Sequence[Dict] = ()) -> List[Dict]:
    """Training memory and time of the detector pairs with each ``set_grad_checkpointing`` mode, each detector
    in a fresh process (``_pair_in_fresh_process``)."""
    pairs = models.tiny_pairs() if quick else models.speed_pairs()
    detectors = [1] if quick else [i for i, p in enumerate(pairs) if '+ merge + pyramid' in p.name]
    indices = _chosen(pairs, detectors, only)
    out = []
    for index in indices:
        print(f'checkpointing: {pairs[index].name}', flush=True)
        row = _pair_in_fresh_process('checkpointing', index, quick, repeats, threads)
        out.append(row)
        print('  ' + '; '.join(f'{m}: {r["peak_mb"]:.0f} MB ({r["peak_vs_baseline"]:.2f}x baseline), '
                               f'{r["train_s"]:.2f} s ({r["time_vs_none"]:.2f}x)'
                               for m, r in row['modes'].items()), flush=True)
        save(_with_kept_rows(pairs, kept, out))
    return _with_kept_rows(pairs, kept, out)


def deform_shapes(quick: bool):
    """(name, query grid, value grid, d_model) of the PIIP-TSB 1120/896/448 injectors (16 heads, 4 points, ratio 0.5)."""
    shapes = [('B 28x28 <- S 56x56 (d 768)', 28, 56, 768), ('S 56x56 <- B 28x28 (d 384)', 56, 28, 384),
              ('S 56x56 <- T 70x70 (d 384)', 56, 70, 384), ('T 70x70 <- S 56x56 (d 192)', 70, 56, 192)]
    return [('tiny 8x8 <- 12x12 (d 64)', 8, 12, 64)] if quick else shapes


def _deform_inputs(query, value, d_model, grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads, head_dim = 16, d_model // 2 // 16
    v = torch.randn(1, value * value, heads, head_dim, generator=g)
    loc = torch.rand(1, query * query, heads, 4, 2, generator=g) * 1.2 - 0.1
    w = torch.rand(1, query * query, heads, 4, generator=g).softmax(-1)
    tensors = [t.to(device()).requires_grad_(grad) for t in (v, loc, w)]
    return tensors, (value, value)


def _deform_fn(op, tensors, hw, grad):
    def run():
        out = op(tensors[0], hw, tensors[1], tensors[2])
        if grad:  # the gradients returned, not accumulated into .grad: the op's work, not the harness's
            torch.autograd.grad(out.sum(), tensors)
    return run


class _LiveTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the mode and still alive, op by op (forward and
    backward). Exact and repeatable, unlike a resident-set figure at this scale (a few MB), which the
    C allocator's caching and the first call's code paging move by as much as the op itself."""

    def __init__(self) -> None:
        super().__init__()
        self.live: Dict[int, tuple] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                self.current -= nbytes
                del self.live[key]
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.live and storage.nbytes():
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
        return out


def deform_peak_mb(op, tensors, hw) -> float:
    """Peak live tensor memory (MB) of one forward+backward of ``op``, inputs excluded."""
    counter = _LiveTensorMemory()
    with counter:
        _deform_fn(op, tensors, hw, True)()
    return counter.peak / 2 ** 20


def sampling_kernels(tensors: List[torch.Tensor], hw: Tuple[int, int]) -> Tuple[Callable[[], None], Callable[[], None]]:
    """``grid_sample`` and ``grid_sampler_2d_backward`` (value and location gradients in one kernel, which the
    reference's backward runs too), each alone on the op's inputs laid out for them, contiguous.

    Without storing the (N, D, P, Q) samples (memory above the reference's), a formulation on these kernels
    runs the sampling twice (forward, and again for the point weights' gradient) and the backward kernel once.
    """
    value, locations, attention_weights = (t.detach() for t in tensors)
    images, grid, weights = _kernel_layout(value, hw, locations, attention_weights)
    images, grid = images.contiguous(), grid.contiguous()
    grad = torch.randn(*images.shape[:2], *weights.shape[1:], device=images.device)  # (N, D, P, Q)
    return (lambda: _bilinear_samples(images, grid),
            lambda: torch.ops.aten.grid_sampler_2d_backward(grad, images, grid, 0, 0, False, [True, True]))


def deform_section(quick: bool, repeats: int) -> Dict:
    from test_layers import grid_sample_reference
    rows = []
    for index, (name, query, value, d_model) in enumerate(deform_shapes(quick)):
        result = dict(name=name)
        for grad in (False, True):
            tensors, hw = _deform_inputs(query, value, d_model, grad)
            fns = [_deform_fn(deform_sample, tensors, hw, grad), _deform_fn(grid_sample_reference, tensors, hw, grad)]
            if grad:  # the kernels in the same rounds, so the floor below is a ratio within one round too
                fns += sampling_kernels(tensors, hw)
            times = alternate(fns, repeats * 10, warmup=3)
            key = 'fwd_bwd' if grad else 'fwd'
            result[f'ours_{key}_ms'] = statistics.median(times[0]) * 1000
            result[f'reference_{key}_ms'] = statistics.median(times[1]) * 1000
            result[f'speedup_{key}'] = 1 / ratio(*times[:2])
            if grad:
                result['sample_kernel_ms'] = statistics.median(times[2]) * 1000
                result['backward_kernel_ms'] = statistics.median(times[3]) * 1000
                result['kernel_floor_speedup'] = statistics.median(
                    reference / (2 * sample + backward) for reference, sample, backward in zip(*times[1:]))
                result['backward_kernel_share_of_reference'] = ratio(times[3], times[1])
        tensors, hw = _deform_inputs(query, value, d_model, True)
        result['ours_peak_mb'] = deform_peak_mb(deform_sample, tensors, hw)
        result['reference_peak_mb'] = deform_peak_mb(grid_sample_reference, tensors, hw)
        rows.append(result)
        print(f'deform: {name}: fwd {result["speedup_fwd"]:.2f}x, fwd+bwd {result["speedup_fwd_bwd"]:.2f}x', flush=True)
    return dict(rows=rows, share=deform_share(quick))


@contextlib.contextmanager
def timing_deform_sample(record: Callable[[float], None]):
    """Within the block, every deformable sampling in the models reports its seconds to ``record``."""
    import piip_timm.layers.deform_attn as deform_attn_module
    original = deform_attn_module.deform_sample

    def timed(*args):
        synchronize()
        start = time.perf_counter()
        out = original(*args)
        synchronize()
        record(time.perf_counter() - start)
        return out

    deform_attn_module.deform_sample = timed
    try:
        yield
    finally:
        deform_attn_module.deform_sample = original


def deform_share(quick: bool) -> Dict:
    """Time and FLOP share of the deformable sampling inside the PIIP-TSB detector's forward."""
    pair = (models.tiny_pairs() if quick else models.speed_pairs())[1 if quick else 2]
    model = pair.piip().to(device()).eval()
    x = torch.randn(1, 3, pair.piip_input, pair.piip_input, device=device())
    spent = [0.0]

    def record(seconds: float) -> None:
        spent[0] += seconds

    with timing_deform_sample(record), torch.inference_mode():
        model(x)
        spent[0] = 0.0
        start = time.perf_counter()
        model(x)
        synchronize()
        total = time.perf_counter() - start
    with torch.device('meta'):
        macs = count_macs(pair.piip(), (3, pair.piip_input, pair.piip_input), device=torch.device('meta'))
    return dict(model=pair.name, time_share=spent[0] / total, sampling_gmacs=macs.sampling_actual,
                total_gmacs=macs.paper, flop_share=macs.sampling_actual / (macs.paper + macs.sampling_actual))


def _pass_tokens_through(coarse, coarse_hw, fine, fine_hw):
    """An interaction unit's forward that changes nothing: what the branches cost without interactions."""
    return coarse, fine


MATMUL_OPS = ('aten::linear', 'aten::addmm', 'aten::mm', 'aten::baddbmm', 'aten::bmm', 'aten::matmul')


def interaction_op_profile(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, Dict[str, float]]:
    """Calls and CPU ms of every operator the interaction units call directly, in one forward under
    ``torch.profiler`` (which adds a few microseconds per call), largest first."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from piip_timm.layers import BidirectionalInteraction
    marker = 'piip interaction unit'

    def enter(mod, args):
        mod._bench_region = record_function(marker)
        mod._bench_region.__enter__()

    def leave(mod, args, out):
        mod._bench_region.__exit__(None, None, None)

    handles = []
    for module in model.modules():
        if isinstance(module, BidirectionalInteraction):
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        forward_fn(model, x)()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            forward_fn(model, x)()
    finally:
        for handle in handles:
            handle.remove()
    ops: Dict[str, Dict[str, float]] = {}
    for event in prof.events():
        if event.cpu_parent is not None and event.cpu_parent.name == marker:
            op = ops.setdefault(event.name, dict(calls=0, ms=0.0))
            op['calls'] += 1
            op['ms'] += event.cpu_time_total / 1e3
    return dict(sorted(ops.items(), key=lambda item: -item[1]['ms']))


def time_breakdown(quick: bool, repeats: int) -> Dict:
    """Where the ImageNet PIIP-TSB forward spends its time, against DeiT-B's whole forward.

    Without hooks, alternated: PIIP, the same model with its interaction units passing tokens through
    (branches alone) and DeiT-B. Then the operators the units call (``interaction_op_profile``), and branch
    blocks and parts of the units timed with module hooks (ms per forward and matmul MACs). Two floors on
    PIIP's latency, everything else in the units counted as free: the branches alone plus the units'
    matrix products as profiled, and the branches alone plus the units' kernels (Linear, depthwise conv,
    LayerNorm, grid_sample) each run alone at its in-model shape, cache-hot, best of several.
    """
    from piip_timm.layers import BidirectionalInteraction, DeformableCrossAttention
    from timm.models.vision_transformer import Block
    pair = (models.tiny_pairs() if quick else models.speed_pairs())[0]
    model, base = pair.piip().to(device()).eval(), pair.baseline().to(device()).eval()
    x = torch.randn(1, 3, pair.piip_input, pair.piip_input, device=device())
    y = torch.randn(1, 3, pair.baseline_input, pair.baseline_input, device=device())
    branches_alone = copy.deepcopy(model)
    for module in branches_alone.modules():
        if isinstance(module, BidirectionalInteraction):
            module.forward = _pass_tokens_through
    plain = alternate([forward_fn(model, x), forward_fn(branches_alone, x), forward_fn(base, y)], repeats * 2)
    del branches_alone
    unit_ops = interaction_op_profile(model, x)
    seconds: Dict[str, float] = {}
    macs: Dict[str, int] = {}

    def add(key: str, elapsed: float, count: int = 0) -> None:
        seconds[key] = seconds.get(key, 0.0) + elapsed
        macs[key] = macs.get(key, 0) + count

    def timed(module: torch.nn.Module, key: str, count_macs_of=lambda mod, args, out: 0) -> None:
        def pre(mod, args):
            synchronize()
            mod._bench_start = time.perf_counter()

        def post(mod, args, out):
            synchronize()
            add(key, time.perf_counter() - mod._bench_start, count_macs_of(mod, args, out))
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def block_macs(mod, args, out) -> int:  # its Linears plus the two attention matmuls, 2 N^2 C per image
        tokens = args[0].numel() // args[0].shape[-1]
        linears = sum(tokens * m.in_features * m.out_features
                      for m in mod.modules() if isinstance(m, torch.nn.Linear))
        batch, num_tokens, dim = args[0].shape
        return linears + 2 * batch * num_tokens ** 2 * dim

    no_macs = lambda mod, args, out: 0  # noqa: E731
    parts = (  # (type, key, MAC counter) of modules under `interactions.`; the deformable attention's own
        # count is its fused offset/weight projection, which is no Linear call
        (torch.nn.Linear, 'interactions: Linear layers', _module_macs),
        (DeformableCrossAttention, 'interactions: deformable attention, all of it', _module_macs),
        (torch.nn.Conv2d, 'interactions: depthwise convolutions', no_macs),
        (torch.nn.LayerNorm, 'interactions: LayerNorms', no_macs),
    )
    for name, module in model.named_modules():
        if isinstance(module, Block):
            timed(module, 'branch blocks', block_macs)
        elif isinstance(module, BidirectionalInteraction):
            timed(module, 'interaction units')
        elif name.startswith('interactions.'):
            for kind, key, counter in parts:
                if isinstance(module, kind):
                    timed(module, key, counter)
    with timing_deform_sample(lambda elapsed: add('interactions: deformable sampling', elapsed)):
        forward_fn(model, x)()
        forward_fn(base, y)()
        seconds.clear()
        macs.clear()
        times = alternate([forward_fn(model, x), forward_fn(base, y)], repeats * 2, warmup=0)
    rounds = len(times[0])
    base_s = statistics.median(times[1])
    components = {key: dict(ms=1e3 * seconds[key] / rounds, gmacs=macs[key] / rounds / 1e9)
                  for key in ['branch blocks', 'interaction units'] + [part[1] for part in parts]
                  + ['interactions: deformable sampling']}
    kernels = interaction_kernels_alone(model, x, repeats=3 if quick else 20)
    plain_base_s = statistics.median(plain[2])
    branches_alone_s = statistics.median(plain[1])
    unit_matmul_s = sum(op['ms'] for name, op in unit_ops.items() if name in MATMUL_OPS) / 1e3
    floor_s = branches_alone_s + sum(kernels.values())
    return dict(model=pair.name, baseline=pair.baseline_name, piip_fwd_s=statistics.median(times[0]),
                baseline_fwd_s=base_s, components=components,
                unhooked=dict(piip_s=statistics.median(plain[0]), branches_alone_s=branches_alone_s,
                              baseline_s=plain_base_s, piip_ratio=ratio(plain[0], plain[2]),
                              branches_alone_ratio=ratio(plain[1], plain[2])),
                unit_ops=unit_ops, unit_matmul_s=unit_matmul_s,
                matmul_floor_ratio=(branches_alone_s + unit_matmul_s) / plain_base_s,
                kernels_alone_ms={key: 1e3 * value for key, value in kernels.items()},
                floor_s=floor_s, floor_ratio=floor_s / plain_base_s)


def interaction_kernels_alone(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> Dict[str, float]:
    """Seconds per forward of the interaction units' kernels, each run alone at its in-model input, best of
    ``repeats``: a floor for those units, which leaves out the offset/weight projection, softmax, weighted
    sum over points, GELU, residuals and layout changes, and gets every kernel with hot caches."""
    import piip_timm.layers.deform_sampling as sampling_module
    calls = []

    def capture(mod, args, out):
        # forward itself, not the module: the timing hooks on it must not add to the kernel's time
        calls.append((type(mod).__name__, mod.forward, tuple(a.clone() for a in args)))

    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm)
    handles = [module.register_forward_hook(capture) for name, module in model.named_modules()
               if name.startswith('interactions.') and isinstance(module, kinds)]
    original = sampling_module._bilinear_samples

    def sample_and_capture(images, grid):
        calls.append(('grid_sample', original, (images.clone(), grid.clone())))
        return original(images, grid)

    sampling_module._bilinear_samples = sample_and_capture
    try:
        forward_fn(model, x)()
    finally:
        sampling_module._bilinear_samples = original
        for handle in handles:
            handle.remove()
    seconds: Dict[str, float] = {}
    with torch.inference_mode():
        for kind, fn, args in calls:
            best = min(alternate([lambda: fn(*args)], repeats, warmup=2)[0])
            seconds[kind] = seconds.get(kind, 0.0) + best
    return seconds


# ----------------------------------------------------------------------------- report
def plot(speed: List[Dict], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5))
    seen = set()
    for row in speed:
        for kind, name, gmacs, latency in (('PIIP', row['name'], row['piip_gmacs'], row['piip_fwd_s']),
                                           ('baseline', row['baseline'], row['baseline_gmacs'], row['baseline_fwd_s'])):
            if name in seen:
                continue
            seen.add(name)
            ax.scatter(gmacs, latency, marker='*' if kind == 'PIIP' else 'o', s=160 if kind == 'PIIP' else 70,
                       color='tab:red' if kind == 'PIIP' else 'tab:blue', label=kind if kind not in seen else None)
            seen.add(kind)
            ax.annotate(name, (gmacs, latency), textcoords='offset points', xytext=(5, 4), fontsize=7)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('GMACs (paper convention)')
    ax.set_ylabel(f'latency, batch 1, forward (s) [{device().type}]')
    ax.set_title('PIIP vs single-branch baselines')
    ax.legend()
    ax.grid(True, which='both', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: Dict, path: Path) -> None:
    lines = ['# PIIP benchmarks', '',
             f'Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
             f'{"CUDA " + torch.cuda.get_device_name() + ", bf16 autocast, CUDA events" if torch.cuda.is_available() else "CPU only (no GPU): fp32, wall-clock time"}; '
             f'torch {torch.__version__}, {results["threads"]} threads; command: `{results["command"]}`.', '']
    if results.get('note'):
        lines += [results['note'], '']
    if results.get('cost'):
        lines += ['## Parameters and multiply-accumulates', '',
                  "Convention of the paper's `classification/get_flops.py`: mmcv's module counter (a multiply-add is "
                  "one op) plus self-attention `2(hw)^2C` (windows: `2hw w^2 C`) and deformable attention `5hwKC` "
                  "added by hand; detection models are counted as the paper counts them, the classification PIIP built "
                  "from the detection config (no conv merge, no pyramid); the ConvNeXt rows as "
                  "`mmdetection/get_flops_det.py` counts them: the detector backbone up to its merges, ConvNeXt norms "
                  "uncounted (transformers' `ConvNextLayerNorm` is no `nn.LayerNorm`), the deformable terms on each "
                  "interaction's grids and widths (the paper gives no #params for these rows). The last column is the deformable sampling "
                  "as computed (4 corners + 1 weight per point and value channel), which the convention's `5hwKC` term "
                  "approximates with the full width C instead of the value width.", '',
                  '| model | params (M) | paper (M) | diff | GMACs | paper (G) | diff | sampling as computed (G) |',
                  '|---|---|---|---|---|---|---|---|']
        for r in results['cost']:
            params_diff = f'{100 * (r["params_m"] / r["paper_params_m"] - 1):+.2f}%' if r['paper_params_m'] else '-'
            lines.append(f'| {r["name"]} | {r["params_m"]:.2f} | {r["paper_params_m"] or "-"} | '
                         f'{params_diff} | {r["gmacs"]:.1f} | '
                         f'{r["paper_gmacs"]} | {100 * (r["gmacs"] / r["paper_gmacs"] - 1):+.2f}% | '
                         f'{r["sampling_actual"]:.2f} |')
        lines.append('')
    if results.get('speed'):
        lines += ['## Speed and memory', '',
                  'Batch 1 latency (median; the two models alternated in one process, same threads), '
                  'throughput at the given batch, and peak memory of one pass from a fresh process '
                  '(CPU: growth of the resident-set high-water mark). Ratios are PIIP / baseline '
                  '(throughput: PIIP / baseline, higher is better); FLOP ratio in the paper convention.', '',
                  '| PIIP | baseline | FLOP ratio | fwd (s) | fwd ratio | fwd+bwd (s) | fwd+bwd ratio | '
                  'throughput (img/s, batch) | peak MB fwd | peak MB fwd+bwd |',
                  '|---|---|---|---|---|---|---|---|---|---|']
        for r in results['speed']:
            lines.append(
                f'| {r["name"]} | {r["baseline"]} | {r["flop_ratio"]:.2f} | {r["piip_fwd_s"]:.3f} / '
                f'{r["baseline_fwd_s"]:.3f} | **{r["fwd_ratio"]:.2f}** | {r["piip_train_s"]:.2f} / '
                f'{r["baseline_train_s"]:.2f} | {r["train_ratio"]:.2f} | {r["piip_throughput"]:.2f} / '
                f'{r["baseline_throughput"]:.2f} ({r["batch"]}) | {r["piip_eval_mb"]:.0f} / {r["baseline_eval_mb"]:.0f} | '
                f'{r["piip_train_mb"]:.0f} / {r["baseline_train_mb"]:.0f} |')
        lines += ['', '![latency vs FLOPs](latency_vs_flops.png)', '']
    if results.get('checkpointing'):
        lines += ['## Training memory: gradient checkpointing', '',
                  "`model.set_grad_checkpointing(mode)`: `'interactions'` recomputes the interaction units in the "
                  "backward, `'blocks'` the branch layers, `'all'` (or `True`) both. Peak memory of one fwd+bwd at "
                  'batch 1 from a fresh process (as in the speed table), against the baseline without checkpointing; '
                  'fwd+bwd time: median of the modes alternated on one model, ratio to no checkpointing.', '',
                  '| PIIP detector | mode | peak MB fwd+bwd | vs baseline | fwd+bwd (s) | vs none |',
                  '|---|---|---|---|---|---|']
        for r in results['checkpointing']:
            for mode, m in r['modes'].items():
                lines.append(f'| {r["name"]} | {mode} | {m["peak_mb"]:.0f} | {m["peak_vs_baseline"]:.2f}x '
                             f'{r["baseline"]} ({r["baseline_peak_mb"]:.0f} MB) | {m["train_s"]:.2f} | '
                             f'{m["time_vs_none"]:.2f}x |')
        lines.append('')
    if results.get('compile'):
        lines += compile_report(results['compile'])
    if results.get('deform'):
        d = results['deform']
        lines += ['## Deformable sampling', '',
                  'The op alone at the PIIP-TSB 1120/896/448 injector shapes (16 heads, 4 points, value ratio 0.5), '
                  "ours against the plain reference (Deformable DETR's `ms_deform_attn_core_pytorch` formulation, the "
                  "tests' oracle); medians of alternated runs; peak memory: the most tensor storage alive at once during one forward+backward (inputs excluded), counted op by op.", '',
                  '| shape | fwd ms (ours / ref) | speedup | fwd+bwd ms (ours / ref) | speedup | peak MB (ours / ref) '
                  '| kernels alone (ms): grid_sample / its backward | backward kernel / reference fwd+bwd '
                  '| fwd+bwd speedup possible on them |',
                  '|---|---|---|---|---|---|---|---|---|']
        for r in d['rows']:
            lines.append(f'| {r["name"]} | {r["ours_fwd_ms"]:.2f} / {r["reference_fwd_ms"]:.2f} | {r["speedup_fwd"]:.2f}x | '
                         f'{r["ours_fwd_bwd_ms"]:.2f} / {r["reference_fwd_bwd_ms"]:.2f} | {r["speedup_fwd_bwd"]:.2f}x | '
                         f'{r["ours_peak_mb"]:.1f} / {r["reference_peak_mb"]:.1f} | {r["sample_kernel_ms"]:.2f} / '
                         f'{r["backward_kernel_ms"]:.2f} | {100 * r["backward_kernel_share_of_reference"]:.0f}% | '
                         f'{r["kernel_floor_speedup"]:.2f}x |')
        lines += ['', 'The kernels run alone on contiguous inputs, alternated with the two ops in the same rounds. '
                      "`grid_sampler_2d_backward` computes the value gradient (a scatter) and the location gradient; the "
                      "reference runs it too (second-last column: its share of the reference's time). The last "
                      "column is the reference's forward+backward time over two `grid_sample` runs plus one backward "
                      'kernel, per round: the most a formulation on these kernels that does not keep its samples for '
                      'the backward (keeping them costs more memory than the reference) could gain, with everything '
                      'else free. Every pure-PyTorch scatter measured in place of the backward kernel was slower (see '
                      '`deform_sampling.py`).']
        s = d['share']
        lines += ['', f'In {s["model"]}: the sampling takes {100 * s["time_share"]:.1f}% of the forward time for '
                      f'{100 * s["flop_share"]:.2f}% of the MACs ({s["sampling_gmacs"]:.2f} of {s["total_gmacs"]:.0f} G).', '']
    if results.get('breakdown'):
        b = results['breakdown']
        lines += ['## Where the ImageNet PIIP-TSB forward spends its time', '']
        if 'unhooked' in b:
            lines += breakdown_floor_report(b)
        lines += [f"{b['model']}, batch 1, hooks on modules (they add a little time); {b['baseline']}'s whole forward "
                  f"for scale: {1e3 * b['baseline_fwd_s']:.0f} ms. Rows starting with 'interactions:' are parts of the "
                  "interaction units; the deformable attention row includes its Linear layers and its sampling.", '',
                  '| component | ms per forward | share of PIIP | GMACs (matmuls) |', '|---|---|---|---|']
        total_ms = 1e3 * b['piip_fwd_s']
        for key, c in b['components'].items():
            lines.append(f"| {key} | {c['ms']:.1f} | {100 * c['ms'] / total_ms:.0f}% | "
                         f"{c['gmacs']:.2f} |" if c['gmacs'] else f"| {key} | {c['ms']:.1f} | {100 * c['ms'] / total_ms:.0f}% | |")
        alone = b['kernels_alone_ms']
        branches = ('the branches alone (without hooks)' if 'unhooked' in b else 'the branch blocks as measured')
        lines += [f"| whole PIIP forward (median, hooks on) | {total_ms:.1f} | 100% | |", '',
                  "A floor: the interaction units' kernels each run alone at its in-model input, cache-hot, best of "
                  'several, take ' + ', '.join(f'{kind} {ms:.1f} ms' for kind, ms in alone.items())
                  + f' ({sum(alone.values()):.1f} ms, against {b["components"]["interaction units"]["ms"]:.0f} ms '
                  f'for the units in the model). With {branches}, PIIP-TSB could not run faster '
                  f"than {b['floor_ratio']:.2f}x {b['baseline']} even if those kernels ran at that speed inside the "
                  'model and the offset/weight projection, softmax, weighted sum over points, GELU, residuals and '
                  'layout changes cost nothing.', '']
    path.write_text('\n'.join(lines) + '\n')


def breakdown_floor_report(b: Dict) -> List[str]:
    """The breakdown's unhooked timings and the interaction units' operator profile, as report lines."""
    u = b['unhooked']
    ops = b['unit_ops']
    shown, rest = list(ops.items())[:14], list(ops.values())[14:]
    return [f"Without hooks, the three alternated ({b['model']}; the same model with its interaction units passing "
            f"tokens through; {b['baseline']}): {1e3 * u['piip_s']:.0f} ms, {1e3 * u['branches_alone_s']:.0f} ms, "
            f"{1e3 * u['baseline_s']:.0f} ms: PIIP {u['piip_ratio']:.2f}x, its branches alone "
            f"{u['branches_alone_ratio']:.2f}x {b['baseline']}.", '',
            'Operators the interaction units call, one forward under torch.profiler (CPU time; the profiler adds a '
            'few microseconds per call):', '',
            '| operator | calls | ms |', '|---|---|---|',
            *(f"| `{name}` | {op['calls']} | {op['ms']:.2f} |" for name, op in shown),
            f"| {len(rest)} others | {sum(op['calls'] for op in rest)} | {sum(op['ms'] for op in rest):.2f} |", '',
            f"A floor from the matrix products: the branches alone plus the units' matrix products as profiled "
            f"({1e3 * b['unit_matmul_s']:.0f} ms: " + ', '.join(f'`{name}`' for name in ops if name in MATMUL_OPS)
            + f") are {b['matmul_floor_ratio']:.2f}x {b['baseline']}, before any of the units' other operators.", '']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=str(HERE / 'results'), help='output folder')
    parser.add_argument('--quick', action='store_true', help='small stand-ins of every section (smoke run)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads (default 2)')
    parser.add_argument('--repeats', type=int, default=None, help='timing rounds (default 5, quick 1)')
    parser.add_argument('--sections', default='cost,speed,checkpointing,compile,deform,breakdown',
                        help='comma-separated: cost, speed, checkpointing, compile, deform, breakdown')
    parser.add_argument('--device', default=None,
                        help='cuda or cpu: the device run instead of the sections (bf16, eager and compiled, '
                             'batch 1 and a throughput batch; see device_run.py)')
    parser.add_argument('--update', action='store_true',
                        help='keep the other sections of an existing results.json (rerun only --sections)')
    parser.add_argument('--only', default='',
                        help="comma-separated starts of PIIP model names: measure only those rows of the speed and "
                             "checkpointing sections (e.g. 'PIIP-SBL,PIIP-TSBL'); with --update the other rows stay")
    parser.add_argument('--probe', nargs=3, metavar=('PAIR', 'ROLE', 'MODE'), help=argparse.SUPPRESS)
    parser.add_argument('--pair', nargs=2, metavar=('SECTION', 'PAIR'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 5)
    if args.pair:
        measure = dict(speed=speed_pair, checkpointing=checkpointing_pair)[args.pair[0]]
        print(json.dumps(measure(int(args.pair[1]), args.quick, repeats, args.threads)))
        return
    if args.probe:
        print(json.dumps(memory_probe(int(args.probe[0]), args.probe[1], args.probe[2], args.quick)))
        return
    if args.device:
        device_main(args.device, args.quick, args.repeats, Path(args.out), ' '.join(sys.argv[1:]))
        return
    sections = set(args.sections.split(','))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results = dict(command='python benchmarks/run.py ' + ' '.join(sys.argv[1:]), threads=args.threads,
                   device=device().type, torch=torch.__version__)
    if args.update and (out / 'results.json').is_file():
        previous = json.loads((out / 'results.json').read_text())
        results = dict(previous, **{k: v for k, v in results.items() if k != 'command'})
        results['command'] = f'{previous["command"]}; then python benchmarks/run.py ' + ' '.join(sys.argv[1:])

    def save(section: str, rows) -> None:
        """Write what has been measured so far: a long run that dies still leaves its finished rows."""
        results[section] = rows
        (out / 'results.json').write_text(json.dumps(results, indent=1))
        report(results, out / 'report.md')

    if 'cost' in sections:
        save('cost', cost_section(args.quick))
    only = [prefix for prefix in args.only.split(',') if prefix]
    if 'speed' in sections:
        speed = speed_section(args.quick, repeats, args.threads, lambda rows: save('speed', rows),
                              only, results.get('speed', []))
        plot(speed, out / 'latency_vs_flops.png')
    if 'checkpointing' in sections:
        checkpointing_section(args.quick, repeats, args.threads, lambda rows: save('checkpointing', rows),
                              only, results.get('checkpointing', []))
    if 'compile' in sections:
        save('compile', compile_section(args.quick, repeats))
    if 'deform' in sections:
        save('deform', deform_section(args.quick, repeats))
    if 'breakdown' in sections:
        save('breakdown', time_breakdown(args.quick, repeats))
    print(f'wrote {out / "report.md"}')


if __name__ == '__main__':
    main()
