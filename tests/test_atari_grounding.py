"""Grounding rows for the base model: every family present, answers derivable from the prompt, no policy."""

import re

from ilora.atari.games import get_game
from ilora.atari.grounding import FAMILIES, grounding_rows
from ilora.atari.prompts import build_context, describe_action, parse_action


def _rows():
    return grounding_rows(48, seed=3)


def test_families_and_determinism():
    rows = _rows()
    assert {r["task"] for r in rows} == {f"grounding_{f}" for f in FAMILIES}
    again = grounding_rows(48, seed=3)
    assert [(r["prompt"], r["answer"]) for r in rows] == [(r["prompt"], r["answer"]) for r in again]
    assert all(len(r["images"]) == 2 for r in rows)


def test_playing_prompt_families_use_the_agents_layout():
    for r in _rows():
        if r["task"] in ("grounding_prompt_relation", "grounding_action_meaning"):
            assert r["context"] == build_context(r["game"])
            assert "Answer only with 'Action: NAME'" in r["prompt"]
        else:
            assert r["context"] is None


def test_action_meaning_answer_is_the_first_action_with_that_meaning():
    seen = 0
    for r in _rows():
        if r["task"] != "grounding_action_meaning":
            continue
        names = get_game(r["game"]).action_names
        meaning = re.search(r"which action means '(.*)'\?$", r["prompt"]).group(1)
        name = parse_action(r["answer"], names)
        assert name is not None and describe_action(name, r["game"]) == meaning
        assert all(describe_action(n, r["game"]) != meaning for n in names[: names.index(name)])
        seen += 1
    assert seen > 0


def test_prompt_relation_asks_about_the_prompts_relations():
    rows = [r for r in _rows() if r["task"] == "grounding_prompt_relation"]
    assert rows
    for r in rows:
        assert "Relations:" in r["prompt"] and re.search(r"Question: What is the [a-z ]+ relation\?$", r["prompt"])
        assert r["answer"] and "Action:" not in r["answer"]  # a fact, never an action
