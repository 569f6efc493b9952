"""Original checkpoint + config in, timm-style ``model.safetensors`` + ``config.json`` out."""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from torch import nn

from .config_file import read_backbone_config
from .original import from_original, translate_original_config
from .piip import PIIP
from .variants import _cfg, VariantCfg, entry_point_name, model_args

__all__ = ['convert_checkpoint']


def _pretrained_cfg(model: PIIP, returned_levels: Any) -> dict:
    arch = VariantCfg(branches=model.branch_cfgs, interaction=model.interaction_cfg, head=model.head_style or 'merged',
                      merge=model.merge_style, out_interactions=model.out_interactions)
    cfg = _cfg(arch, architecture=entry_point_name(model), num_classes=model.num_classes)
    if model.head_style is None:
        cfg.update(classifier=None)
    if returned_levels is not None:
        names = [model.feature_info[i]['module'] for i in returned_levels]
        cfg['notes'] = (f'converted from an original PIIP detector; it returned the pyramid levels {names} '
                        f'(features_only=True, out_indices={list(returned_levels)})')
    else:
        cfg['notes'] = 'converted from an original PIIP classifier'
    return cfg


def convert_checkpoint(
        config: Union[str, os.PathLike, Mapping[str, Any]],
        task: str,
        checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
        out_dir: Union[str, os.PathLike],
        overwrite: bool = False,
        pretrained_configs: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Convert an original PIIP checkpoint into a folder timm can load (``local-dir:``), push or serve.

    The checkpoint is loaded strictly through :func:`piip_timm.from_original` (``pretrained_configs``:
    the architectures of ConvNeXt branches with other than the real model names, as there); the folder
    appears complete or not at all (written beside it, then renamed).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f'{str(out_dir)!r} exists; choose another output folder or pass overwrite=True.')
    backbone = read_backbone_config(config) if isinstance(config, (str, os.PathLike)) else dict(config)
    _, returned = translate_original_config(backbone, task, pretrained_configs)
    built = from_original(backbone, task, checkpoint=checkpoint, pretrained_configs=pretrained_configs)
    model: nn.Module = built.model if task == 'det' else built
    model.pretrained_cfg = _pretrained_cfg(model, returned)

    from safetensors import SafetensorError
    from timm.models._hub import save_for_hf
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    try:
        try:
            save_for_hf(model, str(staging), model_args=model_args(model), safe_serialization=True)
        except (OSError, SafetensorError) as e:  # disk full, file-size or quota limits, ...
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise OSError(f'could not write the converted model beside {str(out_dir)!r} ({reason}); '
                          'nothing was written; check the space and limits there and convert again.') from e
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.old.', dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
