"""Turning example rows into model inputs, the same way for training, scoring and playing.

An example row is ``{"images": [PIL.Image, ...], "prompt": str, "answer": str, ...}``, with an
optional ``context`` str. The user turn is the context (when given and not empty), then the
images, then the prompt; the assistant turn is the answer. Only the answer tokens (and the
end-of-turn token after them) carry labels.

``context`` is text that is the same for many rows (an Atari game's rules and actions): placed
before the images it makes every row of a game start with the same tokens, so an agent can
compute their KV cache once (:class:`ilora.models.scoring.PromptPrefix`). Rows without it (general
data) are encoded as before: images first, then the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ilora.errors import IloraError

IGNORE_INDEX = -100


def chat_messages(n_images: int, prompt: str, context: str | None = None) -> list[dict[str, Any]]:
    """The user turn in the structured chat format every HF VLM chat template accepts.

    Content order: ``context`` text (omitted when empty), ``n_images`` images, ``prompt`` text.
    """
    content: list[dict[str, Any]] = [{"type": "text", "text": context}] if context else []
    content += [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def chat_text(processor, n_images: int, prompt: str, context: str | None = None) -> str:
    """The user turn rendered by the processor's chat template, with the assistant turn opened."""
    messages = chat_messages(n_images, prompt, context)
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def check_images(images: Sequence[Any], where: str = "example") -> list:
    """Validate and convert images to RGB PIL images (any size; the processor resizes)."""
    from PIL import Image

    out = []
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise IloraError(f"{where}: image {i} is a {type(img).__name__}, expected a PIL image")
        if img.width == 0 or img.height == 0:
            raise IloraError(f"{where}: image {i} is empty ({img.width}x{img.height})")
        out.append(img if img.mode == "RGB" else img.convert("RGB"))
    return out


def image_token(processor) -> str:
    """The placeholder token the processor expands into image patches."""
    token = getattr(processor, "image_token", None)
    if token is None:
        raise IloraError(f"{type(processor).__name__} has no image_token: not a vision-language processor")
    return token


def encode_example(
    processor, images: Sequence[Any], prompt: str, answer: str | None = None, context: str | None = None
) -> dict[str, Any]:
    """Token ids (and labels when ``answer`` is given) plus pixel values for one example.

    ``context`` (optional) is text placed before the images (see the module docstring).

    The prompt part goes through the processor (which expands image tokens); the answer is
    tokenised on its own and appended, so the label boundary is exact whatever the template.

    Returns:
        ``input_ids`` (list[int]), ``labels`` (list[int] or None), ``pixel_values``
        (float tensor ``[n_images, 3, H, W]`` or None).
    """
    tok = processor.tokenizer
    marker = image_token(processor)
    if any(marker in t for t in (prompt, answer, context) if t is not None):
        raise IloraError(f"example text contains the image token {marker!r}; images are passed separately")
    images = check_images(images)
    text = chat_text(processor, len(images), prompt, context)
    enc = processor(text=[text], images=images or None, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    labels = None
    if answer is not None:
        answer_ids = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
        labels = [IGNORE_INDEX] * len(ids) + answer_ids
        ids = ids + answer_ids
    return {"input_ids": ids, "labels": labels, "pixel_values": enc.get("pixel_values")}


def pad_batch(features: Sequence[dict[str, Any]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad encoded examples into one batch; pixel values of all examples are concatenated.

    ``padding_side="left"`` is for generation and next-token scoring, ``"right"`` for training.
    """
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    has_labels = features[0].get("labels") is not None
    labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long) if has_labels else None
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        sl = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        ids[i, sl] = torch.tensor(f["input_ids"])
        mask[i, sl] = 1
        if has_labels:
            labels[i, sl] = torch.tensor(f["labels"])
    batch = {"input_ids": ids, "attention_mask": mask}
    if has_labels:
        batch["labels"] = labels
    pixels = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def encode_row(processor, row: dict[str, Any], with_answer: bool = True) -> dict[str, Any]:
    """:func:`encode_example` for a row (``images``, ``prompt``, optionally ``context``/``answer``)."""
    return encode_example(
        processor,
        row.get("images") or [],
        row["prompt"],
        row["answer"] if with_answer else None,
        context=row.get("context"),
    )


def encode_rows(
    processor, rows: Sequence[dict[str, Any]], with_answer: bool = True, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Encode and pad a list of example rows (``images``, ``prompt``, optionally ``context``, ``answer``)."""
    feats = [encode_row(processor, r, with_answer) for r in rows]
    return pad_batch(feats, processor.tokenizer.pad_token_id, padding_side)
