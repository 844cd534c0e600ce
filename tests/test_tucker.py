import pytest
import torch
from torch import nn

from cc_core.compact.layers import SVDConv2d, Tucker2Conv2d
from cc_core.compact.tucker import (fold, hooi_tucker2, hosvd_tucker2, matrix_svd, mode_product,
                                    unfold)
from tests.helpers import rel_err


def test_unfold_fold_inverse_and_layout():
    w = torch.randn(4, 3, 2, 5)
    for mode in range(4):
        assert torch.equal(fold(unfold(w, mode), mode, tuple(w.shape)), w)
    assert torch.equal(unfold(w, 1)[2], w[:, 2].reshape(-1))


def test_mode_product_matches_einsum():
    w, m = torch.randn(4, 3, 2, 2), torch.randn(6, 3)
    assert torch.allclose(mode_product(w, m, 1), torch.einsum("oikl,ji->ojkl", w, m), atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (8, 32, 3, 3), (5, 7, 1, 1), (12, 4, 5, 3)])
def test_hosvd_exact_orthonormal_and_singular_values(shape):
    w = torch.randn(shape, dtype=torch.float64)
    d = hosvd_tucker2(w)
    assert rel_err(d.to_tensor(), w) < 1e-12
    for u in (d.u1, d.u2):
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-12)
    g1, g2 = unfold(d.core, 0), unfold(d.core, 1)
    # all-orthogonality: slices of the core are mutually orthogonal in both modes
    assert torch.allclose(g1 @ g1.T, torch.diag(d.s1 ** 2), atol=1e-10)
    assert torch.allclose(g2 @ g2.T, torch.diag(d.s2 ** 2), atol=1e-10)
    assert torch.allclose(d.s1, torch.linalg.svdvals(unfold(w, 0)), atol=1e-10)
    assert torch.allclose(d.s2, torch.linalg.svdvals(unfold(w, 1)), atol=1e-10)


def _convs():
    return [nn.Conv2d(16, 24, 3, 1, 1, bias=False), nn.Conv2d(16, 32, 3, 2, 1, bias=True),
            nn.Conv2d(8, 16, (3, 5), 1, (2, 4), dilation=2, bias=True),
            nn.Conv2d(16, 16, 3, 1, 1, bias=False, padding_mode="reflect")]


@pytest.mark.parametrize("conv", _convs(), ids=lambda c: repr(c))
def test_tucker2_conv_full_rank_reproduces_conv(conv):
    x = torch.randn(2, conv.in_channels, 17, 17)
    layer = Tucker2Conv2d.from_conv(conv, hosvd_tucker2(conv.weight))
    with torch.no_grad():
        assert rel_err(layer(x), conv(x)) < 1e-5


def test_tucker2_conv_parameter_count():
    conv = nn.Conv2d(64, 128, 3, bias=True)
    layer = Tucker2Conv2d.from_conv(conv, hosvd_tucker2(conv.weight).truncate(32, 16))
    r1, r2, k = 32, 16, 3
    assert sum(p.numel() for p in layer.parameters()) == r2 * 64 + r1 * r2 * k * k + r1 * 128 + 128
    assert layer.first.weight.shape == (16, 64, 1, 1) and layer.last.weight.shape == (128, 32, 1, 1)


def test_truncated_layer_equals_truncated_tensor():
    conv = nn.Conv2d(32, 32, 3, padding=1, bias=False)
    d = hosvd_tucker2(conv.weight).truncate(8, 12)
    layer = Tucker2Conv2d.from_conv(conv, d)
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        expected = nn.functional.conv2d(x, d.to_tensor().float(), padding=1)
        assert rel_err(layer(x), expected) < 1e-5


@pytest.mark.parametrize("stride, bias", [(1, False), (2, True)])
def test_svd_conv_full_rank_reproduces_1x1(stride, bias):
    conv = nn.Conv2d(24, 40, 1, stride, bias=bias)
    layer = SVDConv2d.from_conv(conv, matrix_svd(conv.weight.reshape(40, 24)))
    x = torch.randn(2, 24, 9, 9)
    with torch.no_grad():
        assert rel_err(layer(x), conv(x)) < 1e-5
    assert sum(p.numel() for p in layer.parameters()) == 24 * (24 + 40) + (40 if bias else 0)


def test_hooi_not_worse_than_truncated_hosvd():
    w = torch.randn(24, 16, 3, 3, dtype=torch.float64)
    ranks = (8, 6)
    e_hosvd = rel_err(hosvd_tucker2(w).truncate(*ranks).to_tensor(), w)
    hooi = hooi_tucker2(w, ranks, n_iter=30)
    assert hooi.ranks == ranks
    assert rel_err(hooi.to_tensor(), w) <= e_hosvd + 1e-9
