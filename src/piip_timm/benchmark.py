"""Timing two models fairly on a noisy machine: alternated rounds, medians, per-round ratios."""
import statistics
import time
from typing import Callable, List, Sequence

import torch
from torch import nn

__all__ = ['device', 'synchronize', 'alternate', 'ratio', 'forward_fn', 'train_fn']


def device() -> torch.device:
    return torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu')


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], None]) -> float:
    """Seconds one call takes (CUDA events on a GPU, wall clock on a CPU)."""
    if torch.cuda.is_available():
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
    if torch.cuda.is_available():
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return torch.autocast('cpu', enabled=False)


def forward_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One inference forward (bf16 autocast on a GPU, fp32 on a CPU)."""
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
