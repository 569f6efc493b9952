"""Predicting when an input cannot fit, before allocating it."""
import os
from typing import Optional

import torch

__all__ = ['available_memory', 'check_fits']

# Below this, a forward is not worth a memory probe.
_PROBE_ABOVE_BYTES = 1 << 30


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes a new allocation can use now: free GPU memory, or Linux's MemAvailable; None when unknown."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    if device.type == 'cpu' and os.path.exists('/proc/meminfo'):
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    return None


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
