"""Loading weight files safely and strictly."""
import argparse
import contextlib
import logging
import os
import pickle
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Union

import torch
from torch import nn

__all__ = ['load_checkpoint_file', 'load_strict', 'complete_state_dict', 'allow_training_metadata',
           'weight_file_error']

_logger = logging.getLogger(__name__)

# Plain data that training scripts store beside the weights (DeiT-style checkpoints keep their
# argparse ``args``). Unpickling it only sets attributes; nothing else is allowed.
TRAINING_METADATA_GLOBALS = [argparse.Namespace]


@contextlib.contextmanager
def allow_training_metadata() -> Iterator[None]:
    """Within this block, ``torch.load(weights_only=True)`` also accepts ``argparse.Namespace``."""
    with torch.serialization.safe_globals(TRAINING_METADATA_GLOBALS):
        yield


# Modules whose code runs while a weight file is read: an exception raised inside them means the file
# itself could not be read, whatever its type (random bytes make the unpickler raise IndexError,
# KeyError, UnicodeDecodeError, ...).
_READER_MODULES = ('torch.serialization', 'torch._weights_only_unpickler', 'safetensors')
# What the weights-only unpickler says when a pickle asks for code (a global or a call), as opposed
# to bytes that are no pickle at all ("Unsupported operand ...").
_REFUSAL_MARKS = ('GLOBAL', 'reduce for unrecognized function')


def _exception_chain(error: BaseException) -> List[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _raised_by_reader(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get('__name__', '')
        if any(module == m or module.startswith(m + '.') for m in _READER_MODULES):
            return True
        tb = tb.tb_next
    return False


def _load_error_kind(error: BaseException) -> Optional[str]:
    """Why reading a weight file failed: ``'refused'``, ``'unreadable'``, or None if no file read failed.
    Decided from the exception chain, so it holds for errors that timm or torch re-raise as another type."""
    chain = _exception_chain(error)
    if any(isinstance(e, pickle.UnpicklingError) and any(m in str(e) for m in _REFUSAL_MARKS) for e in chain):
        return 'refused'
    if any(_raised_by_reader(e) for e in chain):
        return 'unreadable'
    return None


def _reader_words(error: BaseException) -> str:
    """The first line of the innermost error: the reader's own words, not a wrapper's advice."""
    innermost = _exception_chain(error)[-1]
    text = str(innermost).strip()
    return f'{type(innermost).__name__}: {text.splitlines()[0]}' if text else type(innermost).__name__


def weight_file_error(error: BaseException, where: str) -> Optional[ValueError]:
    """The clear error for a weight file at ``where`` that was refused (a pickle asking for code) or could
    not be read (truncated, corrupt); None if ``error`` did not come from reading a weight file."""
    kind = _load_error_kind(error)
    if kind == 'refused':
        return ValueError(
            f'the weights at {where} were refused: the file is a pickle that needs more than tensors to load '
            f'({_reader_words(error)}); only weights-only checkpoints and safetensors are accepted: convert it to '
            'safetensors in a trusted environment.')
    if kind == 'unreadable':
        return ValueError(
            f'the weights at {where} are not a readable checkpoint ({_reader_words(error)}); the file may be '
            'truncated or corrupt: delete it (or its copy in the Hugging Face cache) and download or convert it again.')
    return None


def load_checkpoint_file(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth``/``.bin`` file unpickled with ``weights_only=True``.

    No code stored in a file ever runs: a pickle that needs anything but tensors and plain
    containers is refused.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no weight file at {path!r}.')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path, device='cpu')
        with allow_training_metadata():
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        error = weight_file_error(e, repr(path))
        if error is None:
            raise
        raise error from e


def complete_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        fresh_groups: Mapping[str, Callable[[str], bool]],
) -> Dict[str, torch.Tensor]:
    """Check a converted checkpoint against the model, key by key and shape by shape.

    A group in ``fresh_groups`` that the checkpoint lacks entirely keeps the model's fresh init; one
    the checkpoint has but the model lacks entirely is dropped. Any other difference is an error
    naming the keys, so a model that loads has every tensor accounted for.
    """
    own = model.state_dict()
    state_dict = dict(state_dict)
    fresh, dropped = [], []
    heads = [k for k in own if k.startswith('head.') and k in state_dict]
    if any(state_dict[k].shape != own[k].shape for k in heads):
        # Another number of classes: the classifier starts fresh (timm drops it as well).
        state_dict.update({k: own[k] for k in heads})
        fresh.append('classifier (other num_classes)')
    for group, member in fresh_groups.items():
        ours = {k for k in own if member(k)}
        theirs = {k for k in state_dict if member(k)}
        if ours and not theirs:
            state_dict.update({k: own[k] for k in ours})
            fresh.append(group)
        elif theirs and not ours:
            for k in theirs:
                del state_dict[k]
            dropped.append(group)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    common = set(own) & set(state_dict)
    mis_shaped = sorted(f'{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}'
                        for k in common if state_dict[k].shape != own[k].shape)
    # Any floating precision converts on load; integer or boolean data in place of weights is a broken file.
    mis_typed = sorted(f'{k} {state_dict[k].dtype}' for k in common
                       if own[k].is_floating_point() and not state_dict[k].is_floating_point())
    if missing or unexpected or mis_shaped or mis_typed:
        raise ValueError(
            f'the checkpoint does not fit this model: {len(missing)} missing {missing[:6]}, '
            f'{len(unexpected)} unexpected {unexpected[:6]}, {len(mis_shaped)} of another shape {mis_shaped[:6]}, '
            f'{len(mis_typed)} not floating point {mis_typed[:6]}; '
            'check that checkpoint and model (variant, tag, resolution options) belong together.')
    if fresh:
        _logger.info(f'freshly initialised (not in the checkpoint): {", ".join(fresh)}')
    if dropped:
        _logger.info(f'not used by this model: {", ".join(dropped)}')
    return state_dict


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """load_state_dict(strict=True) after an exact key / shape / dtype check that names what differs."""
    model.load_state_dict(complete_state_dict(dict(state_dict), model, {}), strict=True)
