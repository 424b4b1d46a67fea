"""Pure tensor functions behind the merge methods: SVDs, truncation, sign-keeping selection.

Nothing here reads files or knows about modules; every function takes and returns tensors
(float32 unless said otherwise), so each can be tested against its dense definition.
"""

from __future__ import annotations

import math

import torch


def lora_delta(lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float) -> torch.Tensor:
    """The dense weight delta of a plain LoRA module.

    Args:
        lora_B: ``out x r`` factor.
        lora_A: ``r x in`` factor.
        scale: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rslora).

    Returns:
        ``scale * B @ A`` in float32, ``out x in``.
    """
    return (lora_B.float() @ lora_A.float()).mul_(scale)


def thin_qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a tall matrix by CholeskyQR2 (two Gram-Cholesky passes, float64 Grams).

    Matmul-bound, hence several times faster than Householder QR for ``n x k`` with
    ``k << n``; falls back to Householder QR when ``x`` is (numerically) rank deficient.

    Args:
        x: ``n x k`` float32 matrix; ``n < k`` goes to Householder QR.

    Returns:
        ``(Q, R)``: ``Q`` ``n x m`` with orthonormal columns, ``R`` ``m x k`` upper triangular,
        ``m = min(n, k)``.
    """
    if x.shape[0] < x.shape[1]:  # wide (e.g. a LoRA rank above a module's width): Gram is singular
        return torch.linalg.qr(x)
    q, r = x, torch.eye(x.shape[1], dtype=torch.float64)
    for step in range(2):
        lower, info = torch.linalg.cholesky_ex((q.T @ q).double())
        if int(info) != 0:
            return torch.linalg.qr(x)
        # solve_triangular works on a column-major copy of its right-hand side (and returns
        # it). Handing it one, to overwrite, skips its slow strided copy; the LAPACK call,
        # hence every bit of the result, is unchanged. The first pass copies x (the
        # caller's), the second overwrites the first pass's output, already column-major.
        rhs = x.T.clone(memory_format=torch.contiguous_format).T if step == 0 else q
        q = torch.linalg.solve_triangular(lower.T.to(x.dtype), rhs, upper=True, left=False, out=rhs)  # q ← q L⁻ᵀ
        r = lower.T @ r
    # One summing pass proves every entry finite (a NaN or Inf makes the sum non-finite);
    # only a non-finite sum needs the element-wise check.
    if not bool(torch.isfinite(q.sum())) and not bool(torch.isfinite(q).all()):
        return torch.linalg.qr(x)
    return q, r.to(x.dtype)


def factorized_svd(
    lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``scale * B @ A`` from the factors, never forming the dense product.

    ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` (thin QR), so ``scale·B A = Q_b (scale·R_b R_aᵀ) Q_aᵀ``
    and only the ``r x r`` core needs an SVD. Cost ``O((out + in)·r²)`` instead of
    ``O(out·in·min(out, in))``.

    Args:
        lora_B: ``out x r`` factor (any float dtype; upcast to float32).
        lora_A: ``r x in`` factor.
        scale: the LoRA scaling.

    Returns:
        ``(U, S, Vh)`` with ``U: out x k``, ``S: k`` (descending, >= 0), ``Vh: k x in``,
        ``k = min(out, in, r)`` (``k = r`` for every real LoRA).
    """
    q_b, r_b = thin_qr(lora_B.float())
    q_a, r_a = thin_qr(lora_A.float().T)
    core_u, s, core_vh = torch.linalg.svd(scale * (r_b @ r_a.T), full_matrices=False)
    return q_b @ core_u, s, core_vh @ q_a.T


def kept_count(rank: int, keep: float) -> int:
    """``ceil(keep · rank)``, the number of singular values a single adapter keeps (SPEC §2.2).

    Args:
        rank: the adapter's LoRA rank ``r``.
        keep: fraction in ``(0, 1]``.

    Returns:
        An integer in ``[1, rank]``.
    """
    # Round first so that e.g. 0.8 * 10 = 8.000000000000002 does not become 9.
    return max(1, min(rank, math.ceil(round(keep * rank, 9))))


def truncated_lora(
    lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float, keep: float
) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """A single adapter's truncation (SPEC §2.1-2.2): its top ``ceil(keep·r)`` singular triplets.

    Args:
        lora_B: ``out x r`` factor.
        lora_A: ``r x in`` factor.
        scale: the LoRA scaling.
        keep: fraction of the rank kept, in ``(0, 1]``.

    Returns:
        ``((U_p · S_p, Vh_p), τ)``: the truncated delta as a factor pair (``out x p``, ``p x in``)
        and ``τ``, the smallest kept singular value.
    """
    u, s, vh = factorized_svd(lora_B, lora_A, scale)
    p = min(kept_count(lora_A.shape[0], keep), len(s))
    return (u[:, :p] * s[:p], vh[:p]), float(s[p - 1])


def low_rank_product(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """``U diag(S) Vh`` as a dense matrix (``out x in``), for truncated triplets."""
    return (u * s) @ vh


def _ritz_triplets(basis: torch.Tensor, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz on ``span(basis)``: the SVD of ``basisᵀ M`` via the eigh of its ``q x q`` Gram."""
    projected = basis.T @ matrix  # q x in
    eigenvalues, vectors = torch.linalg.eigh(projected.double() @ projected.double().T)
    eigenvalues, vectors = eigenvalues.flip(0).clamp_min(0), vectors.flip(1)
    s = eigenvalues.sqrt()
    # Directions with σ at rounding level carry no information: zero them rather than divide by ~0.
    informative = s > s[0] * 1e-7
    vh = (vectors.T @ projected.double()) / torch.where(informative, s, 1.0)[:, None] * informative[:, None]
    return basis @ vectors.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def _cut_error_bound(s: torch.Tensor, residual: torch.Tensor, n: int) -> float:
    """First-order bound on ``‖U_n S_n V_nᵀ − M_n‖_F`` for kept Ritz triplets ``1..n``.

    ``Mᵀ u_i = σ_i v_i`` holds by construction, so only ``r_i = ‖M v_i − σ_i u_i‖`` is left.
    By Wedin's theorem, ``u_i`` leans into the discarded singular subspace (values up to
    ``σ_{n+1}``) by at most ``r_i / δ_i``, ``δ_i = σ_i − σ_{n+1}``, which moves the truncation
    by at most ``σ_i r_i / δ_i`` through the kept part and ``σ_{n+1} r_i / δ_i`` through the
    discarded part: in all at most ``2 ‖σ_i r_i / δ_i‖``. Values near the cut weigh by
    ``σ / gap``, deep ones by about 1. ``σ_{n+1}`` is over-estimated by its Ritz value plus its
    residual (a Ritz value is never above the singular value it approximates).

    Args:
        s: Ritz values, descending, at least ``n + 1``.
        residual: ``r_i`` of Ritz triplets ``1..n+1``.
        n: number kept (>= 1).

    Returns:
        The bound; ``inf`` while the cut is not yet separated.
    """
    gaps = s[:n] - (s[n] + residual[n])
    if float(gaps[-1]) <= 0:
        return math.inf
    return 2 * float(torch.linalg.vector_norm(s[:n] * residual[:n] / gaps))


def leading_singular_triplets(
    matrix: torch.Tensor,
    threshold: float | None = None,
    *,
    count: int | None = None,
    initial: int = 32,
    oversample: int = 16,
    tol: float = 1e-5,
    max_iter: int = 30,
    dense_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The leading singular triplets of ``matrix``: those above ``threshold``, or the top ``count``.

    Randomised subspace iteration with Rayleigh-Ritz on a block of ``q = k + max(oversample,
    k // 2)`` vectors, stopped on a criterion that certifies what is returned:

    - by ``threshold``: the kept truncation ``U S Vh`` is the exact one, ``M_n`` (every singular
      value above the threshold), to ``‖U S Vh − M_n‖_F <= tol · ‖S‖_F`` at first order in the
      residuals (:func:`_cut_error_bound`). The bound divides by the gap at the cut, so nearly
      equal singular values either side of the threshold need smaller residuals (more
      iterations, or the dense SVD), not a looser answer;
    - by ``count``: every kept triplet has residual ``‖M v − σ u‖ <= tol · σ_1``, so ``U S Vh``
      is a best rank-``count`` approximation to that accuracy (which of two equal singular
      values at the cut it keeps does not matter there).

    If the wanted values spill into the oversampling columns, or ``max_iter`` iterations do not
    certify, ``k`` doubles and the block widens, keeping what it has found. Only when the
    block would cover more than ``dense_fraction`` of ``min(out, in)`` does it fall back to
    the exact dense SVD (float32: about 1e-6 relative off a float64 SVD), then the cheaper
    route. Orthonormalisation (CholeskyQR2) and Rayleigh-Ritz (eigh of a ``q x q`` Gram) are
    matmul-bound, so the cost is about ``4·out·in·q`` flops per iteration.

    Args:
        matrix: ``out x in`` matrix (computed in float32).
        threshold: keep singular values strictly greater than this (give this or ``count``).
        count: keep exactly the ``count`` largest (capped at ``min(out, in)``).
        initial: first block size when searching by threshold.
        oversample: least number of extra block columns (they speed up convergence).
        tol: relative accuracy certified (see above); float32 residuals bottom out near 1e-7,
            so values much below 1e-6 end in the dense SVD.
        max_iter: iterations before widening the block.
        dense_fraction: block-width fraction of ``min(out, in)`` that switches to dense SVD.
        generator: RNG for the random start block (determinism).

    Returns:
        ``(U, S, Vh, width)``: the kept triplets (``S`` descending) and the widest block
        used (``min(out, in)`` when the dense SVD ran).
    """
    if (threshold is None) == (count is None):
        raise ValueError("give exactly one of threshold and count")
    m = matrix.float()
    n_min = min(m.shape)

    def n_wanted(s: torch.Tensor) -> int:
        return int((s > threshold).sum()) if count is None else min(count, n_min)

    def certified(s: torch.Tensor, residual: torch.Tensor, n: int) -> bool:
        if count is not None or n == 0:  # nothing kept: the top value must be known to be below the cut
            return bool((residual <= tol * s[0].clamp_min(1e-30)).all())
        return _cut_error_bound(s, residual, n) <= tol * float(torch.linalg.vector_norm(s[:n]))

    k = max(1, initial if count is None else count)
    image = None
    while True:
        # Wider blocks converge faster on flat spectra (rate ~ σ_q / σ_k): oversample by half.
        q = k + max(oversample, k // 2)
        if q > dense_fraction * n_min:
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            n = n_wanted(s)
            return u[:, :n], s[:n], vh[:n], n_min
        # Widening keeps the converged directions and adds fresh random ones.
        fresh = m @ torch.randn(m.shape[1], q - (0 if image is None else image.shape[1]), generator=generator)
        basis = thin_qr(fresh if image is None else torch.cat([image, fresh], dim=1))[0]
        for _ in range(max_iter):
            u, s, vh = _ritz_triplets(basis, m)
            image = m @ vh.T  # out x q; its span is the next iterate
            wanted = n_wanted(s)
            # By threshold, the first value below it must have converged too: it proves the cut.
            check = min(wanted + (count is None), q)
            residual = torch.linalg.vector_norm(image[:, :check] - u[:, :check] * s[:check], dim=0)
            if wanted < q and certified(s, residual, wanted):
                return u[:, :wanted], s[:wanted], vh[:wanted], q
            if count is None and wanted >= k:
                break  # the oversampling columns are needed for wanted values: widen
            basis = thin_qr(image)[0]
        k *= 2


Candidate = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

_MAGNITUDE_BITS = 0x7FFFFFFF  # float32 bits without the sign: |x| as an int32, ordered like |x|


def _spans(size: int, step: int) -> list[tuple[int, int]]:
    """``[0, size)`` cut into ``ceil(size / step)`` near-equal spans (one if ``size`` is 0)."""
    parts = max(1, -(-size // max(1, step)))
    return [(i * size // parts, (i + 1) * size // parts) for i in range(parts)]


def max_magnitude(candidates: list[Candidate], block_bytes: int = 1 << 18) -> torch.Tensor:
    """Element-wise, the candidate value farthest from zero, sign kept (SPEC §2.4).

    Ties in absolute value go to the later candidate, so the result is deterministic; it is
    independent of candidate order wherever no tie occurs. A NaN counts as the largest
    magnitude (it propagates, so a caller's finiteness check sees it). A candidate may be a
    dense matrix or a low-rank pair ``(left, right)`` standing for ``left @ right``.

    The work runs tile by tile (about ``block_bytes`` of output each, tall enough for the
    products to run at matmul speed): each factored candidate's tile is one matmul into a
    cache-resident buffer, and the selection is a few integer passes over the float bits
    in that buffer (``|x|`` is ``bits & 0x7FFFFFFF``; the later candidate wins where its
    magnitude is ``>=``, selected branch-free with a sign mask), so nothing of full size but
    the result is ever written.

    What is guaranteed, bit for bit: the same inputs and ``block_bytes`` give the same bytes
    on one machine (same BLAS, same thread count); dense candidates are only selected, never
    recomputed, so with no factored candidate the result does not depend on the tiling at
    all. A factored candidate's tile is a matmul of another shape than the whole product's,
    and BLAS promises the same bits neither across shapes nor across CPUs: each entry is then
    ``left_i · right_j`` to within float32 matmul rounding (``|error| <= k·2⁻²³·Σ|left_i||right_j|``
    for inner size ``k``), and where two candidates' magnitudes agree to within that
    rounding, either may be selected.

    Args:
        candidates: same-shape ``out x in`` matrices or factor pairs, in input order.
        block_bytes: float32 size of one output tile.

    Returns:
        A new float32 ``out x in`` tensor.
    """
    if not candidates:
        raise ValueError("max_magnitude needs at least one candidate")
    first = candidates[0]
    n_out, n_in = (first[0].shape[0], first[1].shape[1]) if isinstance(first, tuple) else tuple(first.shape)
    merged = torch.empty(n_out, n_in)
    # Tiles about 4:1 wide, up to 128 rows: each tile's matmul re-packs its right factor, so
    # short tiles would run the products well below peak.
    tile_elems = max(1, block_bytes // 4)
    tile_rows = min(n_out, max(1, min(128, math.isqrt(tile_elems // 4))))
    tile_cols = min(n_in, max(1, tile_elems // max(1, tile_rows)))
    tile_rows = min(n_out, max(tile_rows, tile_elems // max(1, tile_cols)))
    row_spans, col_spans = _spans(n_out, tile_rows), _spans(n_in, tile_cols)
    tile_cols, tile_rows = max(b - a for a, b in col_spans), max(b - a for a, b in row_spans)
    scratch_elems = tile_rows * tile_cols if len(candidates) > 1 else 0
    scratch_value = torch.empty(scratch_elems)
    scratch_a = torch.empty(scratch_elems, dtype=torch.int32)
    scratch_b = torch.empty(scratch_elems, dtype=torch.int32)
    # 0-dim int32 operands: a Python int would be wrapped into a new tensor on every call.
    magnitude_bits, sign_shift = torch.tensor(_MAGNITUDE_BITS, dtype=torch.int32), torch.tensor(31, dtype=torch.int32)

    def tile_of(cand: Candidate, rows: tuple[int, int], cols: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
        """The candidate's float32 values on a tile: a view of a dense candidate, else ``out``."""
        if isinstance(cand, tuple):
            left, right = cand[0][rows[0] : rows[1]], cand[1][:, cols[0] : cols[1]]
            if left.dtype == right.dtype == out.dtype:
                return torch.mm(left, right, out=out)
            return out.copy_(left @ right)
        tile = cand[rows[0] : rows[1], cols[0] : cols[1]]
        return tile if tile.dtype == out.dtype else out.copy_(tile)

    for rows in row_spans:
        h = rows[1] - rows[0]
        for cols in col_spans:
            w = cols[1] - cols[0]
            best = merged[rows[0] : rows[1], cols[0] : cols[1]]
            values = tile_of(first, rows, cols, best)
            if values is not best:
                best.copy_(values)
            if len(candidates) == 1:
                continue
            best_bits = best.view(torch.int32)
            buffer = scratch_value[: h * w].view(h, w)
            a, b = scratch_a[: h * w].view(h, w), scratch_b[: h * w].view(h, w)
            for cand in candidates[1:]:
                bits = tile_of(cand, rows, cols, buffer).view(torch.int32)
                torch.bitwise_and(bits, magnitude_bits, out=a)  # |new|
                torch.bitwise_and(best_bits, magnitude_bits, out=b)  # |best|
                torch.sub(a, b, out=b)  # >= 0 where the new value wins (ties included); no overflow
                b.bitwise_right_shift_(sign_shift)  # all ones where the kept value is strictly larger, else 0
                torch.bitwise_xor(bits, best_bits, out=a)
                b.bitwise_and_(a)
                torch.bitwise_xor(bits, b, out=best_bits)  # new ^ ((new ^ best) & keep_mask)
    return merged


def pcb_merge(task_tensors: list[torch.Tensor], ratio: float) -> torch.Tensor:
    """PCB-merging (Du et al., 2024): parameter competition balancing of task vectors.

    Intra-balancing scores each entry by its own squared, min-max-normalised magnitude
    (``exp(n · norm(|τ_i|)²)``); inter-balancing by its agreement with the other tasks
    (``tanh(τ_i · Σ_j τ_j)``). Per task, entries outside the top ``ratio`` fraction of the
    product score are dropped; the kept scores, min-max normalised, weight an average of
    the task vectors. This follows the authors' reference implementation without its outlier
    clamping of magnitudes.

    Args:
        task_tensors: same-shape task vectors (here the true LoRA deltas).
        ratio: fraction of entries kept per task, in ``(0, 1]``.

    Returns:
        The merged task vector.
    """
    stacked = torch.stack([t.float().reshape(-1) for t in task_tensors])
    n = stacked.shape[0]
    magnitude = stacked.abs()
    lo, hi = magnitude.amin(dim=1, keepdim=True), magnitude.amax(dim=1, keepdim=True)
    intra = torch.exp(n * ((magnitude - lo) / (hi - lo).clamp_min(1e-30)) ** 2)
    inter = torch.tanh(stacked * stacked.sum(dim=0))
    score = intra * inter
    n_keep = max(1, math.ceil(ratio * score.shape[1]))
    cutoff = score.topk(n_keep, dim=1).values[:, -1:]
    # Raising everything below the cut to the cut makes dropped entries weigh exactly 0 below.
    score = torch.maximum(score, cutoff)
    hi = score.amax(dim=1, keepdim=True)
    weight = (score - cutoff) / (hi - cutoff).clamp_min(1e-30)
    merged = (stacked * weight).sum(dim=0) / weight.sum(dim=0).clamp_min(1e-12)
    return merged.reshape(task_tensors[0].shape)


def add_scaled_gram_(total: torch.Tensor, gram: torch.Tensor, weight: float, alpha: float) -> torch.Tensor:
    """``total += weight · G̃``, ``G̃`` being ``gram`` with its off-diagonal entries times ``alpha``.

    ``G̃ = alpha·G + (1 - alpha)·diag(G)`` is RegMean's stabiliser (``alpha = 1``: the plain
    Gram); it is never formed, so ``gram`` is neither copied nor changed.

    Args:
        total: ``n x n`` running sum, updated in place.
        gram: ``n x n`` input Gram.
        weight: the input's weight.
        alpha: off-diagonal factor in ``[0, 1]``.

    Returns:
        ``total``.
    """
    total.add_(gram, alpha=weight * alpha)
    total.diagonal().add_(gram.diagonal(), alpha=weight * (1 - alpha))
    return total


def add_delta_gram_(
    total: torch.Tensor, delta: Candidate, gram: torch.Tensor, weight: float, alpha: float
) -> torch.Tensor:
    """``total += weight · ΔW G̃`` with ``G̃`` as in ``add_scaled_gram_`` (never formed).

    Args:
        total: ``out x n`` running sum, updated in place.
        delta: ``ΔW`` dense (``out x n``) or a low-rank pair ``(left, right)`` standing for
            ``left @ right``; a pair costs ``O(r·n²)`` instead of ``O(out·n²)``.
        gram: ``n x n`` input Gram.
        weight: the input's weight.
        alpha: off-diagonal factor in ``[0, 1]``.

    Returns:
        ``total``.
    """
    left, right = delta if isinstance(delta, tuple) else (None, delta)
    # right·G̃ = alpha·(right·G) + (1 - alpha)·right·diag(G): the diagonal part is a column scaling.
    projected = (right @ gram).mul_(alpha).add_(right * gram.diagonal(), alpha=1 - alpha)
    if left is None:
        return total.add_(projected, alpha=weight)
    return total.addmm_(left, projected, alpha=weight)


def regmean_system(
    task_gram: torch.Tensor, general_gram: torch.Tensor, general_weight: float, ridge: float, dtype: torch.dtype
) -> tuple[torch.Tensor, float]:
    """RegMean's normal matrix ``task + general_weight·general + ridge·d̄·I``, newly allocated.

    Args:
        task_gram: ``n x n`` sum of the tasks' (weighted, stabilised) Grams.
        general_gram: ``n x n`` sum of the general rows' Grams (a task whose delta is 0).
        general_weight: factor of ``general_gram``.
        ridge: ridge relative to ``d̄``, the mean diagonal of the matrix before the ridge.
        dtype: dtype of the result (float64 where memory allows).

    Returns:
        ``(system, ridge·d̄)``.
    """
    system = task_gram.to(dtype, copy=True)
    if general_weight:
        system.add_(general_gram, alpha=general_weight)
    absolute_ridge = ridge * float(system.diagonal().mean())
    system.diagonal().add_(absolute_ridge)
    return system, absolute_ridge


def cholesky_right_solve_(rhs: torch.Tensor, system: torch.Tensor) -> torch.Tensor | None:
    """``X`` with ``X · system = rhs`` for a symmetric positive definite ``system``, by Cholesky.

    Everything runs in place: the factorisation overwrites ``system`` and two triangular
    solves overwrite one copy of ``rhs``, so no second ``n x n`` buffer is made (LAPACK works
    on column-major matrices: ``system``'s transposed view is one, which a row-major ``out=``
    or ``cholesky_solve`` would copy in full). The solve runs in ``system``'s dtype.

    Args:
        rhs: ``out x n``.
        system: ``n x n`` symmetric, row-major contiguous; destroyed.

    Returns:
        float32 ``X`` (``out x n``), or ``None`` when ``system`` is not numerically positive
        definite or the solution is not finite (then ``system`` holds garbage).
    """
    info = torch.empty((), dtype=torch.int32)
    upper = system.T  # column-major; gets U with system = Uᵀ U, so ``system`` holds L = Uᵀ
    torch.linalg.cholesky_ex(upper, upper=True, out=(upper, info))
    if int(info) != 0:
        return None
    solution = torch.empty(rhs.shape[1], rhs.shape[0], dtype=system.dtype).copy_(rhs.T).T  # column-major
    torch.linalg.solve_triangular(upper, solution, upper=True, left=False, out=solution)  # X L ← rhs L⁻ᵀ
    torch.linalg.solve_triangular(system, solution, upper=False, left=False, out=solution)  # X ← X L⁻¹
    solution = solution.to(torch.float32).contiguous()
    if not bool(torch.isfinite(solution.sum())):
        return None
    return solution


def lstsq_right_solve(rhs: torch.Tensor, system: torch.Tensor) -> torch.Tensor:
    """``X`` minimising ``‖X · system - rhs‖`` for a symmetric, possibly singular ``system``.

    Rank-revealing (LAPACK ``gelsy``), so directions ``system`` does not see get ``X = 0``
    rather than noise. The fallback where Cholesky fails.

    Args:
        rhs: ``out x n``.
        system: ``n x n`` symmetric.

    Returns:
        float32 ``X`` (``out x n``).
    """
    solution = torch.linalg.lstsq(system, rhs.T.to(system.dtype), driver="gelsy").solution
    return solution.T.to(torch.float32).contiguous()


def row_space_basis(rows: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal rows spanning the row space of ``rows`` (float64 SVD).

    Args:
        rows: ``k x n`` (e.g. stacked LoRA ``A`` factors), ``k <= n`` in practice.
        rtol: directions with singular value ``<= rtol · σ_max`` are dropped (duplicates).

    Returns:
        float32 ``q x n`` with orthonormal rows, ``q <= k``.
    """
    _, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    return vh[s > rtol * s[0]].float()


def subspace_right_solve(
    rhs: torch.Tensor,
    task_gram: torch.Tensor,
    general_gram: torch.Tensor,
    general_weight: float,
    ridge: float,
    basis: torch.Tensor,
) -> tuple[torch.Tensor, str, float]:
    """RegMean restricted to ``ΔW = M Q``: ``M = (rhs Qᵀ)(Q G Qᵀ)⁻¹``, ``G`` as in ``regmean_system``.

    ``M Q`` is the least-squares fit, in ``G``'s metric, of ``X*`` with ``X* G = rhs`` among
    matrices whose rows lie in ``span(Q)``. ``Q G Qᵀ`` is built from the two Grams' projections
    (``G`` itself is never formed); the ``q x q`` solve runs in float64 (Cholesky, falling
    back to least squares).

    Args:
        rhs: ``out x n``.
        task_gram: ``n x n`` sum of the tasks' Grams.
        general_gram: ``n x n`` sum of the general rows' Grams.
        general_weight: factor of ``general_gram``.
        ridge: ridge relative to the mean diagonal of ``task + general_weight·general``.
        basis: ``Q``, ``q x n`` with orthonormal rows.

    Returns:
        ``(M, solver, absolute ridge)``: float32 ``out x q``, ``"cholesky"`` or ``"lstsq"``.
    """
    basis64 = basis.double()

    def projected(gram: torch.Tensor) -> torch.Tensor:
        return basis64 @ (gram @ basis.T).double()

    system = projected(task_gram)
    mean_diagonal = float(task_gram.diagonal().double().mean())
    if general_weight:
        system += general_weight * projected(general_gram)
        mean_diagonal += general_weight * float(general_gram.diagonal().double().mean())
    system = (system + system.T) / 2  # exact symmetry for Cholesky
    absolute_ridge = ridge * mean_diagonal
    system.diagonal().add_(absolute_ridge)  # Q orthonormal: Q (λ I) Qᵀ = λ I
    projected_rhs = (rhs @ basis.T).double()
    solution = cholesky_right_solve_(projected_rhs, system.clone())
    if solution is not None:
        return solution, "cholesky", absolute_ridge
    return lstsq_right_solve(projected_rhs, system), "lstsq", absolute_ridge


def concat_factors(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact sum ``Σ_i left_i @ right_i`` as one factor pair (PEFT's ``cat``, on true deltas).

    Args:
        pairs: ``(out x r_i, r_i x in)`` factor pairs; ranks may differ.

    Returns:
        ``([left_1 … left_T], [right_1; …; right_T])``: float32, ``out x Σr_i`` and ``Σr_i x in``.
    """
    return torch.cat([left.float() for left, _ in pairs], dim=1), torch.cat([right.float() for _, right in pairs], dim=0)


def polar_factor(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor ``P Qᵀ`` of ``x = P Σ Qᵀ`` (thin SVD, in float64).

    It is the matrix with orthonormal columns (rows, if ``x`` is wide) nearest to ``x``.

    Args:
        x: ``m x k``.

    Returns:
        ``m x k`` in ``x``'s dtype.
    """
    p, _, qh = torch.linalg.svd(x.double(), full_matrices=False)
    return (p @ qh).to(x.dtype)


def tsv_merge(
    triplets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], shape: tuple[int, int], alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """TSV-M (Gargiulo et al., CVPR 2025): the tasks' leading singular vectors, decorrelated.

    Each of the ``T`` tasks keeps its top ``max(1, ⌊min(out, in) / T⌋)`` triplets (all it has,
    if fewer); their ``U``'s side by side and ``V``'s side by side are replaced by their
    polar factors ``U⊥``, ``V⊥`` (the nearest orthonormal sets), and the merge is
    ``α · U⊥ diag(S) V⊥ᵀ`` with the kept ``S`` on the diagonal.

    Args:
        triplets: per task ``(U, S, Vh)`` of its ``ΔW_t`` (``out x k_t``, ``k_t`` descending,
            ``k_t x in``).
        shape: ``(out, in)``.
        alpha: global scale of the merge.

    Returns:
        ``(α · U⊥ diag(S), V⊥ᵀ)``: ``out x P`` and ``P x in``, ``P`` the kept triplets in all.
    """
    per_task = max(1, min(shape) // len(triplets))
    u = torch.cat([u[:, :per_task] for u, _, _ in triplets], dim=1)
    s = torch.cat([s[:per_task] for _, s, _ in triplets])
    vh = torch.cat([vh[:per_task] for _, _, vh in triplets], dim=0)
    return polar_factor(u) * (alpha * s), polar_factor(vh.T).T
