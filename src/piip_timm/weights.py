"""Loading weight files safely and strictly."""
import argparse
import contextlib
import os
import pickle
from typing import Dict, Iterator, Mapping, Union

import torch
from torch import nn

__all__ = ['load_checkpoint_file', 'load_strict', 'allow_training_metadata']

# Plain data that training scripts store beside the weights (DeiT-style checkpoints keep their
# argparse ``args``). Unpickling it only sets attributes; nothing else is allowed.
TRAINING_METADATA_GLOBALS = [argparse.Namespace]


@contextlib.contextmanager
def allow_training_metadata() -> Iterator[None]:
    """Within this block, ``torch.load(weights_only=True)`` also accepts ``argparse.Namespace``."""
    with torch.serialization.safe_globals(TRAINING_METADATA_GLOBALS):
        yield


def load_checkpoint_file(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth``/``.bin`` file unpickled with ``weights_only=True``.

    No code stored in a file ever runs: a pickle that needs anything but tensors and plain
    containers is refused.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no weight file at {path!r}.')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return load_file(path, device='cpu')
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise ValueError(f'{path!r} is not a readable safetensors file ({e}); re-download or re-convert it.') from e
    try:
        with allow_training_metadata():
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f'{path!r} was refused: it is a pickle that needs more than tensors to load ({str(e).splitlines()[0]}); '
            'only weights-only checkpoints are accepted, convert it to safetensors in a trusted environment.') from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(f'{path!r} is not a readable PyTorch checkpoint ({e}); re-download it.') from e


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """load_state_dict(strict=True) with an error that names missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mis_shaped = sorted(
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
        for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or mis_shaped:
        raise ValueError(
            'checkpoint does not match the model: '
            f'{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, '
            f'{len(mis_shaped)} with other shapes {mis_shaped[:5]}; check that the config and checkpoint belong '
            'to the same model.')
    model.load_state_dict(state_dict, strict=True)
