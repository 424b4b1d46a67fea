"""Outputs besides the merged state: a low-rank PEFT adapter and the merged full model."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ilora.errors import IloraError
from ilora.merge import ops
from ilora.merge.io import LowRankDelta, MergedState
from ilora.merge.registry import module_generator
from ilora.models.adapter import ADAPTER_WEIGHTS, PEFT_PREFIX

EXPORT_REPORT = "export_report.json"
# Files of a model folder that save_pretrained rewrites; everything else (tokenizer,
# processor, chat template...) is copied from the base folder.
MODEL_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def export_lora(state: MergedState, out_dir: str | os.PathLike, rank: int | None = None, seed: int = 0) -> dict:
    """Write a PEFT LoRA adapter whose ``B @ A`` is the best rank-``rank`` approximation of each ΔW.

    ``lora_alpha = r`` so the scaling is 1, and ``B = U√S``, ``A = √S Vh`` split the
    singular values evenly between the factors. A module stored factored at rank ``<= rank``
    is exported as its own factors (no SVD, zero error); one of higher rank gets its best
    rank-``rank`` approximation from the factors' SVD (never the dense ΔW).

    Args:
        state: the merged state.
        out_dir: the adapter folder to create.
        rank: LoRA rank of the export (capped per module at ``min(out, in)``); ``None``: the
            state's own rank, the largest of its factored modules (all must be factored).
        seed: seed of the truncated SVD's start block.

    Returns:
        The report also written to ``out_dir/export_report.json``: per-module and overall
        relative Frobenius error ``‖ΔW - BA‖ / ‖ΔW‖``, and ``from_factors``, the modules
        exported as their own factors.
    """
    from peft import LoraConfig

    if rank is None:
        stored = {key: state.load(key.removesuffix(".weight")) for key in state.deltas}
        dense = sorted(key for key, d in stored.items() if not isinstance(d, LowRankDelta))
        if dense:
            raise IloraError(f"{state.path or 'merged state'}: {dense[0]} is dense; give the export a rank")
        rank = max(d.rank for d in stored.values())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    tensors, errors, from_factors = {}, {}, []
    total_err = total_norm = 0.0
    for key in state.deltas:
        module = key.removesuffix(".weight")
        stored = state.load(module)
        if isinstance(stored, LowRankDelta):
            lora_B, lora_A, err, norm = _factored_export(stored, rank)
            if stored.rank <= rank:
                from_factors.append(module)
        else:
            delta = stored.delta
            u, s, vh, _ = ops.leading_singular_triplets(delta, count=rank, generator=module_generator(seed, module))
            # PEFT needs one rank for all modules: pad small modules' factors with zeros.
            root = s.sqrt()
            lora_B = torch.zeros(delta.shape[0], rank)
            lora_A = torch.zeros(rank, delta.shape[1])
            lora_B[:, : len(s)] = u * root
            lora_A[: len(s)] = root[:, None] * vh
            err = float(torch.linalg.matrix_norm(delta - lora_B @ lora_A))
            norm = float(torch.linalg.matrix_norm(delta))
        errors[module] = err / norm if norm > 0 else 0.0
        total_err, total_norm = total_err + err**2, total_norm + norm**2
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = lora_A.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = lora_B.contiguous()
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(errors),
        base_model_name_or_path=state.base_model,
        lora_dropout=0.0,
    )
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS))
    report = {
        "rank": rank,
        "relative_error": math.sqrt(total_err / total_norm) if total_norm > 0 else 0.0,
        "modules": errors,
        "from_factors": from_factors,
    }
    (out_dir / EXPORT_REPORT).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return report


def _factored_export(delta: LowRankDelta, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """A factored ΔW as rank-``rank`` PEFT factors (zero-padded): ``(lora_B, lora_A, ‖ΔW - BA‖, ‖ΔW‖)``."""
    lora_B, lora_A = torch.zeros(delta.shape[0], rank), torch.zeros(rank, delta.shape[1])
    if delta.rank <= rank:
        lora_B[:, : delta.rank], lora_A[: delta.rank] = delta.lora_B * delta.scale, delta.lora_A
        # ‖B A‖² = Σ (BᵀB) ∘ (A Aᵀ): the norm from the factors' Grams.
        gram_b, gram_a = lora_B.double().T @ lora_B.double(), lora_A.double() @ lora_A.double().T
        return lora_B, lora_A, 0.0, math.sqrt(max(0.0, float((gram_b * gram_a).sum())))
    u, s, vh = ops.factorized_svd(delta.lora_B, delta.lora_A, delta.scale)
    kept = min(rank, len(s))
    root = s[:kept].sqrt()
    lora_B[:, :kept], lora_A[:kept] = u[:, :kept] * root, root[:, None] * vh[:kept]
    energy = s.double().square()
    return lora_B, lora_A, math.sqrt(float(energy[kept:].sum())), math.sqrt(float(energy.sum()))


def apply_merged_state(model: torch.nn.Module, state: MergedState) -> None:
    """Add every ΔW of ``state`` to ``model``'s weight of the same name, in place (float32 sum)."""
    params = dict(model.named_parameters())
    where = state.path or "merged state"
    with torch.no_grad():
        for key in state.deltas:
            if key not in params:
                raise IloraError(f"{where}: weight {key!r} is not in the base model")
            param, delta = params[key], state.deltas[key]
            if tuple(param.shape) != tuple(delta.shape):
                raise IloraError(f"{where}: {key} has shape {tuple(delta.shape)}, the base {tuple(param.shape)}")
            param.copy_((param.float() + delta.to(param.device)).to(param.dtype))


def save_merged_model(state: MergedState, base: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Save ``base + ΔW`` as a standard Hugging Face folder (same architecture, dtype and size).

    Args:
        state: the merged state.
        base: the base model folder.
        out_dir: the folder to create.

    Returns:
        ``out_dir``.
    """
    from ilora.models.load import load_model

    model = load_model(base, dtype="auto")
    apply_merged_state(model, state)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    base_dir = Path(base)
    if base_dir.is_dir():
        for item in sorted(base_dir.iterdir()):
            if item.is_file() and not item.name.endswith(MODEL_WEIGHT_SUFFIXES) and not (out_dir / item.name).exists():
                shutil.copy2(item, out_dir / item.name)
    return out_dir
