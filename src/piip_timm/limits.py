"""Predicting when an input cannot fit, before allocating it."""
import os
from typing import Optional

import torch

__all__ = ['available_memory', 'check_fits']

# Below this, a forward is not worth a memory probe.
_PROBE_ABOVE_BYTES = 1 << 30


def _proc_field(path: str, name: str) -> Optional[int]:
    """A ``name: <n> kB`` field of a /proc file, in bytes (None when absent)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:
            if line.startswith(name + ':'):
                return int(line.split()[1]) * 1024
    return None


def _address_space_left() -> Optional[int]:
    """Bytes this process may still map under its address-space limit (``ulimit -v``); None when unlimited."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    used = _proc_field('/proc/self/status', 'VmSize')
    if soft == resource.RLIM_INFINITY or used is None:
        return None
    return max(soft - used, 0)


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes a new allocation can use now: free GPU memory; on CPU the smaller of Linux's MemAvailable and
    what the process's address-space limit leaves; None when unknown."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    if device.type != 'cpu':
        return None
    known = [b for b in (_proc_field('/proc/meminfo', 'MemAvailable'), _address_space_left()) if b is not None]
    return min(known) if known else None


def check_fits(required_bytes: int, device: torch.device, what: str) -> None:
    """Raise a clear error when the activations a forward must hold at once cannot fit in memory.

    ``required_bytes`` must be a lower bound (tensors the forward has to hold together), so the
    error never fires for an input that could run. Skipped while tracing (compile, export).
    """
    if required_bytes < _PROBE_ABOVE_BYTES or torch.compiler.is_compiling() or device.type == 'meta':
        return
    available = available_memory(device)
    if available is not None and required_bytes > available:
        raise ValueError(
            f'{what} needs at least {required_bytes / 2 ** 30:.1f} GiB of activations at once, more than the '
            f'{available / 2 ** 30:.1f} GiB available on {device}; use a smaller image, batch or img_size.')
