"""Fetching weights from the Hugging Face Hub: a bounded reachability check, branch weights
through timm's own loader, and InternViT-6B's sharded transformers checkpoint.

Everything goes through ``huggingface_hub.hf_hub_download`` (directly, or inside timm), so
``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the local cache behave as they do for any timm model.
"""
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .weights import load_checkpoint_file

__all__ = ['HubFile', 'HubUnavailableError', 'BranchSource', 'check_hub_files', 'load_branch_state_dict',
           'convert_internvit_hf_state_dict', 'INDEX_FILES']

_logger = logging.getLogger(__name__)

# Seconds the reachability check may take per repository before giving up (no retries).
DEFAULT_HUB_TIMEOUT = 10.0


class HubUnavailableError(ConnectionError):
    """The weights' Hub repository could not be reached (offline, dead or hung endpoint, missing file)."""


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str

    def __str__(self) -> str:
        return f'{self.repo_id}/{self.filename}'


def _hub_timeout() -> float:
    value = os.environ.get('PIIP_HUB_TIMEOUT')
    return float(value) if value else DEFAULT_HUB_TIMEOUT


def _how_to_load_locally(file: HubFile) -> str:
    return (f"download {file} elsewhere (https://huggingface.co/{file.repo_id}) and load it with "
            f"timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/"
            f"{os.path.basename(file.filename)}')), or put it in the Hugging Face cache and set HF_HUB_OFFLINE=1")


def check_hub_files(files: Iterable[HubFile], timeout: Optional[float] = None) -> None:
    """Fail fast, with an error that says what to do, when a needed file can neither come from the
    local cache nor from the Hub within ``timeout`` seconds (``PIIP_HUB_TIMEOUT``, default 10).

    huggingface_hub on its own retries a dead endpoint for tens of seconds per file and waits
    far longer on a hung one; this sends one metadata request per repository, without retries.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    timeout = _hub_timeout() if timeout is None else timeout
    checked_repos = set()
    for file in files:
        if isinstance(try_to_load_from_cache(file.repo_id, file.filename), str):
            continue
        if constants.HF_HUB_OFFLINE:
            raise HubUnavailableError(
                f'{file} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {_how_to_load_locally(file)}.')
        if file.repo_id in checked_repos:
            continue
        checked_repos.add(file.repo_id)
        url = hf_hub_url(file.repo_id, file.filename)
        try:
            get_hf_file_metadata(url, timeout=timeout, retry_on_errors=False)
        except EntryNotFoundError:
            continue  # the endpoint answered; the loader knows which files are optional
        except (RepositoryNotFoundError, GatedRepoError) as e:
            raise HubUnavailableError(
                f'{file.repo_id} is not accessible on {constants.ENDPOINT} ({type(e).__name__}); '
                f'{_how_to_load_locally(file)}.') from e
        except Exception as e:  # connection refused, DNS failure, timeout, 5xx, ...
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise HubUnavailableError(
                f'could not reach {constants.ENDPOINT} for {file} within {timeout:g} s ({reason}); '
                f'{_how_to_load_locally(file)}.') from e


@dataclass(frozen=True)
class BranchSource:
    """Where a branch's pretrained weights live: a timm pretrained model, or a transformers
    InternViT repository sharded with an index file."""
    timm_model: Optional[str] = None  # e.g. 'deit3_base_patch16_224.fb_in22k_ft_in1k'
    internvit_repo: Optional[str] = None  # e.g. 'OpenGVLab/InternViT-6B-224px'

    def hub_files(self) -> List[HubFile]:
        """A file whose repository must be reachable (for the fail-fast check)."""
        if self.timm_model:
            import timm
            return [HubFile(timm.models.get_pretrained_cfg(self.timm_model).hf_hub_id, 'model.safetensors')]
        return [HubFile(self.internvit_repo, name) for name in INDEX_FILES[:1]]

    def __str__(self) -> str:
        return self.timm_model or self.internvit_repo


def _load_timm_weights(name: str) -> Dict[str, torch.Tensor]:
    """A timm model's pretrained state dict through timm's own Hub loader (safetensors first)."""
    import timm
    from timm.models._hub import load_state_dict_from_hf
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f'timm has no Hub weights for {name!r}.')
    return load_state_dict_from_hf(cfg.hf_hub_id, cfg.hf_hub_filename or 'pytorch_model.bin')


# Sharded checkpoints: the index file names, preferred first.
INDEX_FILES = ('model.safetensors.index.json', 'pytorch_model.bin.index.json')


def load_sharded_state_dict(repo_id: str, keep: Optional[Callable[[str], bool]] = None) -> Dict[str, torch.Tensor]:
    """All tensors of a transformers repository whose weights are split in shards listed by an index.

    ``keep``: only the tensors whose names it accepts, read from only the shards the index lists for
    them (the other shards, e.g. a multimodal model's language model, are never downloaded).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    index_path = None
    for index_name in INDEX_FILES:
        try:
            index_path = hf_hub_download(repo_id, index_name)
            break
        except EntryNotFoundError:
            continue
    if index_path is None:
        raise FileNotFoundError(f'{repo_id} has neither {" nor ".join(INDEX_FILES)}.')
    with open(index_path) as f:
        weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f'{repo_id}/{os.path.basename(index_path)} has no weight_map.')
    if keep is not None:
        weight_map = {k: v for k, v in weight_map.items() if keep(k)}
        if not weight_map:
            raise ValueError(f'{repo_id}/{os.path.basename(index_path)} lists none of the tensors this model needs.')
    state: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        try:
            shard_path = hf_hub_download(repo_id, shard)
        except EntryNotFoundError as e:
            raise FileNotFoundError(f'{repo_id}: the index lists shard {shard!r}, which the repository does not have.') from e
        expected = {k for k, v in weight_map.items() if v == shard}
        tensors = load_checkpoint_file(shard_path) if keep is None else _load_selected(shard_path, expected)
        if set(tensors) != expected:
            raise ValueError(
                f'{repo_id}/{shard} does not hold what the index says: missing {sorted(expected - set(tensors))[:5]}, '
                f'unexpected {sorted(set(tensors) - expected)[:5]}.')
        state.update(tensors)
    return state


def _load_selected(path: str, names: set) -> Dict[str, torch.Tensor]:
    """The tensors ``names`` of a weight file (of a safetensors file, only those are read)."""
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(path, framework='pt', device='cpu') as f:
            return {k: f.get_tensor(k) for k in f.keys() if k in names}
    return {k: v for k, v in load_checkpoint_file(path).items() if k in names}


_INTERNVIT_LAYER = re.compile(r'^encoder\.layers\.(\d+)\.(.+)$')
_INTERNVIT_EMBED = {
    'embeddings.patch_embedding.weight': 'patch_embed.proj.weight',
    'embeddings.patch_embedding.bias': 'patch_embed.proj.bias',
    'embeddings.position_embedding': 'pos_embed',
    'embeddings.class_embedding': 'cls_token',
}
_INTERNVIT_BLOCK_PARAMS = re.compile(
    r'^(attn\.(qkv|q_norm|k_norm|proj)|mlp\.(fc1|fc2)|norm1|norm2)\.(weight|bias)$')


def convert_internvit_hf_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers ``InternVisionModel`` keys (OpenGVLab/InternViT-6B-224px) -> timm ViT keys."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key in _INTERNVIT_EMBED:
            out[_INTERNVIT_EMBED[key]] = value
        elif m := _INTERNVIT_LAYER.match(key):
            layer, rest = m.group(1), m.group(2)
            if rest in ('ls1', 'ls2'):
                out[f'blocks.{layer}.{rest}.gamma'] = value
            elif _INTERNVIT_BLOCK_PARAMS.match(rest):
                out[f'blocks.{layer}.{rest}'] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f'{len(unknown)} keys are not InternViT vision-encoder weights: {unknown[:8]}.')
    return out


def load_branch_state_dict(source: BranchSource) -> Dict[str, torch.Tensor]:
    """A branch's pretrained weights in timm ViT key layout."""
    if source.timm_model:
        return dict(_load_timm_weights(source.timm_model))
    return convert_internvit_hf_state_dict(load_sharded_state_dict(source.internvit_repo))
