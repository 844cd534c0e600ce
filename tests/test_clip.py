import pytest
import torch

from cc_core.compact.clip import clip_matrix, clip_tucker2, normalizer_value
from cc_core.compact.tucker import MatrixSVD, hosvd_tucker2, matrix_svd, mode_product, unfold
from cc_core.errors import ConfigError

S = torch.tensor([9.0, 5.0, 3.0, 2.5, 1.0, 0.5], dtype=torch.float64)


def _orthonormal(n: int, r: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64))
    return q


def tensor_with_singular_values(s: torch.Tensor, o: int = 10, i: int = 8, k: int = 3) -> torch.Tensor:
    """W = G x1 U1 x2 U2 with a super-diagonal core: both modes have singular values s."""
    r = len(s)
    core = torch.zeros(r, r, k, k, dtype=torch.float64)
    for a in range(r):
        slice_ = torch.randn(k, k, dtype=torch.float64)
        core[a, a] = s[a] * slice_ / slice_.norm()
    return mode_product(mode_product(core, _orthonormal(o, r), 0), _orthonormal(i, r), 1)


def test_known_tensor_has_the_built_singular_values():
    w = tensor_with_singular_values(S)
    assert torch.allclose(torch.linalg.svdvals(unfold(w, 0))[:6], S, atol=1e-10)
    assert torch.allclose(torch.linalg.svdvals(unfold(w, 1))[:6], S, atol=1e-10)


@pytest.mark.parametrize("normalizer, tau", [("max", 0.5), ("mean", 1.2), ("median", 1.0), ("none", 2.7)])
def test_tucker_clip_exactly_the_values_above_threshold(normalizer, tau):
    w = tensor_with_singular_values(S)
    d = hosvd_tucker2(w)
    clipped, result = clip_tucker2(d, tau, normalizer)
    # zero singular values of the padded modes stay zero
    threshold = tau * normalizer_value(d.s1, normalizer)
    expected = torch.minimum(d.s1, torch.tensor(threshold, dtype=torch.float64))
    above = d.s1 > threshold
    assert result.n_clipped[0] == int(above.sum()) > 0
    assert torch.all(result.factors[0][~above] == 1)
    assert torch.allclose(result.factors[0][above] * d.s1[above],
                          torch.full((int(above.sum()),), threshold, dtype=torch.float64))
    w_clipped = clipped.to_tensor()
    for mode in (0, 1):
        sv = torch.linalg.svdvals(unfold(w_clipped, mode))
        assert torch.allclose(sv, expected[: len(sv)], atol=1e-9)
    # untouched singular directions are unchanged
    assert torch.allclose(unfold(clipped.core, 0)[~above], unfold(d.core, 0)[~above])


def test_normalizer_values():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    assert normalizer_value(s, "max") == 4.0
    assert normalizer_value(s, "mean") == 2.0
    assert normalizer_value(s, "median") == 1.0
    assert normalizer_value(s, "rms") == pytest.approx((22 / 4) ** 0.5)
    assert normalizer_value(s, "none") == 1.0
    with pytest.raises(ConfigError, match="unknown normalizer 'p90'"):
        normalizer_value(s, "p90")


def test_tucker_clip_bounds_row_norms_of_any_tensor():
    d = hosvd_tucker2(torch.randn(32, 16, 3, 3, dtype=torch.float64) * torch.linspace(0.1, 5, 32)[:, None, None, None])
    clipped, result = clip_tucker2(d, 1.1, "mean")
    assert result.n_clipped[0] > 0
    for mode in (0, 1):
        norms = unfold(clipped.core, mode).norm(dim=1)
        assert torch.all(norms <= result.thresholds[mode] + 1e-9)


def test_large_tau_clips_nothing():
    d = hosvd_tucker2(torch.randn(8, 8, 3, 3, dtype=torch.float64))
    clipped, result = clip_tucker2(d, 1e6, "max")
    assert result.n_clipped == [0, 0] and torch.equal(clipped.core, d.core)


def test_matrix_clip():
    u, v = _orthonormal(12, 6), _orthonormal(7, 6)
    svd = matrix_svd((u * S) @ v.T)
    clipped, result = clip_matrix(svd, 1.1, "mean")
    threshold = 1.1 * float(svd.s.mean())  # 7 singular values: the six of S and a zero -> 3.3
    assert result.n_clipped == [int((S > threshold).sum())] == [2]
    assert torch.allclose(torch.linalg.svdvals(clipped.to_matrix())[:6],
                          torch.clamp(S, max=threshold), atol=1e-10)
    assert isinstance(clipped, MatrixSVD)
