"""``ilora base``: pretrain the small world's base VLM on general data (full-parameter).

This stands in for a pretrained VLM: it learns the general scene questions, to name Atari
games, and to ground Atari frames (object relations from the object-state text, object
cells from pixels). It never sees a game's policy — that is what the adapters learn.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from ilora.config import field, to_dict
from ilora.fileio import atomic_dir
from ilora.models.tiny import TinyVLMConfig


@dataclasses.dataclass
class BaseConfig:
    """How the default base model is built and pretrained."""

    model: TinyVLMConfig = field(default_factory=TinyVLMConfig, help="sizes of the tiny VLM")
    init: str | None = field(None, help="continue from this model folder instead of a fresh tiny VLM (sizes then ignored)")
    seed: int = field(0, help="seed for weights, data and training order")
    general_rows: int = field(6000, help="general scene/Atari-frame training rows")
    grounding_rows: int = field(3000, help="Atari grounding rows (relations, object cells, answer format)")
    test_rows: int = field(600, help="held-out general rows for the accuracy printed at the end")
    steps: int = field(1500, help="optimizer steps")
    batch_size: int = field(32, help="rows per step")
    learning_rate: float = field(2e-3, help="peak AdamW learning rate (cosine decay, 5% warm-up)")
    weight_decay: float = field(0.01, help="AdamW weight decay")
    dataloader_workers: int = field(0, help="processes encoding batches (use several on a GPU machine)")
    max_minutes: float = field(0.0, help="stop training after this many minutes (0: no limit); recorded")
    spread_action_embeddings: bool = field(
        False, help="before training, give every ALE action-name token its own embedding direction (see spread_embeddings)"
    )


def tokenizer_corpus() -> list[str]:
    """Text the tiny base's tokenizer is trained on: every word the Atari prompts and general data can emit.

    Gathered from the packages that generate text so the tokenizer covers them with whole-word
    tokens; byte-level BPE still encodes any other text (no unknown token).
    """
    from ilora.atari.prompts import prompt_vocabulary
    from ilora.general.data import general_vocabulary

    texts = list(general_vocabulary()) + list(prompt_vocabulary())
    # Answer words and the numbers 0-255 whatever the vocabularies above hold: the tokenizer, and so
    # every tiny model built with it, depends on them.
    texts += ["Action:", "the", "ball", "paddle", "is", "above", "below", "left", "right", "of", "image"]
    texts += [str(i) for i in range(256)]
    return texts


def base_training_rows(config: BaseConfig, split: str = "train") -> list[dict[str, Any]]:
    """The pretraining mixture: general rows plus Atari grounding rows, shuffled."""
    import random

    from ilora.atari.grounding import grounding_rows
    from ilora.general.data import generate_general_rows

    n_general = config.general_rows if split == "train" else config.test_rows
    n_grounding = config.grounding_rows if split == "train" else config.test_rows // 3
    rows = generate_general_rows(n_general, config.seed, split, image_size=config.model.image_size)
    # A disjoint seed stream for the held-out grounding rows.
    rows += grounding_rows(n_grounding, config.seed * 2 + (0 if split == "train" else 1))
    random.Random(config.seed).shuffle(rows)
    return rows


def spread_embeddings(model, token_ids: list[int], seed: int) -> float:
    """Move the (tied) embedding rows of ``token_ids`` apart: their mean plus orthonormal offsets.

    Pretraining on text where the action names are interchangeable leaves their embeddings
    nearly parallel (cosine 0.92-0.98 on the tiny base). The answer logits are read from
    those rows, and a LoRA adapter cannot move embeddings, so an adapter on such a base never
    told Pong's up from down; with the rows spread apart it learned Pong in 200 steps. The
    offsets have the rows' mean norm, so the scale of the embedding table is unchanged.

    Args:
        model: a model with input embeddings (tied output embeddings move with them).
        token_ids: the rows to spread (distinct ids, at most the hidden size of them).
        seed: seeds the random orthonormal directions.

    Returns:
        The largest cosine similarity between two of the rows afterwards.
    """
    import torch

    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        rows = weight[token_ids].float()
        gen = torch.Generator().manual_seed(seed)
        directions, _ = torch.linalg.qr(torch.randn(weight.shape[1], len(token_ids), generator=gen))
        spread = rows.mean(0) + rows.norm(dim=-1).mean() * directions.T
        weight[token_ids] = spread.to(weight.dtype)
        unit = torch.nn.functional.normalize(spread, dim=-1)
        return float((unit @ unit.T).fill_diagonal_(-1).max())


def action_token_ids(tokenizer) -> list[int]:
    """Token ids of every ALE action name of the catalogued games (single tokens in the tiny tokenizer)."""
    from ilora.atari.games import GAMES

    names = sorted({name for game in GAMES.values() for name in game.action_names})
    ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" " + name)) for name in names]
    return [i[0] for i in ids if len(i) == 1 and i[0] != tokenizer.unk_token_id]


def pretrain_base(config: BaseConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Build the tiny VLM, pretrain it, save it to ``out_dir`` with ``pretrain.json``.

    Returns:
        The record written to ``pretrain.json``: config, wall time, final loss and held-out
        accuracy per task (with chance-level references).
    """
    import torch
    from transformers import Trainer, TrainingArguments

    from ilora.base.callbacks import TimeBudgetCallback
    from ilora.general.benchmark import accuracy_by_task
    from ilora.models.inputs import encode_rows
    from ilora.models.load import load_vlm
    from ilora.models.tiny import build_tiny_vlm

    out_dir = Path(out_dir)
    t0 = time.time()
    torch.manual_seed(config.seed)
    with tempfile.TemporaryDirectory(prefix="ilora-base-") as scratch, atomic_dir(out_dir) as final:
        work = Path(scratch)
        init_dir = config.init or build_tiny_vlm(work / "init", config.model, seed=config.seed, corpus=tokenizer_corpus())
        model, processor = load_vlm(init_dir)
        spread_cosine = None
        if config.spread_action_embeddings:
            spread_cosine = spread_embeddings(model, action_token_ids(processor.tokenizer), config.seed)
        train_rows = base_training_rows(config, "train") if config.steps > 0 else []
        test_rows = base_training_rows(config, "test")
        data_seconds = time.time() - t0
        print(f"pretraining data: {len(train_rows)} train rows, {len(test_rows)} held-out rows ({data_seconds:.0f} s)")
        args = TrainingArguments(
            output_dir=str(work / "trainer"),
            max_steps=config.steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, config.steps // 20),
            logging_steps=max(1, config.steps // 20),
            save_strategy="no",
            report_to=[],
            seed=config.seed,
            data_seed=config.seed,
            remove_unused_columns=False,
            dataloader_num_workers=config.dataloader_workers,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=not progress,
        )
        budget = TimeBudgetCallback(config.max_minutes)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_rows,
            data_collator=functools.partial(encode_rows, processor),
            callbacks=[budget],
        )
        # steps=0 only applies the embedding surgery and evaluates.
        train_loss = trainer.train().training_loss if config.steps > 0 else None
        model.eval()
        model.save_pretrained(final)
        processor.save_pretrained(final)
        accuracy = accuracy_by_task(model, processor, test_rows)
        record = {
            "config": to_dict(config),
            "seconds": round(time.time() - t0, 1),
            "train_loss": train_loss,
            "action_embedding_max_cosine": spread_cosine,
            "steps_done": trainer.state.global_step,
            "stopped_by_time_budget": budget.stopped_at is not None,
            "data_seconds": round(data_seconds, 1),
            "loss_log": [h for h in trainer.state.log_history if "loss" in h],
            "heldout": accuracy,
            "device": str(model.device),
            "torch": torch.__version__,
        }
        (final / "pretrain.json").write_text(json.dumps(record, indent=1))
    return record
