"""Timing two models fairly on a noisy machine: alternated rounds, medians, per-round ratios."""
import statistics
import time
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

__all__ = ['device', 'set_device', 'synchronize', 'alternate', 'ratio', 'forward_fn', 'train_fn']

_DEVICE: Optional[torch.device] = None  # None: a GPU if there is one
_AUTOCAST_DTYPE: Optional[torch.dtype] = None  # None: bf16 on a GPU, fp32 (no autocast) on a CPU


def set_device(name: Optional[str], autocast_dtype: Optional[torch.dtype] = None) -> None:
    """Where the timing helpers run and in which autocast dtype (None: the defaults above)."""
    global _DEVICE, _AUTOCAST_DTYPE
    if name is not None and torch.device(name).type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(f'device {name!r} was asked for but torch sees no GPU; run with --device cpu.')
    _DEVICE = torch.device(name) if name is not None else None
    _AUTOCAST_DTYPE = autocast_dtype


def device() -> torch.device:
    if _DEVICE is not None:
        return _DEVICE
    return torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu')


def synchronize() -> None:
    if device().type == 'cuda':
        torch.cuda.synchronize()


def _timed(fn: Callable[[], None]) -> float:
    """Seconds one call takes (CUDA events on a GPU, wall clock on a CPU)."""
    if device().type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(fns: Sequence[Callable[[], None]], repeats: int, warmup: int = 1) -> List[List[float]]:
    """Run the functions in turn, ``repeats`` rounds after ``warmup``: seconds per call, per function.

    Alternating cancels the slow drift of a shared machine's speed, which would otherwise bias
    whichever model was measured in the slower stretch.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    synchronize()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            times[i].append(_timed(fn))
    return times


def ratio(first: Sequence[float], second: Sequence[float]) -> float:
    """Median over rounds of first / second, both measured within the same round."""
    return statistics.median(a / b for a, b in zip(first, second))


def _autocast():
    kind = device().type
    if _AUTOCAST_DTYPE is not None:
        return torch.autocast(kind, dtype=_AUTOCAST_DTYPE)
    if kind == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return torch.autocast(kind, enabled=False)


def forward_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One inference forward (autocast as ``set_device`` chose: by default bf16 on a GPU, fp32 on a CPU)."""
    def run():
        with torch.inference_mode(), _autocast():
            model(x)
    return run


def train_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of a scalar made of every output."""
    def run():
        with _autocast():
            out = model(x)
            outs = out if isinstance(out, (list, tuple)) else [out]
            loss = sum(o.float().square().mean() for o in outs)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return run
