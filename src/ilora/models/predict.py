"""Batched greedy answers from a VLM, for the general benchmark and offline agreement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ilora.models.inputs import encode_rows


@torch.no_grad()
def generate_answers(
    model, processor, rows: Sequence[dict[str, Any]], batch_size: int = 32, max_new_tokens: int = 8, progress: bool = False
) -> list[str]:
    """Greedy answers to each row's prompt (its ``answer``, if any, is ignored).

    Args:
        model: a HF VLM (a PEFT-wrapped one works too).
        processor: its processor.
        rows: example rows with ``images`` and ``prompt`` (and ``context``, placed before the images, if any).
        batch_size: rows per ``generate`` call (left-padded, KV cache on).
        max_new_tokens: answer length cap.

    Returns:
        The decoded answers, special tokens stripped, in row order.
    """
    from tqdm.auto import tqdm

    tok = processor.tokenizer
    was_training = model.training
    model.eval()
    answers: list[str] = []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc="answers", disable=not progress):
        batch = encode_rows(processor, rows[start : start + batch_size], with_answer=False, padding_side="left")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        answers += [a.strip() for a in tok.batch_decode(new, skip_special_tokens=True)]
    model.train(was_training)
    return answers
