"""The routing-tuning loss terms as pure tensor functions (SPEC §1).

Nothing here knows about models, hooks or the Trainer: each function takes tensors and
returns tensors, so the maths is testable on hand-made inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ilora.models.inputs import IGNORE_INDEX


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the next-token predictions for labelled tokens are made.

    Args:
        labels: ``[B, T]`` token ids, ``IGNORE_INDEX`` where no loss applies.

    Returns:
        ``(rows, positions, targets)``: 1-D tensors of equal length; the logits at
        ``[rows[i], positions[i]]`` predict token ``targets[i]`` (``positions = t - 1``).
    """
    shifted = labels[:, 1:]
    rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols, shifted[rows, cols]


def target_counts(labels: torch.Tensor) -> torch.Tensor:
    """Per row, how many next-token predictions ``target_positions`` finds (``[B]``, no host sync)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)


def causal_lm_loss(
    target_logits: torch.Tensor, targets: torch.Tensor, num_items: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Next-token cross-entropy summed over the target tokens and divided by their number, or by
    ``num_items`` (float32 whatever the logits dtype).

    Args:
        target_logits: ``[N, V]`` logits at the N target positions.
        targets: ``[N]`` token ids; ``IGNORE_INDEX`` entries take no part (nor in the count).
        num_items: the divisor when these targets are part of a larger batch (the target tokens of
            every micro-batch of one optimiser step); ``None``: the targets counted here.

    Returns:
        Scalar loss; ``0`` (still attached to the graph) when no target counts.
    """
    if targets.numel() == 0:
        return target_logits.sum() * 0.0
    total = F.cross_entropy(target_logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items is None:
        num_items = (targets != IGNORE_INDEX).sum()
    return total / _at_least_one(num_items)


def _at_least_one(count: torch.Tensor | int) -> torch.Tensor | int:
    """A divisor that is never 0 (an empty sum divided by it stays 0)."""
    return count.clamp_min(1) if torch.is_tensor(count) else max(count, 1)


def _kl_chunks(base_logits: torch.Tensor, lora_logits: torch.Tensor, chunk_size: int, grad: torch.Tensor | None):
    """``Σ KL(p_base ‖ p_lora)`` over positions in float32 chunks; with ``grad`` given, also
    writes ``∂/∂lora_logits = p_lora − p_base`` into it, chunk by chunk."""
    total = torch.zeros((), dtype=torch.float32, device=lora_logits.device)
    for start in range(0, lora_logits.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        base_logp = base_logits[sl].float().log_softmax(-1)
        lora_logp = lora_logits[sl].float().log_softmax(-1)
        base_p = base_logp.exp()
        total = total + (base_p * (base_logp - lora_logp)).sum()
        if grad is not None:
            grad[sl] = lora_logp.exp() - base_p
    return total


class _ChunkedKL(torch.autograd.Function):
    """``Σ KL(p_base ‖ p_lora)`` whose gradient is formed in the same float32 pass.

    The gradient in the LoRA logits is ``p_lora − p_base`` per position, so the forward
    writes it (in the logits' dtype) while each float32 chunk is live and the backward only
    scales it: one ``[N, V]`` tensor is kept instead of both logit tensors, nothing is
    recomputed, and no ``chunk × V`` float32 block outlives its chunk.
    """

    @staticmethod
    def forward(ctx, base_logits, lora_logits, chunk_size):
        grad = torch.empty_like(lora_logits)
        total = _kl_chunks(base_logits, lora_logits, chunk_size, grad)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return None, grad * grad_total.to(grad.dtype), None


def kl_base_lora(
    base_logits: torch.Tensor,
    lora_logits: torch.Tensor,
    chunk_size: int = 1024,
    num_items: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Mean over positions of ``KL(p_base ‖ p_lora)``, computed in float32 chunks of positions
    (the sum divided by ``num_items`` when given).

    At most ``chunk_size × V`` float32 values live at a time even with a 150k-token
    vocabulary; with gradients, the gradient is formed in the same pass (``_ChunkedKL``).

    Args:
        base_logits: ``[N, V]`` logits of the model with its adapters disabled (no gradient;
            may be an inference-mode tensor).
        lora_logits: ``[N, V]`` logits of the model with its adapter, same positions.
        chunk_size: positions per chunk.
        num_items: the divisor when these positions are part of a larger batch (the positions
            of every micro-batch of one optimiser step); ``None``: ``N``.

    Returns:
        Scalar mean KL; ``0`` (attached to the graph) when ``N == 0``. Exactly 0 when the
        two logit tensors are equal.
    """
    n = lora_logits.shape[0]
    if n == 0:
        return lora_logits.sum() * 0.0
    divisor = n if num_items is None else _at_least_one(num_items)
    if lora_logits.requires_grad and torch.is_grad_enabled():
        return _ChunkedKL.apply(base_logits, lora_logits, chunk_size) / divisor
    return _kl_chunks(base_logits, lora_logits, chunk_size, None) / divisor


class _LowRankSquaredNorms(torch.autograd.Function):
    """Per layer ``Σ_n m_n ‖W h_n‖²`` in Gram form for LoRA layers whose inputs share a shape.

    ``Σ_n m_n ‖W h_n‖² = ⟨WᵀW, hᵀ M h⟩`` with two ``r × r`` Gram matrices, so a layer costs
    ``N·r² + D·r²`` instead of ``N·r·D`` and the backward is as cheap:
    ``∂/∂h_n = 2 m_n (WᵀW) h_n`` and ``∂/∂W = 2 W (hᵀ M h)``. All the layers' ``hᵀ M h`` are
    one batched matmul on the selected slices of the stacked inputs, and each run of
    same-shaped weights one batched ``WᵀW``: a few ops for the whole group instead of a
    handful per layer. Only the inputs (already held by autograd for lora_B's own backward),
    the selection and the ``r × r`` matrices are saved: no activation memory. Float32.
    """

    @staticmethod
    def forward(ctx, mask, index, n_layers, *tensors):
        hs, ws = tensors[:n_layers], tensors[n_layers:]
        h = _stacked(hs, index)
        weighted = h if mask is None else h * mask
        gram_h = weighted.transpose(1, 2) @ h
        runs = _same_shape_runs(ws)
        grams_w = []
        for start, stop in runs:
            w = torch.stack(ws[start:stop]).float()
            grams_w.append(w.transpose(1, 2) @ w)
        gram_w = grams_w[0] if len(grams_w) == 1 else torch.cat(grams_w)
        ctx.save_for_backward(mask, index, gram_h, gram_w, *tensors)
        ctx.n_layers, ctx.runs = n_layers, runs
        return (gram_h * gram_w).sum((1, 2))

    @staticmethod
    def backward(ctx, grad):
        mask, index, gram_h, gram_w, *tensors = ctx.saved_tensors
        n = ctx.n_layers
        hs, ws = tensors[:n], tensors[n:]
        coeff = (2.0 * grad).view(n, 1, 1)
        grads_h, grads_w = [None] * n, [None] * n
        if any(ctx.needs_input_grad[3 : 3 + n]):
            g = (_stacked(hs, index) @ gram_w) * coeff
            if mask is not None:
                g = g * mask
            shape = hs[0].shape
            g = g.to(hs[0].dtype)
            if index is None:
                g = g.reshape(n, *shape)
            else:
                g = g.new_zeros(n, *shape).index_copy_(1, index, g.reshape(n, index.numel(), *shape[1:]))
            grads_h = list(g.unbind(0))
        if any(ctx.needs_input_grad[3 + n :]):
            scaled_h = gram_h * coeff
            grads_w = []
            for start, stop in ctx.runs:
                w = torch.stack(ws[start:stop]).float()
                grads_w += (w @ scaled_h[start:stop]).to(ws[start].dtype).unbind(0)
        return (None, None, None, *grads_h, *grads_w)


def _stacked(hs, index):
    """``[L, N, r]`` float32: the layers' inputs, only the slices ``index`` of their first dimension."""
    h = torch.stack(hs)
    if index is not None:
        h = h.index_select(1, index)
    return h.reshape(len(hs), -1, hs[0].shape[-1]).float()


def _same_shape_runs(ws) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of consecutive weights with the same shape and dtype."""
    runs, start = [], 0
    for i in range(1, len(ws) + 1):
        if i == len(ws) or ws[i].shape != ws[start].shape or ws[i].dtype != ws[start].dtype:
            runs.append((start, i))
            start = i
    return runs


def lora_b_squared_norms(
    hs: list[torch.Tensor],
    weights: list[torch.Tensor],
    mask: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per layer, the sum over positions of ``‖lora_B(h)‖²`` for bias-free lora_B layers.

    Args:
        hs: per layer the ``[S, ..., r]`` lora_B input (the LoRA-A output); all the same shape.
        weights: per layer the ``[D, r]`` lora_B weight (``D`` may differ; consecutive
            weights of one shape are batched together, so order them by shape).
        mask: float 0/1 selecting the positions to count among the kept slices, of shape
            ``[K, ...]`` (``hs[0][index].shape[:-1]``) or broadcastable to it, or already
            flattened to ``[K·..., 1]``; ``None``: all.
        index: long ``[K]``, the slices of the first dimension to count (rows of a batch, or
            images); ``None``: all ``S``.

    Returns:
        Float32 ``[len(hs)]`` (no scaling applied), differentiable in every ``h`` and weight;
        exactly 0 for a layer whose weight is 0.
    """
    if mask is not None:
        kept = torch.Size(hs[0].shape[:-1] if index is None else (index.numel(), *hs[0].shape[1:-1]))
        if mask.shape != (kept.numel(), 1) or mask.dtype != torch.float32:
            mask = mask.float().expand(kept).reshape(-1, 1)
    return _LowRankSquaredNorms.apply(mask, index, len(hs), *hs, *weights)


def lora_b_squared_norm(
    h: torch.Tensor, weight: torch.Tensor, scaling: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """Sum over positions of ``‖scaling · lora_B(h)‖²`` for a bias-free lora_B (one layer).

    Args:
        h: ``[..., r]`` lora_B input (the LoRA-A output).
        weight: ``[D, r]`` lora_B weight.
        scaling: the LoRA layer's ``alpha / r``.
        mask: float 0/1 selecting the positions to count, of shape ``h.shape[:-1]`` or
            broadcastable to it (e.g. ``[N, 1]``: whole leading-dimension slices), or ``None``.

    Returns:
        Float32 scalar, differentiable in ``h`` and ``weight``; exactly 0 when ``weight`` is 0.
    """
    return lora_b_squared_norms([h], [weight], mask)[0] * (float(scaling) ** 2)


def lora_norm_loss(sums: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """``L_norm``: per LoRA layer the mean squared output norm over its positions, summed over layers.

    Args:
        sums: per layer, the summed squared norms (from ``lora_b_squared_norm``).
        counts: per layer, how many positions were summed.

    Returns:
        Scalar float32 loss; layers with no positions are skipped.
    """
    terms = [s / c for s, c in zip(sums, counts) if c > 0]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
