"""The tiny default VLM, its processor and the loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ilora.base.pretrain import tokenizer_corpus
from ilora.errors import IloraError
from ilora.models.inputs import (
    IGNORE_INDEX,
    chat_messages,
    encode_example,
    encode_row,
    encode_rows,
)
from ilora.models.load import load_model, load_vlm, lora_target_modules
from ilora.models.scoring import left_padded_positions
from ilora.models.tiny import TinyVLMConfig, build_tiny_vlm


def frame(seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (210, 160, 3), dtype=np.uint8)).convert(mode)


def test_build_save_reload_gives_identical_logits(tiny_vlm_dir, tiny_vlm):
    model, processor = tiny_vlm
    batch = encode_rows(processor, [{"images": [frame(0), frame(1)], "prompt": "Which game is this?", "answer": "Pong"}])
    again, _ = load_vlm(tiny_vlm_dir)
    with torch.no_grad():
        a = model(**batch).logits
        b = again(**batch).logits
    assert a.dtype == torch.float32 and a.shape[:2] == batch["input_ids"].shape
    assert torch.equal(a, b), (a - b).abs().max()


def test_build_is_deterministic_under_seed(tmp_path):
    cfg = TinyVLMConfig(vision_hidden=32, text_hidden=32, vocab_size=600)
    corpus = tokenizer_corpus()
    m1, _ = load_vlm(build_tiny_vlm(tmp_path / "a", cfg, seed=3, corpus=corpus))
    m2, _ = load_vlm(build_tiny_vlm(tmp_path / "b", cfg, seed=3, corpus=corpus))
    m3, _ = load_vlm(build_tiny_vlm(tmp_path / "c", cfg, seed=4, corpus=corpus))
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_two_atari_frames_become_the_expected_image_tokens(tiny_vlm):
    model, processor = tiny_vlm
    enc = encode_example(processor, [frame(0), frame(1)], "ball is above the paddle", "Action: RIGHT")
    cfg = model.config
    per_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    ids = torch.tensor(enc["input_ids"])
    assert int((ids == cfg.image_token_index).sum()) == 2 * per_image
    assert enc["pixel_values"].shape == (2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    labelled = [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]
    assert processor.tokenizer.decode(labelled) == "Action: RIGHT" + processor.tokenizer.eos_token


def test_action_names_are_single_tokens(tiny_vlm):
    """One forward pass can then score every action exactly as greedy decoding would."""
    _, processor = tiny_vlm
    for name in ("NOOP", "FIRE", "UPRIGHTFIRE", "DOWNLEFT", "RIGHTFIRE"):
        assert len(processor.tokenizer(" " + name, add_special_tokens=False)["input_ids"]) == 1, name


def test_generation_runs_and_returns_new_tokens(tiny_vlm):
    model, processor = tiny_vlm
    batch = encode_rows(processor, [{"images": [frame(0)], "prompt": "How many circles?"}], with_answer=False, padding_side="left")
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 1 and 0 < out.shape[1] - batch["input_ids"].shape[1] <= 5


def test_context_goes_before_the_images_and_rows_without_it_are_unchanged(tiny_vlm):
    _, processor = tiny_vlm
    tok = processor.tokenizer
    assert [part["type"] for part in chat_messages(2, "p", "c")[0]["content"]] == ["text", "image", "image", "text"]
    assert chat_messages(2, "p", "") == chat_messages(2, "p") == chat_messages(2, "p", None)
    images = [frame(0), frame(1)]
    plain = encode_example(processor, images, "ball is above the paddle", "Action: RIGHT")
    with_context = encode_example(processor, images, "ball is above the paddle", "Action: RIGHT", context="Rules: hit it.")
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    first = with_context["input_ids"].index(image_id)
    assert tok.decode(with_context["input_ids"][:first]).endswith("Rules: hit it.")
    assert tok.decode(plain["input_ids"][: plain["input_ids"].index(image_id)]).strip().endswith("user")
    # Same images, prompt and answer after the context: the tail of the sequence is identical.
    n = len(plain["input_ids"]) - plain["input_ids"].index(image_id)
    assert with_context["input_ids"][-n:] == plain["input_ids"][-n:]
    assert with_context["labels"][-n:] == plain["labels"][-n:]
    assert torch.equal(with_context["pixel_values"], plain["pixel_values"])
    # encode_row reads the optional column; encode_rows (training, prediction) goes through it.
    row = {"images": images, "context": "Rules: hit it.", "prompt": "ball is above the paddle", "answer": "Action: RIGHT"}
    assert encode_row(processor, row)["input_ids"] == with_context["input_ids"]
    assert encode_row(processor, {**row, "context": ""})["input_ids"] == plain["input_ids"]
    assert encode_rows(processor, [row])["input_ids"][0].tolist() == with_context["input_ids"]
    with pytest.raises(IloraError, match="image token"):
        encode_example(processor, images, "x", context="see <image>")


def test_images_of_other_modes_are_converted(tiny_vlm):
    _, processor = tiny_vlm
    rgb = encode_example(processor, [frame(0)], "x")
    gray = encode_example(processor, [frame(0, "L").convert("RGB")], "x")
    rgba = encode_example(processor, [frame(0, "RGBA")], "x")
    assert rgb["pixel_values"].shape == gray["pixel_values"].shape == rgba["pixel_values"].shape
    assert torch.equal(rgb["pixel_values"], rgba["pixel_values"])


def test_bad_images_and_text_are_refused(tiny_vlm):
    _, processor = tiny_vlm
    with pytest.raises(IloraError, match="expected a PIL image"):
        encode_example(processor, [np.zeros((4, 4, 3))], "x")
    with pytest.raises(IloraError, match="image token"):
        encode_example(processor, [frame(0)], "look <image> here")


def test_lora_targets_cover_all_three_parts_but_not_the_head(tiny_vlm):
    model, _ = tiny_vlm
    names = lora_target_modules(model)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert names == [n for n in linear if n != "lm_head"] and "lm_head" in linear
    assert any("vision_tower" in n for n in names) and any("multi_modal_projector" in n for n in names)
    assert any("language_model" in n for n in names) and not any(n.endswith("lm_head") for n in names)
    assert lora_target_modules(model, parts=("projector",)) == [n for n in names if "multi_modal_projector" in n]


def test_loader_refuses_non_vlm_and_mismatched_processor(tmp_path, tiny_vlm_dir):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    lm_dir = tmp_path / "lm"
    Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64)).save_pretrained(lm_dir)
    with pytest.raises(IloraError, match="not a vision-language model"):
        load_vlm(lm_dir)
    assert type(load_model(lm_dir)).__name__ == "Qwen2ForCausalLM"
    with pytest.raises(IloraError, match="no such model folder"):
        load_vlm(tmp_path / "missing")

    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_vlm_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["image_token_index"] = cfg.get("image_token_index", 0) + 1
    cfg["image_token_id"] = cfg["image_token_index"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IloraError, match="expects id"):
        load_vlm(bad)


def test_left_padded_positions():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert left_padded_positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
