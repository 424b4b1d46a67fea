"""The routing-tuning loss terms as pure tensor functions (SPEC §1).

Nothing here knows about models, hooks or the Trainer: each function takes tensors and
returns tensors, so the maths is testable on hand-made inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def causal_lm_loss(target_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (float32 whatever the logits dtype).

    Args:
        target_logits: ``[N, V]`` logits at the N target positions.
        targets: ``[N]`` token ids.

    Returns:
        Scalar loss; ``0`` (still attached to the graph) when ``N == 0``.
    """
    if targets.numel() == 0:
        return target_logits.sum() * 0.0
    return F.cross_entropy(target_logits.float(), targets, reduction="mean")


def _kl_sum(base_logits: torch.Tensor, lora_logits: torch.Tensor) -> torch.Tensor:
    base_logp = base_logits.float().log_softmax(-1)
    lora_logp = lora_logits.float().log_softmax(-1)
    return F.kl_div(lora_logp, base_logp, reduction="sum", log_target=True)


def kl_base_lora(base_logits: torch.Tensor, lora_logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Mean over positions of ``KL(p_base ‖ p_lora)``, computed in chunks of positions.

    Each chunk is upcast to float32 and recomputed in the backward pass (activation
    checkpointing), so at most ``chunk_size × V`` float32 values live at a time even with a
    150k-token vocabulary.

    Args:
        base_logits: ``[N, V]`` logits of the model with its adapters disabled (no gradient).
        lora_logits: ``[N, V]`` logits of the model with its adapter, same positions.
        chunk_size: positions per chunk.

    Returns:
        Scalar mean KL; ``0`` (attached to the graph) when ``N == 0``. Exactly 0 when the
        two logit tensors are equal.
    """
    n = lora_logits.shape[0]
    if n == 0:
        return lora_logits.sum() * 0.0
    total = lora_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        if lora_logits.requires_grad:
            total = total + checkpoint(_kl_sum, base_logits[sl], lora_logits[sl], use_reentrant=False)
        else:
            total = total + _kl_sum(base_logits[sl], lora_logits[sl])
    return total / n


class _LowRankSquaredNorm(torch.autograd.Function):
    """``Σ_mask ‖scaling · h Wᵀ‖²`` that keeps only ``h`` and ``W`` for backward.

    ``h`` (the rank-r LoRA-A output) and ``W`` (the lora_B weight) are already held by
    autograd for lora_B's own backward, so the full-width output is recomputed instead of
    stored: the norm term then costs no activation memory.
    """

    @staticmethod
    def forward(ctx, h, weight, mask, scaling):
        out = F.linear(h, weight)
        per_position = out.pow(2).sum(-1, dtype=torch.float32)
        if mask is not None:
            per_position = per_position * mask
        ctx.save_for_backward(h, weight, mask)
        ctx.scaling = scaling
        return per_position.sum() * (scaling * scaling)

    @staticmethod
    def backward(ctx, grad):
        h, weight, mask = ctx.saved_tensors
        coeff = 2.0 * ctx.scaling * ctx.scaling * grad
        g_out = F.linear(h, weight).float() * coeff
        if mask is not None:
            g_out = g_out * mask.unsqueeze(-1)
        g_out = g_out.to(h.dtype)
        grad_h = g_out @ weight if ctx.needs_input_grad[0] else None
        grad_w = g_out.flatten(0, -2).T @ h.flatten(0, -2) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def lora_b_squared_norm(
    h: torch.Tensor, weight: torch.Tensor, scaling: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """Sum over positions of ``‖scaling · lora_B(h)‖²`` for a bias-free lora_B.

    Args:
        h: ``[..., r]`` lora_B input (the LoRA-A output).
        weight: ``[D, r]`` lora_B weight.
        scaling: the LoRA layer's ``alpha / r``.
        mask: float ``h.shape[:-1]`` of 0/1 selecting the positions to count, or ``None``.

    Returns:
        Float32 scalar, differentiable in ``h`` and ``weight``.
    """
    return _LowRankSquaredNorm.apply(h, weight, mask, float(scaling))


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
