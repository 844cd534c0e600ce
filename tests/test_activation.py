"""Activation-aware Tucker-2 / SVD (cc_core.compact.activation) and clean_compact(method="activation")."""
import pytest
import torch
from torch import nn

from cc_core import clean_compact, count_params
from cc_core.compact.activation import (activation_svd, activation_tucker2, conv_moments, input_whitening,
                                        orthonormal_svd, orthonormal_tucker2)
from cc_core.compact.tucker import hosvd_tucker2
from cc_core.errors import ConfigError
from tests.test_compact import spread_resnet18

F64 = torch.float64


def correlated_inputs(n: int = 32, channels: int = 16, size: int = 8) -> torch.Tensor:
    """Images (n, channels, size, size) whose channels are correlated and of very different scales."""
    torch.manual_seed(0)
    mixing = torch.randn(channels, channels) * torch.logspace(-2, 0.5, channels)[None, :]
    return torch.einsum("ij,njhw->nihw", mixing, torch.randn(n, channels, size, size))


def normalized_output_error(conv: nn.Conv2d, weight: torch.Tensor, x: torch.Tensor) -> float:
    """E || (y - y') / std(y) ||^2 per position: the error the next BatchNorm sees."""
    y = conv(x)
    approx = nn.functional.conv2d(x, weight.to(x.dtype), padding=conv.padding)
    return float((((approx - y) / y.std((0, 2, 3))[None, :, None, None]) ** 2).mean())


@pytest.fixture(scope="module")
def conv_and_moments():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1, bias=False)
    x = correlated_inputs()
    return conv, x, conv_moments(nn.Sequential(conv), ["0"], x)["0"]


def test_moments_are_the_second_moments_over_positions(conv_and_moments):
    conv, x, m = conv_and_moments
    xs = x.double().movedim(1, -1).reshape(-1, 16)
    ys = conv(x).detach().double().movedim(1, -1).reshape(-1, 24)
    assert torch.allclose(m.input_gram, xs.T @ xs / len(xs))
    assert torch.allclose(m.output_gram, ys.T @ ys / len(ys))
    assert torch.allclose(m.output_mean, ys.mean(0))


def test_whitening_is_a_damped_cholesky_factor_even_of_a_singular_gram():
    gram = torch.zeros(4, 4, dtype=F64)
    gram[:2, :2] = torch.tensor([[2.0, 1.0], [1.0, 2.0]])  # two channels always zero
    s = input_whitening(gram, damping=0.01)
    ridge = 0.01 * float(gram.diagonal().mean())
    assert torch.allclose(s @ s.T, gram + ridge * torch.eye(4, dtype=F64))
    assert torch.equal(s, s.tril())


def test_tucker2_is_exact_at_full_rank_and_keeps_the_weight_spectra(conv_and_moments):
    conv, _, m = conv_and_moments
    plain = hosvd_tucker2(conv.weight)
    decomp = activation_tucker2(conv.weight, m, (plain.s1, plain.s2))
    assert torch.allclose(decomp.to_tensor(), conv.weight.double(), atol=1e-10)
    assert decomp.s1 is plain.s1 and decomp.s2 is plain.s2


@pytest.mark.parametrize("ranks", [(8, 8), (12, 6), (4, 10)])
def test_truncation_loses_less_of_the_normalized_output_than_hosvd(conv_and_moments, ranks):
    conv, x, m = conv_and_moments
    plain = hosvd_tucker2(conv.weight)
    decomp = activation_tucker2(conv.weight, m, (plain.s1, plain.s2)).truncate(*ranks)
    with torch.no_grad():
        ours = normalized_output_error(conv, decomp.to_tensor(), x)
        theirs = normalized_output_error(conv, plain.truncate(*ranks).to_tensor(), x)
    assert ours < 0.8 * theirs


def test_orthonormal_tucker2_is_the_same_tensor_with_orthonormal_factors(conv_and_moments):
    conv, _, m = conv_and_moments
    plain = hosvd_tucker2(conv.weight)
    truncated = activation_tucker2(conv.weight, m, (plain.s1, plain.s2)).truncate(10, 7)
    ortho = orthonormal_tucker2(truncated)
    assert torch.allclose(ortho.to_tensor(), truncated.to_tensor(), atol=1e-10)
    assert torch.allclose(ortho.u1.T @ ortho.u1, torch.eye(10, dtype=F64), atol=1e-12)
    assert torch.allclose(ortho.u2.T @ ortho.u2, torch.eye(7, dtype=F64), atol=1e-12)
    assert ortho.ranks == (10, 7)


def test_svd_is_exact_at_full_rank_and_truncates_to_the_weighted_optimum():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 1, bias=False)
    x = correlated_inputs()
    m = conv_moments(nn.Sequential(conv), ["0"], x)["0"]
    w = conv.weight.detach()[:, :, 0, 0]
    svd = activation_svd(w, m)
    assert torch.allclose(svd.to_matrix(), w.double(), atol=1e-10)
    # Eckart-Young in the weighted norm: no rank-5 matrix is closer to D W S than the truncated D W' S.
    ortho = orthonormal_svd(svd.truncate(5))
    assert torch.allclose(ortho.to_matrix(), svd.truncate(5).to_matrix(), atol=1e-10)
    assert torch.allclose(ortho.u.T @ ortho.u, torch.eye(5, dtype=F64), atol=1e-12)
    assert torch.all(ortho.s[:-1] >= ortho.s[1:])
    with torch.no_grad():
        plain = torch.linalg.svd(w.double(), full_matrices=False)
        rank5 = (plain.U[:, :5] * plain.S[:5]) @ plain.Vh[:5]
        ours = normalized_output_error(conv, ortho.to_matrix()[:, :, None, None], x)
        theirs = normalized_output_error(conv, rank5[:, :, None, None], x)
    assert ours < theirs


def test_clean_compact_activation_keeps_outputs_closer_at_the_same_ranks():
    model = spread_resnet18(0.25)
    x = torch.randn(32, 3, 32, 32)
    with pytest.raises(ConfigError, match="method 'activation'.*pass calibration="):
        clean_compact(model, ratio=3, method="activation")
    hosvd, plan_h = clean_compact(model, ratio=3, tau=4.0, rank_strategy="energy")
    ours, plan_a = clean_compact(model, ratio=3, tau=4.0, rank_strategy="energy", method="activation",
                                 calibration=x[:16])
    assert [l.ranks for l in plan_a.layers] == [l.ranks for l in plan_h.layers]
    assert count_params(ours) == plan_a.params_after == plan_h.params_after
    assert plan_a.layers[1].singular_values == plan_h.layers[1].singular_values  # the weight's spectra
    reference, _ = clean_compact(model, ratio=1.0, tau=4.0)
    with torch.no_grad():
        p = torch.log_softmax(reference.eval()(x[16:]), 1)

        def damage(new: nn.Module) -> float:
            return float(nn.functional.kl_div(torch.log_softmax(new.eval()(x[16:]), 1), p, log_target=True,
                                              reduction="batchmean"))
        assert damage(ours) < damage(hosvd)  # on images the factors were not computed on
