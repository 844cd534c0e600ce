"""Activation-aware factors: truncate each conv where its outputs on calibration images change least.

HOSVD keeps the directions of largest *weight* energy. What the next layer sees is the conv's
output on the data, normalized by the BatchNorm after it. With x the conv's input at one position
(I,), second moment C_x = E[x x^T] = S S^T (S lower triangular, Cholesky), and D = diag(1 / std)
of its outputs y (O,) per channel (what the next BatchNorm divides by), the weight seen in those
coordinates is

    W~ = W x1 D x2 S^T          (O, I, K, K)

and ||W~ - W~'||_F^2 is E ||D (y - y')||^2 over positions when the inputs at different taps are
uncorrelated. The decomposition is the HOSVD of W~, with the output factor taken from the exact
output statistics instead (U1 = eigenvectors of D C_y D, C_y = E[y y^T]), mapped back:

    W = G x1 (D^-1 U1) x2 (S^-T U2),     G = W~ x1 U1^T x2 U2^T.

Exact at full rank; truncating it keeps the output directions the data uses. A 1x1 conv (O, I) is
the same with one SVD: D W S = U diag(s) V^T, W = (D^-1 U) diag(s) (V^T S^-1) (as SVD-LLM does
for linear layers). The factors are not orthonormal; :func:`orthonormal_tucker2` and
:func:`orthonormal_svd` rewrite a truncated decomposition with orthonormal ones (same tensor).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cc_core.evalmode import eval_mode
from cc_core.compact.bn_match import forward_with_hooks
from cc_core.compact.tucker import MatrixSVD, Tucker2, left_singular_vectors, mode_product, unfold

# Ridge added to C_x, as a fraction of its mean diagonal: input channels with no variance (zeroed by
# the channel clean, or dead after a ReLU) would make S singular.
DAMPING = 0.01


@dataclass
class ConvMoments:
    """Second moments of one conv's input and output channels over all positions of the images.

    input_gram: (I, I) E[x x^T];  output_mean: (O,) E[y];  output_gram: (O, O) E[y y^T]; float64.
    """

    input_gram: torch.Tensor
    output_mean: torch.Tensor
    output_gram: torch.Tensor


def _positions(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) in float64."""
    return t.detach().double().movedim(1, -1).reshape(-1, t.shape[1])


def conv_moments(model: nn.Module, names: list[str], x: torch.Tensor,
                 batch_size: int = 128) -> dict[str, ConvMoments]:
    """:class:`ConvMoments` of the convs ``names`` of ``model`` on images ``x`` (N, C, H, W)."""
    sums: dict[str, list] = {}  # name -> [input gram, output sum, output gram, positions in, positions out]

    def record(name: str):
        def hook(module, inputs, out) -> None:
            xs, ys = _positions(inputs[0]), _positions(out)
            acc = sums.setdefault(name, [0.0, 0.0, 0.0, 0, 0])
            acc[0] = acc[0] + xs.T @ xs
            acc[1] = acc[1] + ys.sum(0)
            acc[2] = acc[2] + ys.T @ ys
            acc[3] += len(xs)
            acc[4] += len(ys)
        return hook

    with eval_mode(model):
        forward_with_hooks(model, {name: record(name) for name in names}, x, batch_size)
    return {name: ConvMoments(gram_in / n_in, total / n_out, gram_out / n_out)
            for name, (gram_in, total, gram_out, n_in, n_out) in sums.items()}


def input_whitening(gram: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Lower-triangular S (I, I) with S S^T = gram + damping * mean(diag(gram)) * identity."""
    ridge = damping * float(gram.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.cholesky(gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device))


def output_weights(moments: ConvMoments, eps: float = 1e-5) -> torch.Tensor:
    """D's diagonal (O,): 1 / the output channels' std, as the next BatchNorm would divide by."""
    var = (moments.output_gram.diagonal() - moments.output_mean ** 2).clamp_min(0)
    return 1.0 / (var + eps).sqrt()


def activation_tucker2(weight: torch.Tensor, moments: ConvMoments, spectra: tuple[torch.Tensor, torch.Tensor]
                       ) -> Tucker2:
    """Full-rank activation-aware Tucker-2 of ``weight`` (O, I, K, K); its components ordered by how
    much of the normalized output they carry. ``spectra``: the weight's own (s1, s2), kept as the
    record of its singular values."""
    w = weight.detach().double()
    s = input_whitening(moments.input_gram.to(w))
    d = output_weights(moments).to(w)
    whitened = mode_product(mode_product(w, torch.diag(d), 0), s.T, 1)
    eigvals, vecs = torch.linalg.eigh(d[:, None] * moments.output_gram.to(w) * d[None, :])
    u1 = vecs[:, torch.argsort(eigvals, descending=True)]
    u2 = left_singular_vectors(unfold(whitened, 1))
    core = mode_product(mode_product(whitened, u1.T, 0), u2.T, 1)
    u2_back = torch.linalg.solve_triangular(s.T, u2, upper=True)
    return Tucker2(core, u1 / d[:, None], u2_back, *spectra)


def activation_svd(matrix: torch.Tensor, moments: ConvMoments) -> MatrixSVD:
    """Full-rank activation-aware SVD of a 1x1 conv's ``matrix`` (O, I): D W S = U diag(s) V^T."""
    w = matrix.detach().double()
    s = input_whitening(moments.input_gram.to(w))
    d = output_weights(moments).to(w)
    u, sv, vh = torch.linalg.svd(d[:, None] * w @ s, full_matrices=False)
    vh_back = torch.linalg.solve_triangular(s, vh, upper=False, left=False)
    return MatrixSVD(u / d[:, None], sv, vh_back)


def orthonormal_tucker2(decomp: Tucker2) -> Tucker2:
    """The same tensor with orthonormal factors: U = Q R (QR), the R's moved into the core."""
    q1, r1 = torch.linalg.qr(decomp.u1)
    q2, r2 = torch.linalg.qr(decomp.u2)
    core = mode_product(mode_product(decomp.core, r1, 0), r2, 1)
    return Tucker2(core, q1, q2, decomp.s1, decomp.s2)


def orthonormal_svd(svd: MatrixSVD) -> MatrixSVD:
    """The same matrix (rank R) as a true SVD: u, vh^T orthonormal, s its singular values."""
    qu, ru = torch.linalg.qr(svd.u)
    qv, rv = torch.linalg.qr(svd.vh.T)
    a, s, bh = torch.linalg.svd((ru * svd.s) @ rv.T)
    return MatrixSVD(qu @ a, s, bh @ qv.T)
