"""The embedded default VLM: a tiny LLaVA-style model built from a config, no model hub.

Same architecture family as llava-interleave-qwen-7b — ``LlavaForConditionalGeneration`` with
a SigLIP vision tower, the two-layer projector and a Qwen2 language model — at a size that
trains on a laptop CPU. ``build_tiny_vlm`` writes a standard Hugging Face folder (weights,
config, tokenizer trained here with ``tokenizers``, a Pillow-only SigLIP image processor and
a chat template) that ``ilora.models.load.load_vlm`` (or plain ``from_pretrained``) loads
offline, exactly like a hub checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ilora.config import field
from ilora.fileio import atomic_dir

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN]

# Qwen2-style chat template: images first in the user turn, as the LLaVA processor expands
# each ``<image>`` into one token per patch. ``{% generation %}`` marks what gets labels.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclasses.dataclass
class TinyVLMConfig:
    """Sizes of the tiny default VLM (defaults: ~0.6M parameters, ~72 image tokens per example)."""

    image_size: int = field(96, help="square input resolution of the vision tower (frames are resized)")
    patch_size: int = field(16, help="ViT patch size; tokens per image = (image_size / patch_size)^2")
    vision_hidden: int = field(64, help="SigLIP tower width")
    vision_layers: int = field(2, help="SigLIP tower depth")
    vision_heads: int = field(4, help="SigLIP attention heads")
    text_hidden: int = field(128, help="Qwen2 language model width")
    text_layers: int = field(2, help="Qwen2 language model depth")
    text_heads: int = field(4, help="Qwen2 attention heads")
    text_kv_heads: int = field(2, help="Qwen2 key/value heads (grouped-query attention)")
    mlp_ratio: int = field(2, help="MLP width as a multiple of the hidden width (both towers)")
    vocab_size: int = field(1536, help="byte-level BPE vocabulary size, special tokens included")
    max_position_embeddings: int = field(1024, help="longest sequence the language model accepts")


def action_names() -> list[str]:
    """Every action name the ALE accepts (the full 18-action set)."""
    import ale_py

    return [a.name for a in ale_py.Action]


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (Qwen2-style) trained here on ``corpus``.

    Action names become single tokens (they are weighted up so their merges are learned
    first): one forward pass then scores every action exactly as greedy decoding would.

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with the chat special tokens and ``<image>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Words are repeated in several casings/spacings so whole words become single tokens.
    words = sorted({w for text in corpus for w in re.findall(r"\S+", text)})
    lines = [" ".join(words)] + [f" {w}" for w in words] + [w for w in words]
    lines += [f" {a}" for a in action_names()] * 64
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, IM_END, IMAGE_TOKEN],
        model_max_length=4096,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer, config: TinyVLMConfig):
    """LLaVA processor with the Pillow SigLIP image processor (no torchvision needed)."""
    from transformers import LlavaProcessor
    from transformers.models.siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(
        size={"height": config.image_size, "width": config.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
        num_additional_image_tokens=0,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(config: TinyVLMConfig, tokenizer, seed: int = 0):
    """A randomly initialised ``LlavaForConditionalGeneration`` sized by ``config``."""
    import torch
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    if config.image_size % config.patch_size:
        raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
    vision = SiglipVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=config.vision_hidden * config.mlp_ratio,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(
        hidden_size=config.text_hidden,
        intermediate_size=config.text_hidden * config.mlp_ratio,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=(config.image_size // config.patch_size) ** 2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def build_tiny_vlm(
    out_dir: str | os.PathLike,
    config: TinyVLMConfig | None = None,
    seed: int = 0,
    *,
    corpus: Iterable[str],
) -> Path:
    """Build the tiny VLM with its processor and save it as a Hugging Face folder.

    Args:
        out_dir: destination folder; written atomically (temporary sibling, then rename).
        config: sizes; ``TinyVLMConfig()`` by default.
        seed: weight-initialisation seed (the tokenizer is deterministic given the corpus).
        corpus: texts for the tokenizer, from the packages that generate the model's text
            (:func:`ilora.base.pretrain.tokenizer_corpus` for the default base).

    Returns:
        The folder, loadable with ``ilora.models.load.load_vlm`` or ``from_pretrained``.
    """
    config = config or TinyVLMConfig()
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(corpus, config.vocab_size)
    processor = build_processor(tokenizer, config)
    model = build_model(config, tokenizer, seed=seed)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir
