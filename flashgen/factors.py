"""Biases given as low-rank factors: ``fg.LowRankBias(phi_q, phi_k)`` and ``fg.low_rank``.

``bias[b, h, i, j] = Σ_r phi_q[b, h, i, r] · phi_k[b, h, j, r]``. Attention with such a bias is
plain attention on ``q' = [q, phi_q / scale]`` and ``k' = [k, phi_k]`` (FlashBias):
the bias costs R more columns of the q·kᵀ product instead of an Sq x Skv read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class LowRankBias:
    """An additive bias ``phi_q @ phi_kᵀ``: ``phi_q [B|1, H|1, Sq, R]``, ``phi_k [B|1, H|1, Skv, R]``
    (floating point; gradients flow to both when they require grad). ``error``: the relative
    Frobenius error of the factorisation when it came from :func:`low_rank` (None otherwise)."""

    phi_q: torch.Tensor
    phi_k: torch.Tensor
    error: float | None = None

    def __post_init__(self):
        problems = []
        for name, t in (("phi_q", self.phi_q), ("phi_k", self.phi_k)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
                problems.append(f"{name} must be a floating-point tensor [B|1, H|1, S, R], got "
                                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if not problems:
            if self.phi_q.shape[-1] != self.phi_k.shape[-1]:
                problems.append(f"phi_q and phi_k need the same rank R (last dim), got {self.phi_q.shape[-1]} "
                                f"and {self.phi_k.shape[-1]}")
            if self.phi_q.device != self.phi_k.device:
                problems.append(f"phi_q is on {self.phi_q.device} but phi_k on {self.phi_k.device}")
        if problems:
            raise ValueError("LowRankBias: " + "; ".join(problems))

    @property
    def rank(self) -> int:
        return self.phi_q.shape[-1]

    def dense(self) -> torch.Tensor:
        """The bias as a dense tensor ``[B|1, H|1, Sq, Skv]`` (for checks on small shapes)."""
        return self.phi_q @ self.phi_k.transpose(-1, -2)

    def rounding_bound(self, dtype: torch.dtype) -> float:
        """An upper bound on how far any bias entry moves when the factors are rounded to ``dtype``
        (as the kernels take them, beside q and k): ``Σ_r max|phi_q[.., r]| · max|phi_k[.., r]|``
        times twice the unit roundoff; ``inf`` past ``dtype``'s range. Factors of a bias with
        large entries that cancel (ALiBi's ``slope·(kv − q)`` at 8k tokens: terms of ~6000 for an
        entry of 0) can be exact in float32 and off by whole logits in bfloat16."""
        info = torch.finfo(dtype)
        with torch.no_grad():
            fq = self.phi_q.detach().abs().amax(dim=-2).double()  # [B|1, H|1, R]
            fk = self.phi_k.detach().abs().amax(dim=-2).double()
            if max(fq.max().item(), fk.max().item()) > info.max:
                return float("inf")
            return float((fq * fk).sum(-1).max().item() * 2 * info.eps / 2)

    def __repr__(self) -> str:
        err = f", error={self.error:.2e}" if self.error is not None else ""
        return f"LowRankBias(rank={self.rank}, phi_q={list(self.phi_q.shape)}, phi_k={list(self.phi_k.shape)}{err})"


# slices whose shorter side is at most this take the full SVD; longer ones a randomized one, whose
# cost grows with the rank found instead of the length (a full SVD of 16 slices of 8192 x 8192 takes
# minutes on an H200)
EXACT_SVD_MAX = 2048


def low_rank(bias: torch.Tensor, tol: float = 1e-2, max_rank: int | None = None) -> LowRankBias:
    """Truncated SVD of a dense bias ``[B|1, H|1, Sq, Skv]`` (or with fewer leading dims, such as
    ``[H, Sq, Skv]``, as ``bias=`` takes it) per (batch, head): the smallest rank
    R (the same for every (batch, head)) with relative Frobenius error ``‖bias − φ_q φ_kᵀ‖ / ‖bias‖
    <= tol`` over the whole tensor, capped at ``max_rank`` (a warning says when the cap leaves the
    error above ``tol``). Approximate by design: flashgen never takes this path on its own.
    Slices longer than ``EXACT_SVD_MAX`` on both sides take a randomized SVD (a range finder with
    power iterations, widened until the rank is found), whose reported error is measured on the
    factors themselves; its rank may exceed the full SVD's where singular values cluster near tol."""
    if not isinstance(bias, torch.Tensor) or not 2 <= bias.dim() <= 4 or not bias.is_floating_point():
        raise ValueError(f"low_rank: bias must be a floating-point tensor [B|1, H|1, Sq, Skv] (leading dims may be "
                         f"left out), got {getattr(bias, 'dtype', type(bias).__name__)} "
                         f"{tuple(getattr(bias, 'shape', ()))}")
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    if not (isinstance(tol, (int, float)) and 0 <= tol < 1):
        raise ValueError(f"low_rank: tol must be in [0, 1), got {tol!r}")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"low_rank: max_rank must be a positive int or None, got {max_rank!r}")
    work = bias.detach().to(torch.float64 if bias.device.type == "cpu" else torch.float32)
    n, total = min(work.shape[-2:]), float(work.square().sum())
    # the smallest rank within tol, from the full SVD, or from sketches widened until one holds it;
    # the error of keeping r triplets: the sketch's own residual ‖a − q qᵀa‖² (0 for the full SVD)
    # plus the values past r, each summed directly (``total - kept`` would cancel to ~1e-8 of it)
    width = n if n <= EXACT_SVD_MAX else 32
    while True:
        width = min(width, n)
        u, s, vh, residual = (*torch.linalg.svd(work, full_matrices=False), 0.0) if n <= EXACT_SVD_MAX else (
            _sketched_svd(work, width))
        usable = min(width if width == n else width - 8, max_rank or n)  # (a sketch's last 8: oversampling)
        past = torch.flip(torch.cumsum(torch.flip((s.double() ** 2).sum(dim=(0, 1)), [0]), 0), [0])
        tail = ((residual + torch.cat([past[1:], past.new_zeros(1)])[:usable]) / total).sqrt() if total else None
        within = torch.nonzero(tail <= tol) if tail is not None else torch.zeros(1, 1, dtype=torch.long)
        if within.numel() or usable in (n, max_rank):
            break
        width *= 2
    rank = int(within[0]) + 1 if within.numel() else usable
    error = float(tail[rank - 1]) if tail is not None else 0.0
    if max_rank is not None and error > tol:
        warnings.warn(f"low_rank: max_rank={max_rank} leaves a relative error of {error:.3g} > tol={tol}", stacklevel=2)
    root = s[..., :rank].sqrt()
    phi_q = (u[..., :rank] * root[..., None, :]).to(bias.dtype)
    phi_k = (vh[..., :rank, :].transpose(-1, -2) * root[..., None, :]).to(bias.dtype)
    return LowRankBias(phi_q.contiguous(), phi_k.contiguous(), error)


def _sketched_svd(a: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Approximate leading singular triplets of each slice of ``a [.., m, n]``: ``width`` of them from
    a Gaussian sketch (seeded: the same input gives the same factors) and two power iterations; and
    ‖a − q qᵀa‖² over all slices, q the sketch's orthonormal range."""
    gen = torch.Generator(device=a.device).manual_seed(0)
    y = a @ torch.randn(*a.shape[:-2], a.shape[-1], width, generator=gen, device=a.device, dtype=a.dtype)
    for _ in range(2):  # (power iterations: the spectrum's tail weighs less in the range found)
        y = a @ (a.transpose(-1, -2) @ torch.linalg.qr(y).Q)
    q = torch.linalg.qr(y).Q  # [.., m, width]
    b = q.transpose(-1, -2) @ a
    residual = sum(float((ai - qi @ bi).square().sum())  # (one slice at a time: m x n each)
                   for ai, qi, bi in zip(*(x.reshape(-1, *x.shape[-2:]) for x in (a, q, b))))
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    return q @ ub, s, vh, residual


def factor_bias(fn, rank: int, B: int, H: int, Sq: int, Skv: int, device, *, oversample: int = 8,
                seed: int = 0) -> LowRankBias:
    """Exact factors of a bias ``fn(b, h, q_idx, kv_idx)`` known to have rank ``rank`` (from
    ``Analysis.bias``), from O((Sq + Skv) · rank) evaluations instead of Sq · Skv: an
    interpolative decomposition. The columns at ``rank + oversample`` random keys span the column
    space; LU pivoting on their orthonormal basis picks ``rank`` skeleton rows I; then
    ``bias = U (U[I])⁻¹ bias[I, :]``. float64 throughout; the factors are float32."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    q = torch.arange(Sq, device=device).view(1, 1, Sq, 1)
    kv = torch.arange(Skv, device=device).view(1, 1, 1, Skv)

    def evaluate(qi, ki):
        with torch.no_grad():
            out = torch.as_tensor(fn(b, h, qi, ki), device=device).to(torch.float64)
        return out.expand(B, H, qi.shape[2], ki.shape[3])

    r = max(1, min(rank, Sq, Skv))
    cols = torch.randperm(Skv, generator=gen)[: min(Skv, r + oversample)].sort().values.to(device)
    sample = evaluate(q, cols.view(1, 1, 1, -1))  # [B, H, Sq, r + oversample]
    basis = torch.linalg.svd(sample, full_matrices=False)[0][..., :r]  # [B, H, Sq, r]
    _, pivots = torch.linalg.lu_factor(basis)  # partial pivoting: the best-conditioned rows first
    order = torch.arange(Sq, device=device).expand(B, H, Sq).clone()
    for i in range(r):  # LAPACK's row swaps, applied in turn, give the pivot rows
        j = pivots[..., i].long() - 1
        a, c = order[..., i].clone(), order.gather(-1, j[..., None])[..., 0]
        order[..., i] = c
        order.scatter_(-1, j[..., None], a[..., None])
    rows = order[..., :r]  # [B, H, r]
    skeleton = basis.gather(-2, rows[..., None].expand(B, H, r, r))  # U[I]
    phi_q = torch.linalg.solve(skeleton.transpose(-1, -2), basis.transpose(-1, -2)).transpose(-1, -2)
    row_values = torch.stack([evaluate(rows[..., i].reshape(B, H, 1, 1), kv)[..., 0, :] for i in range(r)], -1)
    return LowRankBias(phi_q.float().contiguous(), row_values.float().contiguous())
