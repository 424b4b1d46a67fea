"""The VLM agent and the evaluation loop: batching, score mode, invalid answers, summary maths."""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import pytest
import torch
from atari_helpers import spread_observations
from torch import nn

from ilora.atari import evaluate
from ilora.atari.agent import AgentDecision, VLMAgent
from ilora.atari.evaluate import EpisodeRecord, play_episodes, summarize
from ilora.atari.experts import to_decision
from ilora.atari.games import get_game
from ilora.atari.prompts import build_answer
from ilora.errors import IloraError
from ilora.models.inputs import encode_example, encode_rows

INVALID_ANSWERS = ("", "I am not sure what to do.", "Action: JUMP", "Action: right")


class ScriptedGenerator(nn.Module):
    """Stands in for a VLM's ``generate``: each row's answer is a fixed function of that row alone.

    The answer is picked by hashing the row's unpadded token ids and its two images' pixel
    values, so it cannot depend on the batch the row is in — only a batching bug in the agent
    (wrong padding, rows or images mixed up) can make batched and unbatched play differ. About
    one answer in five is invalid.
    """

    def __init__(self, tokenizer, action_names):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the agent a device and dtype
        self.tok = tokenizer
        self.answers = [build_answer("The ball is near.", name) for name in action_names] + list(INVALID_ANSWERS)

    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens, pad_token_id, **_):
        n_images = pixel_values.shape[0] // input_ids.shape[0]
        new = []
        for row in range(input_ids.shape[0]):
            digest = hashlib.sha256(input_ids[row][attention_mask[row].bool()].numpy().tobytes())
            digest.update(pixel_values[row * n_images : (row + 1) * n_images].numpy().tobytes())
            answer = self.answers[int.from_bytes(digest.digest()[:4], "little") % len(self.answers)]
            new.append(self.tok(answer + self.tok.eos_token, add_special_tokens=False)["input_ids"][:max_new_tokens])
        width = max(len(ids) for ids in new)
        out = torch.full((len(new), width), pad_token_id, dtype=torch.long)
        for row, ids in enumerate(new):
            out[row, : len(ids)] = torch.tensor(ids)
        return torch.cat([input_ids, out], dim=1)


def _trace(agent, n_envs, **kw):
    steps = []
    result = play_episodes(
        agent,
        "Pong",
        n_episodes=3,
        seed=11,
        n_envs=n_envs,
        max_frames=120,
        progress=False,
        on_step=lambda e: steps.append((e.episode, e.step, e.decision.action, e.valid, e.decision.reasoning)),
        **kw,
    )
    return result, sorted(steps)


def test_batched_agent_acts_like_unbatched_on_real_env(tiny_vlm):
    _, processor = tiny_vlm
    names = get_game("Pong").action_names
    agent = VLMAgent(ScriptedGenerator(processor.tokenizer, names), processor, "Pong", mode="generate", object_text=True)
    batched, batched_steps = _trace(agent, n_envs=3)
    single, single_steps = _trace(agent, n_envs=1)
    assert batched.settings["n_envs"] == 3 and single.settings["n_envs"] == 1
    assert batched_steps == single_steps
    assert [r.__dict__ for r in batched.records] == [r.__dict__ for r in single.records]
    assert [r.episode for r in batched.records] == [0, 1, 2]
    # Invalid answers are played as NOOP and counted, per episode and in total.
    invalid = [s for s in batched_steps if not s[3]]
    assert invalid and all(s[2] == "NOOP" for s in invalid)
    assert all(s[4] in INVALID_ANSWERS for s in invalid)
    assert sum(r.invalid_answers for r in batched.records) == len(invalid)
    assert len({s[2] for s in batched_steps if s[3]}) > 2  # the stand-in really varies its answers
    assert all(r.capped and r.length == 30 and r.frames == 120 for r in batched.records)


def test_never_parsing_model_is_reported_not_crashed(tiny_vlm):
    _, processor = tiny_vlm

    class Mute(ScriptedGenerator):
        def __init__(self, tok):
            super().__init__(tok, ())
            self.answers = ["Action: TELEPORT"]

    agent = VLMAgent(Mute(processor.tokenizer), processor, "Pong", mode="generate")
    result = play_episodes(agent, "Pong", 2, n_envs=2, max_frames=80, progress=False)
    summary = summarize(result.records, "Pong")
    assert summary.never_parsed and summary.invalid_rate == 1.0
    assert summary.action_share["NOOP"] == 1.0
    assert summary.mean_zero_rule == 0.0 and summary.zero_rule_episodes == 2
    assert "no answer named a valid action" in evaluate.format_summary(summary)


def test_score_mode_is_the_exact_answer_likelihood_under_left_padding(tiny_vlm):
    model, processor = tiny_vlm
    agent = VLMAgent(model, processor, "Pong", mode="score", object_text=True)
    rows = agent.rows(spread_observations(2))
    rows[1]["prompt"] += " Hurry." * 5  # prompts of different lengths: real left padding
    batch = encode_rows(processor, rows, with_answer=False, padding_side="left")
    assert (batch["attention_mask"][:, 0] == 0).any()
    with torch.inference_mode():
        scores = agent.score_actions(batch)
    assert scores.shape == (2, len(agent.action_names)) and scores.dtype == torch.float32

    # Reference: each (prompt, answer) alone, one unpadded teacher-forced forward pass.
    reference = torch.zeros_like(scores)
    for b, row in enumerate(rows):
        for c, name in enumerate(agent.action_names):
            f = encode_example(processor, row["images"], row["prompt"], build_answer(None, name), context=row["context"])
            ids, labels = torch.tensor([f["input_ids"]]), torch.tensor(f["labels"])
            with torch.inference_mode():
                logp = model(input_ids=ids, pixel_values=f["pixel_values"]).logits[0, :-1].float().log_softmax(-1)
            target, keep = labels[1:], labels[1:] != -100
            reference[b, c] = logp[keep].gather(-1, target[keep, None]).sum()
    # Score mode conditions on the shared prefix "Action:", whose likelihood is the same for every
    # candidate of a row: differences between candidates must agree exactly.
    torch.testing.assert_close(scores - scores[:, :1], reference - reference[:, :1], atol=1e-4, rtol=0)
    assert (reference - scores).std(dim=1).max() < 1e-4


def _force_answer(model, token_chain, strength=40.0):
    """A forward hook that makes ``model`` confident in one answer: after token ``t`` of the chain,
    the next chain token gets ``+strength`` logits. Returns the hook handle."""
    follow = dict(itertools.pairwise(token_chain))

    def hook(module, args, kwargs, output):
        ids = kwargs["input_ids"][:, -output.logits.shape[1] :]
        for t, nxt in follow.items():
            output.logits[..., nxt] += strength * (ids == t)
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def test_score_mode_equals_greedy_direct_answer_when_confident(tiny_vlm):
    model, processor = tiny_vlm
    tok = processor.tokenizer
    observations = spread_observations(2)
    scorer = VLMAgent(model, processor, "Pong", mode="score", object_text=True)
    greedy = VLMAgent(model, processor, "Pong", mode="generate", reasoning=False, object_text=True, max_new_tokens=8)
    last_prompt_token = encode_rows(processor, scorer.rows(observations[:1]), with_answer=False)["input_ids"][0, -1]
    for name in ("RIGHTFIRE", "LEFT"):
        answer = tok(build_answer(None, name) + tok.eos_token, add_special_tokens=False)["input_ids"]
        chain = [int(last_prompt_token), *answer]
        assert len(set(chain)) == len(chain)
        handle = _force_answer(model, chain)
        try:
            generated = greedy.act_batch(observations)
            scored = scorer.act_batch(observations)
        finally:
            handle.remove()
        assert [d.action for d in generated] == [name] * 2 and all(d.valid for d in generated)
        assert [d.action for d in scored] == [d.action for d in generated]


def test_agent_rejects_bad_options(tiny_vlm):
    model, processor = tiny_vlm
    with pytest.raises(IloraError, match="mode"):
        VLMAgent(model, processor, "Pong", mode="beam")
    with pytest.raises(IloraError, match="reasoning"):
        VLMAgent(model, processor, "Pong", mode="score", reasoning=True)
    with pytest.raises(IloraError, match="no RAM reader for Alien"):
        VLMAgent(model, processor, "Alien", object_text=True)
    with pytest.raises(IloraError, match="known games"):
        VLMAgent(model, processor, "Pongg")


class Recorder:
    """A plain policy that keeps what it was shown and always answers NOOP."""

    def __init__(self):
        self.seen = []

    def __call__(self, observation):
        self.seen.append(observation)
        return "NOOP"


def test_blank_frames_blanks_both_frames_but_not_the_ram():
    blind, sighted = Recorder(), Recorder()
    play_episodes(blind, "Breakout", 1, n_envs=1, max_frames=40, blank_frames=True, progress=False)
    play_episodes(sighted, "Breakout", 1, n_envs=1, max_frames=40, progress=False)
    assert len(blind.seen) == len(sighted.seen) == 10
    for b, s in zip(blind.seen, sighted.seen):
        assert all(f.shape == (210, 160, 3) and f.dtype == np.uint8 and not f.any() for f in b.frames)
        assert all(f.any() for f in s.frames)
        assert all(np.array_equal(x, y) for x, y in zip(b.rams, s.rams))


def test_fire_on_reset_presses_fire_after_reset_and_each_lost_life():
    plain = play_episodes(Recorder(), "Breakout", 1, n_envs=1, max_frames=3000, progress=False).records[0]
    fired = play_episodes(Recorder(), "Breakout", 1, n_envs=1, max_frames=3000, fire_on_reset=True, progress=False)
    rec = fired.records[0]
    assert fired.settings["fire_on_reset"] is True
    # A NOOP policy never launches the ball: no life is lost and the episode hits the cap.
    assert plain.capped and plain.auto_fires == 0 and plain.score == 0
    # With the convention the ball is launched after the reset and after each of the 4 lost lives.
    assert not rec.capped and rec.auto_fires == 5
    assert rec.action_counts == {"NOOP": rec.length} and rec.fire_rate == 0.0


def _record(score, *, length=10, invalid=0, capped=False):
    return EpisodeRecord(
        episode=0, seed=0, score=score, length=length, invalid_answers=invalid, capped=capped,
        action_counts={"NOOP": length - 2, "RIGHTFIRE": 2},
    )


def test_summary_maths():
    game = get_game("Pong")
    records = [_record(-21.0), _record(-15.0, capped=True), _record(3.0, invalid=10), _record(9.0, invalid=4)]
    s = summarize(records, game)
    scores = np.array([-21.0, -15.0, 3.0, 9.0])
    assert s.mean == pytest.approx(scores.mean()) and s.median == pytest.approx(np.median(scores))
    half = 3.182 * scores.std(ddof=1) / 2  # t(0.975, df=3)
    assert (s.ci_low, s.ci_high) == pytest.approx((scores.mean() - half, scores.mean() + half))
    assert s.ci_low < s.mean < s.ci_high
    assert s.hns == pytest.approx((scores.mean() + 20.7) / (14.6 + 20.7))
    # Zero rule: the capped episode and the all-invalid one count 0; 4 invalid of 10 does not.
    assert s.zero_rule_episodes == 2 and s.capped_episodes == 1
    assert s.mean_zero_rule == pytest.approx((-21.0 + 0 + 0 + 9.0) / 4)
    assert s.hns_zero_rule == pytest.approx(game.human_normalized(s.mean_zero_rule))
    assert s.invalid_rate == pytest.approx(14 / 40) and not s.never_parsed
    assert s.fire_rate == pytest.approx(0.2)
    assert s.action_share["NOOP"] == pytest.approx(0.8) and s.action_share["LEFT"] == 0.0
    assert sum(s.action_share.values()) == pytest.approx(1.0)


def test_summary_of_one_episode_and_of_none():
    s = summarize([_record(4.0)], "Pong")
    assert s.episodes == 1 and s.ci_low == s.mean == s.ci_high == 4.0 and math.isnan(s.std)
    with pytest.raises(IloraError, match="no finished episode"):
        summarize([], "Pong")


def test_agent_decision_is_a_policy_decision():
    d = AgentDecision("NOOP", "gibberish", False)
    assert to_decision(d, ("NOOP", "FIRE")) is d
