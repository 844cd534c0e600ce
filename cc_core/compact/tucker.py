"""Tucker-2 decomposition of conv weights on the two channel modes, and plain SVD for 1x1.

Notation (docs/METHOD.md step 1): ``W`` has shape (O, I, K, K).
  W_(1) = unfold(W, 0) in R^{O x (I K K)},  U1 = its left singular vectors (O x r1)
  W_(2) = unfold(W, 1) in R^{I x (O K K)},  U2 = its left singular vectors (I x r2)
  G = W x1 U1^T x2 U2^T  (r1 x r2 x K x K),  W = G x1 U1 x2 U2  (exact at full rank)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: (d0, d1, ...) -> (d_mode, prod of the other dims)."""
    return torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def fold(matrix: torch.Tensor, mode: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`unfold` for a tensor of ``shape``."""
    moved = (shape[mode],) + tuple(s for i, s in enumerate(shape) if i != mode)
    return torch.movedim(matrix.reshape(moved), 0, mode)


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor x_mode matrix``: contracts ``tensor``'s mode with ``matrix``'s columns.

    (d0, .., d_mode, ..) x (J, d_mode) -> (d0, .., J, ..)
    """
    shape = list(tensor.shape)
    shape[mode] = matrix.shape[0]
    return fold(matrix @ unfold(tensor, mode), mode, tuple(shape))


@dataclass
class Tucker2:
    """W ~= core x1 u1 x2 u2.

    core: (R1, R2, K, K); u1: (O, R1); u2: (I, R2); s1 / s2: singular values of W_(1) / W_(2)
    of the decomposed weight at full rank (length r1 = min(O, IKK) / r2 = min(I, OKK)).
    """

    core: torch.Tensor
    u1: torch.Tensor
    u2: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor

    @property
    def ranks(self) -> tuple[int, int]:
        return self.core.shape[0], self.core.shape[1]

    def to_tensor(self) -> torch.Tensor:
        """Reconstruct W (O, I, K, K)."""
        return mode_product(mode_product(self.core, self.u1, 0), self.u2, 1)

    def truncate(self, r1: int, r2: int) -> "Tucker2":
        """Keep the leading ``r1`` / ``r2`` components of each mode (singular values kept)."""
        return Tucker2(self.core[:r1, :r2].contiguous(), self.u1[:, :r1].contiguous(),
                       self.u2[:, :r2].contiguous(), self.s1, self.s2)


def left_singular_vectors(matrix: torch.Tensor) -> torch.Tensor:
    """Left singular vectors (m x min(m, n)) of ``matrix`` (m x n), by decreasing value.

    Eigenvectors of the Gram matrix A A^T (m x m): an order of magnitude faster than an SVD
    of the wide unfoldings of conv weights, and exactly orthonormal.
    """
    eigvals, vecs = torch.linalg.eigh(matrix @ matrix.T)
    order = torch.argsort(eigvals, descending=True)[: min(matrix.shape)]
    return vecs[:, order]


def hosvd_tucker2(weight: torch.Tensor) -> Tucker2:
    """Full-rank Tucker-2 of ``weight`` (O, I, K, K) by HOSVD, computed in float64.

    Returned factors have orthonormal columns; the core's mode-1 (mode-2) slices are
    orthogonal and their norms are the singular values ``s1`` (``s2``).
    """
    w = weight.detach().to(torch.float64)
    u1 = left_singular_vectors(unfold(w, 0))
    u2 = left_singular_vectors(unfold(w, 1))
    core = mode_product(mode_product(w, u1.T, 0), u2.T, 1)
    s1 = unfold(core, 0).norm(dim=1)
    s2 = unfold(core, 1).norm(dim=1)
    return Tucker2(core, u1, u2, s1, s2)


def hooi_tucker2(weight: torch.Tensor, ranks: tuple[int, int], n_iter: int = 10,
                 tol: float = 1e-4, spectra: tuple[torch.Tensor, torch.Tensor] | None = None) -> Tucker2:
    """Rank-(R1, R2) Tucker-2 of ``weight`` refined by HOOI (tensorly ``partial_tucker``).

    Lower reconstruction error than the truncated HOSVD at the same ranks, at many times the
    cost. ``s1``/``s2`` are the full-rank singular values of the input (``spectra`` if the
    caller has them already).
    """
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    w = weight.detach().to(torch.float64)
    # tensorly 0.10 returns ((core, factors), errors), not what its docstring says.
    (core, factors), _ = partial_tucker(w.numpy(), rank=list(ranks), modes=[0, 1],
                                        n_iter_max=n_iter, tol=tol, init="svd")
    core, u1, u2 = (torch.from_numpy(tl.to_numpy(a)).to(torch.float64)
                    for a in (core, factors[0], factors[1]))
    if spectra is None:
        spectra = (torch.linalg.svdvals(unfold(w, 0)), torch.linalg.svdvals(unfold(w, 1)))
    return Tucker2(core, u1, u2, *spectra)


@dataclass
class MatrixSVD:
    """W (O, I) ~= u diag(s) vh with u: (O, R), s: (R,), vh: (R, I)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def to_matrix(self) -> torch.Tensor:
        return (self.u * self.s) @ self.vh

    def truncate(self, rank: int) -> "MatrixSVD":
        return MatrixSVD(self.u[:, :rank].contiguous(), self.s[:rank].contiguous(),
                         self.vh[:rank].contiguous())


def matrix_svd(matrix: torch.Tensor) -> MatrixSVD:
    """Thin SVD in float64."""
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    return MatrixSVD(u, s, vh)
