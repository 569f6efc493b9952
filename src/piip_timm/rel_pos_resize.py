"""Resizing a BEiT relative-position-bias table the way BEiT's (and PIIP's) checkpoint loader does.

A table of side ``src`` (relative offsets -src//2..src//2 on each axis) is moved to side ``dst`` by
warping the source offsets with a geometric progression (dense near 0, sparse far out, so short-range
biases keep their resolution) and interpolating each head with the bicubic interpolating spline of
SciPy's former ``interp2d(kind='cubic')``: FITPACK's s=0 tensor-product spline (knots at the interior
data points, i.e. not-a-knot ends), evaluated at integer offsets clamped to the source range.

That spline is linear in the table, so it is computed here as ``A @ table @ A.T`` with a 1-D
interpolation matrix ``A`` built from B-spline bases in float64 (no SciPy needed).
"""
import math
from typing import List, Sequence

import torch

__all__ = ['resize_rel_pos_table', 'geometric_offsets', 'spline_interpolation_matrix']

NUM_CLS_ROWS = 3  # cls->token, token->cls, cls->cls rows that BEiT checkpoints append to every table


def geometric_offsets(src_size: int, dst_size: int) -> List[float]:
    """Source offsets after the warp: -d_{n-1}..-d_0, 0, d_0..d_{n-1} with d_k = sum_{i<=k} q^i.

    q is found by bisection in [1.01, 1.5] so that 1 + q + ... + q^(n-1) reaches dst_size // 2
    (n = src_size // 2), with exactly the original's midpoints and stopping rule.
    """
    half = src_size // 2
    left, right = 1.01, 1.5
    q = left
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** half) / (1.0 - q) > dst_size // 2:
            right = q
        else:
            left = q
    distances, cur = [], 1.0
    for i in range(half):
        distances.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(distances)] + [0.0] + distances


def _bspline_basis(knots: torch.Tensor, points: torch.Tensor, degree: int) -> torch.Tensor:
    """(P, len(knots) - degree - 1) values of the B-spline basis at ``points`` (Cox-de Boor)."""
    t = knots[None, :]
    u = points[:, None]
    basis = ((u >= t[:, :-1]) & (u < t[:, 1:])).to(points.dtype)
    # The right end belongs to the last non-empty interval.
    last = int(torch.nonzero(knots[:-1] < knots[-1]).max())
    basis[points == knots[-1], last] = 1.0
    for d in range(1, degree + 1):
        left_den = t[:, d:-1] - t[:, :-d - 1]
        right_den = t[:, d + 1:] - t[:, 1:-d]
        left = torch.where(left_den > 0, (u - t[:, :-d - 1]) / left_den.clamp_min(1e-300), 0.0)
        right = torch.where(right_den > 0, (t[:, d + 1:] - u) / right_den.clamp_min(1e-300), 0.0)
        basis = left * basis[:, :-1] + right * basis[:, 1:]
    return basis


def spline_interpolation_matrix(source: Sequence[float], target: Sequence[float]) -> torch.Tensor:
    """(len(target), len(source)) float64 matrix mapping values at ``source`` (increasing, >= 4
    points) to the not-a-knot cubic interpolating spline at ``target`` (clamped to the source range)."""
    x = torch.tensor(source, dtype=torch.float64)
    if x.numel() < 4 or not bool((x[1:] > x[:-1]).all()):
        raise ValueError(f'cubic spline interpolation needs >= 4 increasing points, got {list(source)}.')
    knots = torch.cat((x[:1].repeat(4), x[2:-2], x[-1:].repeat(4)))
    collocation = _bspline_basis(knots, x, 3)
    u = torch.tensor(target, dtype=torch.float64).clamp(x[0], x[-1])
    evaluation = _bspline_basis(knots, u, 3)
    return torch.linalg.solve(collocation.T, evaluation.T).T


def resize_rel_pos_table(table: torch.Tensor, dst_size: int, num_cls_rows: int = NUM_CLS_ROWS) -> torch.Tensor:
    """A pretrained ((src^2 + num_cls_rows), heads) table -> (dst^2, heads) for a window of (dst + 1) // 2.

    The class-token rows are dropped (windowed PIIP branches have no class token); a table of the
    right side only loses them. ``dst_size`` is 2 * window - 1.
    """
    rows, heads = table.shape
    src_size = int(math.sqrt(rows - num_cls_rows))
    if src_size * src_size + num_cls_rows != rows:
        raise ValueError(f'a relative position table with {rows} rows is not a square grid plus '
                         f'{num_cls_rows} class-token rows.')
    grid = table[:rows - num_cls_rows]
    if src_size == dst_size:
        return grid.clone()
    half = dst_size // 2
    interp = spline_interpolation_matrix(geometric_offsets(src_size, dst_size),
                                         [float(i) for i in range(-half, half + 1)])
    per_head = grid.detach().to(torch.float64).T.reshape(heads, src_size, src_size)  # rows: dh, columns: dw
    resized = interp @ per_head @ interp.T
    return resized.reshape(heads, -1).T.to(table.dtype).contiguous()
