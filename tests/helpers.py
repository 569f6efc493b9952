"""Small PIIP models with the structure of the registered variants, for tests that run the model."""
from dataclasses import replace
from typing import Optional

import torch
from timm.layers import DropPath

from piip_timm.piip import PIIP, even_block_ranges
from piip_timm.variants import VARIANTS

# Per-branch (embed_dim, num_heads) of the shrunken models, coarse to fine: GroupNorm(32) divides all.
TINY_WIDTHS = ((96, 3), (64, 2), (32, 1), (32, 2))


def tiny_branches(branches, interactions: int = 2, img_sizes=None, window_size: Optional[int] = -1):
    """Narrow, shallow twins of ``branches`` (same families, flags and block grouping)."""
    n = len(branches)
    img_sizes = img_sizes or [32 * (i + 2) for i in range(n)]  # 64, 96, 128, ... on the finest branch last
    out = []
    for i, b in enumerate(branches):
        dim, heads = TINY_WIDTHS[i]
        sizes = {end - start + 1 for start, end in b.block_ranges}
        per_step = sizes.pop() if len(sizes) == 1 else 1
        depth = per_step * interactions
        changes = dict(embed_dim=dim, num_heads=heads, depth=depth, img_size=img_sizes[i],
                       pos_embed_grid=4 if b.pos_embed_grid else None,
                       block_ranges=even_block_ranges(depth, interactions))
        if window_size != -1:
            changes['window_size'] = window_size
        elif b.window_size:
            changes['window_size'] = 2
        out.append(replace(b, **changes))
    return out


def tiny_variant(
        name: str,
        depth: int = 2,
        img_sizes=None,
        window_size: Optional[int] = -1,
        **kwargs,
) -> PIIP:
    """The registered variant ``name`` with narrow, shallow branches (same families, heads, merge)."""
    spec = VARIANTS[name]
    branches = tiny_branches(spec.branches, depth, img_sizes, window_size)
    interaction = replace(spec.interaction, num_heads=4)
    options = dict(interaction=interaction, head=spec.head, merge=spec.merge, num_classes=7)
    options.update(kwargs)
    return PIIP(branches, **options)


def disable_drop_path(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, DropPath):
            module.drop_prob = 0.0
    return model


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere (zero-initialised gammas and offsets included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def branch_summary(cfg) -> dict:
    """A branch config in JSON form with the effective per-block windows and pos-embed grid (two
    configs that build the same branch compare equal, however they spell it)."""
    from dataclasses import asdict
    summary = asdict(cfg)
    summary.update(block_ranges=[list(r) for r in cfg.block_ranges])
    if cfg.kind == 'convnext':  # whether the unused final norm is kept is a matter of the state dict
        summary.update(dims=list(cfg.dims), depths=list(cfg.depths))
        del summary['head_norm']
    else:
        summary.update(window_size=list(cfg.block_windows()), pos_embed_grid=cfg.grid)
    return summary


def architecture(model: PIIP) -> dict:
    """What a built PIIP model is made of, as JSON: branches, interactions, heads and tensor shapes."""
    from dataclasses import asdict
    return dict(
        branches=[branch_summary(b) for b in model.branch_cfgs], interaction=asdict(model.interaction_cfg),
        head=model.head_style, merge=model.merge_style, num_classes=model.num_classes,
        pyramid=list(model.pyramid.level_names) if model.pyramid is not None else None,
        global_pool=model.global_pool, shapes={k: list(v.shape) for k, v in model.state_dict().items()})


def reference_rel_pos_resize(table: torch.Tensor, dst: int) -> torch.Tensor:
    """BEiT's checkpoint loader recipe, written out with SciPy (independently of piip_timm.rel_pos_resize):
    drop the 3 class rows, bisect the geometric ratio, spline-interpolate each head on the warped offsets.
    ``interp2d(kind='cubic')`` on a grid was FITPACK's s=0 spline, i.e. ``RectBivariateSpline``."""
    import numpy as np
    from scipy.interpolate import RectBivariateSpline
    src = int((table.shape[0] - 3) ** 0.5)
    grid = table[:-3]
    if src == dst:
        return grid
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    distances, cur = [], 1.0
    for i in range(src // 2):
        distances.append(cur)
        cur += q ** (i + 1)
    x = np.array([-d for d in reversed(distances)] + [0.0] + distances)
    t = dst // 2.0
    targets = np.arange(-t, t + 0.1, 1.0)
    columns = [RectBivariateSpline(x, x, grid[:, h].reshape(src, src).double().numpy(), kx=3, ky=3, s=0)(
        targets, targets).reshape(-1, 1) for h in range(table.shape[1])]
    return torch.from_numpy(np.concatenate(columns, axis=1)).to(table.dtype)


def benchmark_models():
    """benchmarks/models.py (not a package) as a module: the paper's cost-table models."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        'piip_benchmark_models', Path(__file__).resolve().parents[1] / 'benchmarks' / 'models.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
