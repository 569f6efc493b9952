"""Layers against plain reference implementations."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from piip_timm.layers import Attention, DeformableCrossAttention, deform_sample


def grid_sample_reference(value, value_hw, locations, weights):
    """Deformable DETR's ms_deform_attn_core_pytorch for one level: the oracle."""
    batch, _, heads, head_dim = value.shape
    height, width = value_hw
    _, queries, _, points, _ = locations.shape
    images = value.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
    grid = (2 * locations - 1).transpose(1, 2).reshape(batch * heads, queries, points, 2)
    sampled = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    weights = weights.transpose(1, 2).reshape(batch * heads, 1, queries, points)
    out = (sampled * weights).sum(-1).view(batch, heads * head_dim, queries)
    return out.transpose(1, 2)


@pytest.mark.parametrize('shape', [(2, 5, 7, 3, 4, 11, 4), (1, 1, 1, 2, 3, 5, 2), (2, 9, 4, 4, 8, 30, 3)])
def test_deform_sample_matches_grid_sample_including_outside_points(shape):
    batch, height, width, heads, head_dim, queries, points = shape
    g = torch.Generator().manual_seed(sum(shape))
    value = torch.randn(batch, height * width, heads, head_dim, dtype=torch.float64, generator=g, requires_grad=True)
    locations = (torch.rand(batch, queries, heads, points, 2, dtype=torch.float64, generator=g) * 1.8 - 0.4)
    locations.requires_grad_()
    weights = torch.rand(batch, queries, heads, points, dtype=torch.float64, generator=g).softmax(-1)
    weights.requires_grad_()
    assert ((locations < 0) | (locations > 1)).any()
    ours = deform_sample(value, (height, width), locations, weights)
    ref = grid_sample_reference(value, (height, width), locations, weights)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)
    cotangent = torch.randn_like(ref)
    ours_grads = torch.autograd.grad(ours, (value, locations, weights), cotangent)
    ref_grads = torch.autograd.grad(ref, (value, locations, weights), cotangent)
    for a, b in zip(ours_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


def test_deform_attention_initial_sampling_pattern():
    attn = DeformableCrossAttention(64, num_heads=8, num_points=4, value_ratio=0.5)
    bias = attn.sampling_offsets.bias.view(8, 4, 2)
    assert torch.equal(bias[0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]))
    assert torch.allclose(bias[2], torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]]), atol=1e-6)
    assert attn.value_proj.out_features == 32 and attn.head_dim == 4
    with pytest.raises(ValueError, match='divisible by num_heads'):
        DeformableCrossAttention(60, num_heads=8, value_ratio=0.5)


def naive_window_attention(attn, x, window, pad_qkv):
    """Pad, then attend inside every window with an explicit softmax; crop; project."""
    batch, height, width, dim = x.shape
    ph, pw = -height % window, -width % window
    if pad_qkv:
        qkv = F.pad(attn.qkv(x), (0, 0, 0, pw, 0, ph))
    else:
        qkv = attn.qkv(F.pad(x, (0, 0, 0, pw, 0, ph)))
    out = torch.zeros(batch, height + ph, width + pw, dim, dtype=x.dtype)
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    for i in range(0, height + ph, window):
        for j in range(0, width + pw, window):
            tokens = qkv[:, i:i + window, j:j + window].reshape(batch, window * window, 3, heads, head_dim)
            q, k, v = tokens.permute(2, 0, 3, 1, 4)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
            y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, window, window, dim)
            out[:, i:i + window, j:j + window] = y
    return attn.proj(out[:, :height, :width])


@pytest.mark.parametrize('padding', ['tokens', 'qkv'])
@pytest.mark.parametrize('grid', [(6, 9), (8, 8), (5, 3)])
def test_windowed_attention_matches_explicit_windows(padding, grid):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True, window_size=4, window_padding=padding).double()
    x = torch.randn(2, *grid, 32, dtype=torch.float64)
    expected = naive_window_attention(attn, x, 4, pad_qkv=padding == 'qkv')
    assert torch.allclose(attn(x), expected, atol=1e-12)


def test_global_attention_takes_tokens_or_grids():
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 3, 5, 32)
    assert torch.allclose(attn(x), attn(x.flatten(1, 2)).view(2, 3, 5, 32), atol=1e-6)


def test_full_width_qk_norm_normalises_before_the_head_split():
    from timm.layers import RmsNorm
    attn = Attention(24, num_heads=3, qk_norm=True, norm_layer=RmsNorm).double()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    q, k, v = attn.qkv(x).chunk(3, -1)
    q, k = attn.q_norm(q), attn.k_norm(k)  # over all 24 channels
    split = lambda t: t.view(2, 7, 3, 8).transpose(1, 2)  # noqa: E731
    scores = (split(q) @ split(k).transpose(-2, -1)) / math.sqrt(8)
    expected = attn.proj((scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(2, 7, 24))
    assert attn.q_norm.weight.shape == (24,)
    assert torch.allclose(attn(x), expected, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 2), height=st.integers(1, 12), width=st.integers(1, 12), heads=st.integers(1, 4),
       head_dim=st.integers(1, 8), queries=st.integers(1, 20), points=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_deform_sample_fp32_matches_the_oracle_on_random_shapes(batch, height, width, heads, head_dim, queries,
                                                                points, seed):
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(batch, height * width, heads, head_dim, generator=g, requires_grad=True)
    locations = (torch.rand(batch, queries, heads, points, 2, generator=g) * 1.8 - 0.4).requires_grad_()
    weights = torch.rand(batch, queries, heads, points, generator=g).softmax(-1).requires_grad_()
    ours = deform_sample(value, (height, width), locations, weights)
    ref = grid_sample_reference(value, (height, width), locations, weights)
    scale = ref.abs().max().clamp(min=1e-6)
    assert (ours - ref).abs().max() <= 1e-5 * scale
    cotangent = torch.randn(ref.shape, generator=g)
    for a, b in zip(torch.autograd.grad(ours, (value, locations, weights), cotangent),
                    torch.autograd.grad(ref, (value, locations, weights), cotangent)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max().clamp(min=1e-6)


@pytest.mark.parametrize('needs_grad', [(True, False, False), (False, True, False), (False, False, True),
                                        (False, True, True)])
def test_deform_sample_gradient_of_each_input_alone_matches_the_oracle(needs_grad):
    """The hand-written backward computes only what is asked for; each part must still be right."""
    g = torch.Generator().manual_seed(3)
    value = torch.randn(2, 7 * 6, 4, 5, dtype=torch.float64, generator=g)
    locations = torch.rand(2, 9, 4, 3, 2, dtype=torch.float64, generator=g) * 1.6 - 0.3
    weights = torch.rand(2, 9, 4, 3, dtype=torch.float64, generator=g).softmax(-1)
    inputs = [t.requires_grad_(flag) for t, flag in zip((value, locations, weights), needs_grad)]
    wanted = [t for t in inputs if t.requires_grad]
    cotangent = torch.randn(2, 9, 20, dtype=torch.float64, generator=g)
    ours = torch.autograd.grad(deform_sample(value, (7, 6), locations, weights), wanted, cotangent)
    ref = torch.autograd.grad(grid_sample_reference(value, (7, 6), locations, weights), wanted, cotangent)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_deform_sample_takes_queries_contiguous_layouts_without_changing_results():
    """DeformableCrossAttention hands over (B, heads, P, 2, Q) storage viewed as (B, Q, heads, P, 2)."""
    g = torch.Generator().manual_seed(4)
    value = torch.randn(1, 5 * 8, 2, 3, generator=g)
    planes = torch.rand(1, 2, 4, 2, 11, generator=g)
    point_weights = torch.rand(1, 2, 4, 11, generator=g).softmax(2)
    locations, weights = planes.permute(0, 4, 1, 2, 3), point_weights.permute(0, 3, 1, 2)
    assert not locations.is_contiguous()
    ours = deform_sample(value, (5, 8), locations, weights)
    assert torch.allclose(ours, deform_sample(value, (5, 8), locations.contiguous(), weights.contiguous()))
    assert torch.allclose(ours, grid_sample_reference(value, (5, 8), locations, weights), atol=1e-6)


def test_deform_sample_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    value = torch.randn(1, 12, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    # keep points away from pixel centres, where bilinear interpolation has kinks
    locations = ((torch.rand(1, 5, 2, 2, 2, dtype=torch.float64, generator=g) * 1.4 - 0.2) * 0.97 + 0.011)
    locations.requires_grad_()
    weights = torch.rand(1, 5, 2, 2, dtype=torch.float64, generator=g).softmax(-1).requires_grad_()
    assert torch.autograd.gradcheck(lambda v, l, w: deform_sample(v, (3, 4), l, w), (value, locations, weights))


def test_deform_sample_compiles_in_one_graph():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    value = torch.randn(2, 30, 4, 8, generator=g, requires_grad=True)
    locations = torch.rand(2, 7, 4, 4, 2, generator=g, requires_grad=True)
    weights = torch.rand(2, 7, 4, 4, generator=g).softmax(-1).requires_grad_()
    compiled = torch.compile(deform_sample, backend='aot_eager', fullgraph=True)
    out = compiled(value, (5, 6), locations, weights)
    out.sum().backward()
    grads = [t.grad.clone() for t in (value, locations, weights)]
    for t in (value, locations, weights):
        t.grad = None
    expected = deform_sample(value, (5, 6), locations, weights)
    expected.sum().backward()
    assert torch.allclose(out, expected)
    assert all(torch.allclose(a, t.grad) for a, t in zip(grads, (value, locations, weights)))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_deform_attention_under_autocast_stays_close_to_fp32(dtype):
    torch.manual_seed(0)
    attn = DeformableCrossAttention(64, num_heads=4, num_points=4, value_ratio=0.5)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.02)
        attn.attention_weights.weight.normal_(0, 0.05)
    query, feat = torch.randn(2, 6 * 5, 64), torch.randn(2, 7 * 9, 64)
    ref = attn(query, (6, 5), feat, (7, 9))
    with torch.autocast('cpu', dtype=dtype):
        low = attn(query, (6, 5), feat, (7, 9))
    assert low.dtype == dtype
    assert (low.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    low.float().sum().backward()  # and it trains
    assert attn.value_proj.weight.grad is not None
