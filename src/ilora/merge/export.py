"""Outputs besides the merged state: a low-rank PEFT adapter and the merged full model (saved or loaded)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ilora.errors import IloraError
from ilora.fileio import to_json
from ilora.merge import ops
from ilora.merge.io import LowRankDelta, MergedState, load_merged_state
from ilora.merge.method import module_generator
from ilora.models.adapter import ADAPTER_WEIGHTS, PEFT_PREFIX
from ilora.models.load import load_vlm_with_adapter

EXPORT_REPORT = "export_report.json"
MODEL_CARD = "README.md"
# The merge record inside a saved model folder; not merge_record.json, which marks a merged-state folder.
MODEL_MERGE_RECORD = "ilora_merge_record.json"
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
    _write_prompt_settings(state, out_dir)
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


def load_vlm_merged(
    name_or_path: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    merged_state: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
):
    """A VLM with a PEFT adapter folded into its weights and/or a merged ΔW state added.

    The adapter is checked and folded as :func:`~ilora.models.load.load_vlm_with_adapter` does;
    the merged state (a folder ``ilora merge`` wrote) is then added to the weights.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    model, processor = load_vlm_with_adapter(name_or_path, adapter, dtype, device)
    if merged_state is not None:
        apply_merged_state(model, load_merged_state(merged_state))
    return model.eval(), processor


def save_merged_model(state: MergedState, base: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Save ``base + ΔW`` as a standard Hugging Face folder (same architecture, dtype and size),
    with its own model card (``README.md``: method, inputs with hashes, options, the merge
    record), the merge record (``ilora_merge_record.json``) and, where the inputs record one, the
    prompt they were trained with (``prompt_settings.json``, what ``ilora play`` reads).

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
        # The base's own card describes the base, not this model.
        for item in sorted(base_dir.iterdir()):
            copied = item.is_file() and not item.name.endswith(MODEL_WEIGHT_SUFFIXES) and item.name != MODEL_CARD
            if copied and not (out_dir / item.name).exists():
                shutil.copy2(item, out_dir / item.name)
    (out_dir / MODEL_MERGE_RECORD).write_text(to_json({**state.meta, "modules": state.records}) + "\n")
    prompt = _write_prompt_settings(state, out_dir)
    auto_class = "AutoModelForImageTextToText" if hasattr(model.config, "vision_config") else "AutoModelForCausalLM"
    (out_dir / MODEL_CARD).write_text(model_card(state, base, len(state.deltas), auto_class, prompt))
    return out_dir


def merged_prompt_settings(inputs: list[str | os.PathLike | None]):
    """The prompt the inputs of a merge were trained with: each adapter's ``prompt_settings.json``,
    a merged state's from its own inputs (as its ``merge_record.json`` names them).

    Returns:
        The combined :class:`~ilora.prompt_settings.PromptSettings`, or ``None`` when no input records one.

    Raises:
        IloraError: Two inputs were trained with different prompts (one line naming both).
    """
    from ilora.merge.io import MERGE_RECORD
    from ilora.prompt_settings import combine_prompt_settings, read_prompt_settings

    named = []
    for path in inputs:
        if path is None or not Path(path).is_dir():
            continue
        settings = read_prompt_settings(path)
        if settings is None and (Path(path) / MERGE_RECORD).is_file():
            inner = json.loads((Path(path) / MERGE_RECORD).read_text()).get("inputs", [])
            settings = merged_prompt_settings([entry.get("path") for entry in inner])
        named.append((str(path), settings))
    return combine_prompt_settings(named)


def _write_prompt_settings(state: MergedState, out_dir: Path):
    """Write the merge inputs' prompt settings into ``out_dir`` (if they record one); returns them."""
    try:
        prompt = merged_prompt_settings([entry.get("path") for entry in state.meta.get("inputs", [])])
    except IloraError:  # inputs of different prompts (``ilora merge`` refuses them first): none to play with
        return None
    if prompt is not None:
        prompt.write(out_dir)
    return prompt


def _method_summary(method: str) -> str:
    """The first paragraph of a registered method's docstring, on one line."""
    from ilora.merge.registry import method_class

    doc = (method_class(method).__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "`")  # reST literals as Markdown code


def model_card(
    state: MergedState, base: str | os.PathLike, n_modules: int, auto_class: str = "AutoModelForImageTextToText",
    prompt=None,
) -> str:
    """The README.md of a merged model folder: what was merged, how, from what, and how to load it.

    Args:
        state: the merged state (its ``meta``: method, options, inputs with hashes, base).
        base: the base model the deltas were added to.
        n_modules: weight matrices changed.
        auto_class: the ``transformers`` auto class that loads the model.
        prompt: the inputs' :class:`~ilora.prompt_settings.PromptSettings`, if recorded.

    Returns:
        Markdown with a Hugging Face metadata header.
    """
    from ilora import __version__

    meta = state.meta
    method, inputs = meta.get("method", "?"), meta.get("inputs", [])
    base_name = meta.get("base_model") or str(base)
    header = ["---", "library_name: transformers", "tags:", "- ilora", "- lora", "- merge"]
    if not Path(base_name).exists():  # a hub id, which the Hub links to
        header.insert(1, f"base_model: {base_name}")
    lines = header + [
        "---",
        "",
        f"# {len(inputs)} input(s) merged with `{method}`",
        "",
        (
            f"A full Hugging Face model: the base model `{base_name}` with one merged weight delta ΔW added to "
            f"{n_modules} of its weight matrices (same architecture, dtype and size as the base). Written by "
            f"`ilora merge --save-model` (ilora {__version__}); nothing here was trained after the merge."
        ),
        "",
        "## Method",
        "",
        f"`{method}`: {_method_summary(method)}",
        "",
        f"Options: `{json.dumps(meta.get('options', {}), sort_keys=True)}`",
        "",
        "## Inputs",
        "",
        "In merge order (order breaks ties). sha256 of an adapter's weights file, or of a merged state's record.",
        "",
        "| # | kind | path | sha256 |",
        "|---|---|---|---|",
        *[f"| {i} | {e.get('kind')} | `{e.get('path')}` | `{e.get('sha256')}` |" for i, e in enumerate(inputs)],
        "",
        "## Prompt",
        "",
    ]
    if prompt is None:
        lines.append("The inputs record no Atari prompt settings (`prompt_settings.json`).")
    else:
        answers = "reasoning, then `Action: NAME`" if prompt.reasoning else "direct `Action: NAME`"
        lines.append(
            f"Trained on {', '.join(prompt.games)} with object-state text {'on' if prompt.object_text else 'off'} "
            f"and {answers} answers, frames {prompt.frame_skip} emulator frames apart (`prompt_settings.json`); "
            "`ilora play --model THIS_FOLDER` plays with that prompt."
        )
    lines += [
        "",
        "## Merge record",
        "",
        (
            f"`{MODEL_MERGE_RECORD}`: the method, its options, the inputs with their hashes, the base, and per "
            "module what the method kept (ranks, thresholds). The merged state this model was built from (the ΔW "
            "themselves, `merge_record.json`) is the folder above this one."
        ),
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import AutoProcessor, {auto_class}",
        "",
        f'model = {auto_class}.from_pretrained("THIS_FOLDER")',
        'processor = AutoProcessor.from_pretrained("THIS_FOLDER")',
        "```",
        "",
    ]
    return "\n".join(lines)
