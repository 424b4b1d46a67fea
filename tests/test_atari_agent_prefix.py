"""Score mode with the prompt-prefix KV cache: same scores as the full-prompt forward, batched or not."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from atari_helpers import spread_observations

from ilora.atari.agent import VLMAgent
from ilora.atari.collect import collect_dataset
from ilora.atari.envs import TwoFrameEnv
from ilora.atari.prompts import build_context, build_prompt, build_step_prompt
from ilora.models import scoring
from ilora.models.inputs import encode_row
from ilora.models.scoring import PromptPrefix


def _play(game: str, n: int, seed: int = 3) -> list:
    """``n`` consecutive observations of one episode (the later frame of one is the earlier of the next)."""
    env = TwoFrameEnv(game, repeat_action_probability=0.0)
    obs = [env.reset(seed=seed)]
    while len(obs) < n:
        obs.append(env.step(len(obs) % len(env.action_names)).observation)
    env.close()
    return obs


def _scores(agent, observations) -> torch.Tensor:
    with torch.inference_mode():
        return agent.score_observations(observations)


@pytest.mark.parametrize("game", ["Pong", "Boxing"])
def test_cached_scores_equal_full_prompt_scores_batched_and_one_by_one(tiny_vlm, game):
    model, processor = tiny_vlm
    observations = spread_observations(5, game)
    cached = VLMAgent(model, processor, game, mode="score", object_text=True)
    full = VLMAgent(model, processor, game, mode="score", object_text=True, prefix_cache=False)
    batched = _scores(cached, observations)
    assert cached.prefix_cache and cached.prefix_cache_off is None and cached._prefix is not None
    # The rows really differ in length after the prefix: the padding sits between prefix and rest.
    lengths = cached._prefix.encode(cached.rows(observations))["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1
    reference = _scores(full, observations)
    assert full._prefix is None
    torch.testing.assert_close(batched, reference, atol=1e-4, rtol=0)
    one_by_one = torch.cat([_scores(cached, [obs]) for obs in observations])
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=0)
    assert (batched.argmax(-1) == reference.argmax(-1)).all()


def test_cached_play_over_consecutive_steps_reuses_frames_and_matches(tiny_vlm):
    """Consecutive steps share a frame (pixel values reused); scores still equal the full forward."""
    model, processor = tiny_vlm
    cached = VLMAgent(model, processor, "Breakout", object_text=True)
    full = VLMAgent(model, processor, "Breakout", object_text=True, prefix_cache=False)
    steps = _play("Breakout", 6)
    for a, b in itertools.pairwise(steps):
        assert a.frames[1] is b.frames[0]
    for batch in ([steps[0], steps[1]], [steps[1], steps[2]], [steps[3]], [steps[4], steps[5]]):
        torch.testing.assert_close(_scores(cached, batch), _scores(full, batch), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_every_candidate_pass_gives_the_same_scores(tiny_vlm, monkeypatch, mask_kind):
    """Candidates after the cache: cache copied per candidate (any attention kernel), or all of a
    row's candidates in one sequence with a custom 4D mask (SDPA: boolean; eager: additive float)."""
    model, processor = tiny_vlm
    observations = spread_observations(3, "Pong")
    reference = _scores(VLMAgent(model, processor, "Pong", object_text=True, prefix_cache=False), observations)
    if mask_kind == "float":  # eager attention takes the additive mask; on a copy, not the shared model
        model = copy.deepcopy(model)
        model.set_attn_implementation("eager")
        assert scoring.custom_mask_kind(model) == "float"
    else:
        monkeypatch.setattr(scoring, "custom_mask_kind", lambda _: mask_kind)
    agent = VLMAgent(model, processor, "Pong", object_text=True)
    torch.testing.assert_close(_scores(agent, observations), reference, atol=1e-4, rtol=0)


def test_prefix_is_the_rows_constant_start_and_is_never_modified(tiny_vlm):
    model, processor = tiny_vlm
    agent = VLMAgent(model, processor, "Pong", object_text=True)
    observations = spread_observations(4, "Pong")
    first = _scores(agent, observations[:1])
    prefix = agent._prefix
    stored = [(k.clone(), v.clone()) for k, v in prefix.layers]
    # The prefix is the template start + the game's context: every row's tokens before the first image.
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for row in agent.rows(observations):
        ids = encode_row(processor, row, with_answer=False)["input_ids"]
        assert ids[: len(prefix)] == prefix.ids and ids[len(prefix)] == image_id
        assert image_id not in prefix.ids
    assert processor.tokenizer.decode(prefix.ids).endswith(agent.context)
    _scores(agent, observations)  # a larger batch, then a smaller one again
    again = _scores(agent, observations[:1])
    torch.testing.assert_close(again, first, atol=1e-5, rtol=0)
    assert agent._prefix is prefix
    for (k, v), (k0, v0) in zip(prefix.layers, stored):
        assert torch.equal(k, k0) and torch.equal(v, v0) and k.shape[0] == 1
    agent.clear_prefix_cache()
    _scores(agent, observations[:1])
    assert agent._prefix is not None and agent._prefix is not prefix


def test_unusable_prefix_falls_back_to_the_full_forward(tiny_vlm, monkeypatch):
    model, processor = tiny_vlm
    monkeypatch.setattr(PromptPrefix, "build", classmethod(lambda cls, *a: "tokens differ"))
    agent = VLMAgent(model, processor, "Pong", object_text=True)
    observations = spread_observations(2, "Pong")
    scores = _scores(agent, observations)
    assert not agent.prefix_cache and agent.prefix_cache_off == "tokens differ"
    reference = _scores(VLMAgent(model, processor, "Pong", object_text=True, prefix_cache=False), observations)
    torch.testing.assert_close(scores, reference, atol=0, rtol=0)


def test_generate_mode_sees_context_then_frames_then_step_text(tiny_vlm):
    model, processor = tiny_vlm
    agent = VLMAgent(model, processor, "Pong", mode="generate", reasoning=False, object_text=True, max_new_tokens=3)
    assert not agent.prefix_cache
    observations = spread_observations(2, "Pong")
    row = agent.rows(observations[:1])[0]
    assert row["context"] == build_context("Pong") and row["prompt"].startswith("Objects")
    assert build_prompt("Pong", object_text="x", reasoning=False) == row["context"] + "\n\n" + build_step_prompt(
        object_text="x", reasoning=False
    )
    decisions = agent.act_batch(observations)
    assert len(decisions) == 2


def test_collected_rows_have_the_agents_layout(tiny_vlm):
    """Rows written by collection encode to the agent's prefix followed by the frames."""
    model, processor = tiny_vlm
    ds = collect_dataset("Pong", 1, seed=3, max_steps=20, progress=False, reasoning=False)
    assert "context" in ds.column_names and set(ds["context"]) == {build_context("Pong")}
    agent = VLMAgent(model, processor, "Pong", object_text=True)
    _scores(agent, spread_observations(1, "Pong"))
    ids = encode_row(processor, ds[0], with_answer=False)["input_ids"]
    assert ids[: len(agent._prefix)] == agent._prefix.ids
    assert "Relations: " in ds[0]["prompt"] and ds[0]["prompt"].endswith(build_step_prompt(reasoning=False))


def test_decisions_for_dataset_rows_are_the_play_decisions(tiny_vlm):
    """Offline agreement decides on held-out rows as play decides on observations: same choices,
    cache or not, whatever the chunking; generate mode decides on rows too."""
    model, processor = tiny_vlm
    observations = spread_observations(5, "Pong")
    cached = VLMAgent(model, processor, "Pong", object_text=True)
    full = VLMAgent(model, processor, "Pong", object_text=True, prefix_cache=False)
    played = cached.act_batch(observations)
    assert cached.decide_rows(cached.rows(observations), batch_size=2) == played
    assert full.decide_rows(full.rows(observations)) == played
    rows = collect_dataset("Pong", 1, seed=0, max_steps=40, object_text=True)
    rows = [rows[i] for i in range(min(6, len(rows)))]
    assert len(rows) == 6
    assert VLMAgent(model, processor, "Pong", object_text=True).decide_rows(rows, batch_size=4) == full.decide_rows(rows)
    generating = VLMAgent(model, processor, "Pong", mode="generate", object_text=True, max_new_tokens=4)
    decisions = generating.decide_rows(rows[:3], batch_size=2)
    assert len(decisions) == 3 and all(d.action in generating.action_names for d in decisions)
