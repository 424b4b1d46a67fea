"""The Atari data half: catalog, prompts/parsing, frame spacing, RAM facts, experts, collection."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ilora.atari.collect import CollectConfig, collect_dataset, collect_to_disk, dataset_features, keep_mask
from ilora.atari.envs import TwoFrameEnv
from ilora.atari.experts import (
    EXPERTS,
    Decision,
    RandomPolicy,
    get_expert,
    mean_ci95,
    run_episode,
    to_decision,
)
from ilora.atari.games import GAMES, get_game, make_env
from ilora.atari.prompts import build_answer, build_prompt, parse_action
from ilora.atari.ram import READERS, object_facts, object_text
from ilora.errors import IloraError

PAPER_GAMES = ("Alien", "Amidar", "Assault", "Asterix", "BattleZone", "Boxing", "ChopperCommand", "CrazyClimber",
               "DemonAttack", "Freeway", "Frostbite", "Gopher", "Hero", "KungFuMaster", "MsPacman", "Qbert")


# --- catalog -------------------------------------------------------------------------------------
def test_catalog_covers_atari100k_and_paper_games():
    assert sum(g.atari100k for g in GAMES.values()) == 26
    assert set(PAPER_GAMES) <= set(GAMES)
    for game in GAMES.values():
        assert game.human_score > game.random_score, game.name
        assert game.human_normalized(game.random_score) == 0.0
        assert game.human_normalized(game.human_score) == pytest.approx(1.0)


def test_reference_scores_match_the_literature():
    assert (get_game("Pong").random_score, get_game("Pong").human_score) == (-20.7, 14.6)
    assert (get_game("Breakout").random_score, get_game("Breakout").human_score) == (1.7, 30.5)


def test_get_game_accepts_aliases_and_lists_known_names():
    assert get_game("pong") is get_game("ALE/Pong-v5") is GAMES["Pong"]
    with pytest.raises(IloraError, match="known games: .*Breakout.*Pong"):
        get_game("Pacman3000")


@pytest.mark.parametrize("name", sorted(GAMES))
def test_every_game_builds_and_its_actions_are_in_the_prompt(name):
    game = get_game(name)
    env = make_env(game, seed=0)
    try:
        assert env.observation_space.shape == (210, 160, 3)
        names = tuple(env.unwrapped.get_action_meanings())
    finally:
        env.close()
    assert game.action_names == names and names[0] == "NOOP"
    prompt = build_prompt(game)
    for i, action in enumerate(names):
        assert f"\n{i}. {action}: " in prompt
    assert game.rules in prompt


# --- prompts and parsing -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(GAMES))
def test_parse_action_round_trips_every_action(name):
    names = get_game(name).action_names
    for action in names:
        assert parse_action(build_answer("The ball is above the paddle.", action), names) == action
        assert parse_action(build_answer(None, action), names) == action
        assert parse_action(f"Action: {action}.", names) == action


def test_parse_action_is_exact():
    names = get_game("Breakout").action_names  # NOOP FIRE RIGHT LEFT
    boxing = get_game("Boxing").action_names
    assert parse_action("Action: RIGHTFIRE", names) is None  # not a Breakout action, and not RIGHT
    assert parse_action("Action: RIGHTFIRE", boxing) == "RIGHTFIRE"
    assert parse_action("Action: RIGHT", boxing) == "RIGHT"
    for bad in ("", "   ", "RIGHT", "action: RIGHT", "Action: right", "Action: RIGH", "Action: RIGHT now",
                "Action: RIGHT\nmore text", "XAction: RIGHT"):
        assert parse_action(bad, names) is None, bad


def test_prompt_options():
    with_text = build_prompt("Pong", object_text="Objects: ball (3, 4).", reasoning=True)
    direct = build_prompt("Pong", reasoning=False)
    assert "Objects: ball (3, 4)." in with_text and "Objects" not in direct
    assert "which rule applies" in with_text and "Answer only" in direct
    assert "RIGHT: move your paddle up" in direct  # the game-specific meaning the name hides


# --- the two frames --------------------------------------------------------------------------------
@pytest.mark.parametrize("sticky", [0.0, 0.25])
def test_two_frames_are_frame_skip_emulator_frames_apart(sticky):
    """The pair equals frames t-4 and t of a frame_skip=1 env driven with each action 4 times."""
    actions = [0, 2, 2, 3, 1, 3, 0, 2, 3, 3, 2, 1]
    env = TwoFrameEnv("Breakout", repeat_action_probability=sticky)
    fine = make_env("Breakout", frame_skip=1, repeat_action_probability=sticky)
    obs = env.reset(seed=7)
    frame, _ = fine.reset(seed=7)
    fine_frames = [frame]
    for a in actions:
        for _ in range(4):
            fine_frames.append(fine.step(a)[0])
        obs = env.step(a).observation
        np.testing.assert_array_equal(obs.frames[1], fine_frames[-1])
        np.testing.assert_array_equal(obs.frames[0], fine_frames[-5])
    assert obs.info["episode_frame_number"] == 4 * len(actions)
    assert not np.array_equal(obs.frames[0], obs.frames[1])
    env.close()
    fine.close()


# --- RAM facts ------------------------------------------------------------------------------------
def _rollout_observations(game, steps, seed=0):
    env = TwoFrameEnv(game)
    policy = RandomPolicy(env.action_names, seed=seed)
    observations = [env.reset(seed=seed)]
    for _ in range(steps):
        observations.append(env.step(policy(observations[-1]).action).observation)
    env.close()
    return observations


@pytest.mark.parametrize("game", sorted(READERS))
def test_object_text_states_positions_and_relations(game):
    for obs in _rollout_observations(game, 60)[::6]:
        facts = object_facts(game, *obs.rams)
        text = object_text(game, *obs.rams)
        assert text == facts.text()
        assert text.startswith("Objects (") and "Relations: " in text
        for sentence in facts.sentences:
            assert sentence in text
        for name in facts.objects:
            assert f"{name} " in text


def test_pong_relation_follows_the_ball_and_paddle_rows():
    ram = np.zeros(128, dtype=np.uint8)
    ram[49], ram[51] = 120, 110  # ball x, paddle y -> paddle centre row 104
    for ball_y, word in ((60, "above"), (117, "level"), (160, "below"), (0, "none")):
        ram[54] = ball_y
        assert object_facts("Pong", ram, ram).relations["ball_vs_paddle"] == word


def test_object_text_for_unsupported_game_is_a_clear_error():
    ram = np.zeros(128, dtype=np.uint8)
    with pytest.raises(IloraError, match="no RAM reader for Alien.*Boxing, Breakout, Freeway, Pong"):
        object_text("Alien", ram, ram)


# --- experts ----------------------------------------------------------------------------------------
def test_expert_action_is_decided_by_the_relation_words():
    """Same relation words -> same action, across many different positions (the decisive feature)."""
    for game in sorted(EXPERTS):
        expert = get_expert(game)
        seen: dict[tuple, str] = {}
        for obs in _rollout_observations(game, 150, seed=1):
            relations = tuple(sorted(object_facts(game, *obs.rams).relations.items()))
            decision = expert(obs)
            assert decision.action in obs.game.action_names and decision.reasoning
            assert seen.setdefault(relations, decision.action) == decision.action, (game, relations)


def test_policy_outputs_are_normalised():
    names = get_game("Breakout").action_names
    assert to_decision(1, names) == Decision("FIRE")
    assert to_decision("LEFT", names) == Decision("LEFT")
    assert to_decision(Decision("NOOP", "why"), names).reasoning == "why"
    with pytest.raises(IloraError, match="valid: NOOP, FIRE, RIGHT, LEFT"):
        to_decision("UP", names)
    with pytest.raises(IloraError):
        to_decision(7, names)


# Capped runs: the expert must beat a random policy on the same seeds by a wide margin.
CAPPED = {"Pong": (500, 3.0), "Breakout": (500, 5.0), "Freeway": (500, 4.0), "Boxing": (500, 4.0)}


@pytest.mark.parametrize("game", sorted(CAPPED))
def test_expert_beats_random_on_capped_runs(game):
    cap, margin = CAPPED[game]
    env = TwoFrameEnv(game)
    expert = [run_episode(get_expert(game), env, s, max_steps=cap).score for s in (0, 1)]
    random = [run_episode(RandomPolicy(env.action_names, s), env, s, max_steps=cap).score for s in (0, 1)]
    env.close()
    assert np.mean(expert) >= np.mean(random) + margin, (expert, random)


@pytest.mark.slow
@pytest.mark.parametrize("game", sorted(EXPERTS))
def test_expert_full_episodes_far_above_random_reference(game):
    env = TwoFrameEnv(game)
    scores = [run_episode(get_expert(game), env, s).score for s in range(10)]
    env.close()
    info = get_game(game)
    mean, half = mean_ci95(scores)
    assert mean - half > info.random_score + 0.3 * (info.human_score - info.random_score), scores


def test_mean_ci95():
    assert mean_ci95([3.0]) == (3.0, 0.0)
    mean, half = mean_ci95([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and half == pytest.approx(3.182 * np.std([1, 2, 3, 4], ddof=1) / 2)


# --- collection -------------------------------------------------------------------------------------
def test_keep_mask_drops_opening_and_pre_failure_steps_but_keeps_rare_actions():
    config = CollectConfig(game="Breakout", drop_first=3, drop_before_failure=2, rare_window=1, rare_share=0.1)
    actions = ["FIRE"] + ["LEFT", "RIGHT"] * 9 + ["NOOP"]  # 20 steps, FIRE rare
    failures = [False] * 20
    failures[10] = True
    keep = keep_mask(actions, failures, config)
    assert keep[:2].all() and not keep[2]  # FIRE at 0 and its neighbour are protected
    assert not keep[9] and not keep[10] and keep[8] and keep[11]
    assert keep.sum() == 20 - 1 - 2


def test_collected_dataset_schema():
    ds = collect_dataset("Breakout", 1, seed=3, max_steps=60, progress=False)
    assert ds.features == dataset_features()
    assert len(ds) > 0 and set(ds["game"]) == {"Breakout"}
    row = ds[0]
    assert [im.size for im in row["images"]] == [(160, 210), (160, 210)]
    assert all(im.mode == "RGB" for im in row["images"])
    names = get_game("Breakout").action_names
    assert all(parse_action(a, names) == act for a, act in zip(ds["answer"], ds["action"]))
    assert all("Relations: " in p for p in ds["prompt"]) and all(ds["object_text"])
    steps = ds["step"]
    assert steps == sorted(steps) and min(steps) >= 0
    direct = collect_dataset("Breakout", 1, seed=3, max_steps=60, progress=False, object_text=False, reasoning=False)
    assert all(a.startswith("Action: ") for a in direct["answer"]) and not any(direct["object_text"])
    assert direct["action"] == ds["action"]  # same seed, same expert: same play


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.arrow")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_collection_is_byte_reproducible_and_resumable(tmp_path):
    config = CollectConfig(game="Pong", episodes=2, seed=5, max_steps=40)
    first = collect_to_disk(config, tmp_path / "a", progress=False)
    second = collect_to_disk(config, tmp_path / "b", progress=False)
    assert first["rows"] == second["rows"] > 0
    assert _tree_digest(tmp_path / "a" / "dataset") == _tree_digest(tmp_path / "b" / "dataset")

    # Resume: delete one episode, re-run, get the same bytes; the kept episode is not rewritten.
    kept = tmp_path / "a" / "episodes" / "episode_00000"
    stamp = (kept / "summary.json").stat().st_mtime_ns
    import shutil

    shutil.rmtree(tmp_path / "a" / "episodes" / "episode_00001")
    collect_to_disk(config, tmp_path / "a", progress=False)
    assert (kept / "summary.json").stat().st_mtime_ns == stamp
    assert _tree_digest(tmp_path / "a" / "dataset") == _tree_digest(tmp_path / "b" / "dataset")

    with pytest.raises(IloraError, match="collect_config.json.*different settings.*seed"):
        collect_to_disk(CollectConfig(game="Pong", episodes=2, seed=6, max_steps=40), tmp_path / "a", progress=False)


def _atari_cli(argv):
    """Parse with only the Atari commands (the full `ilora` parser imports every area)."""
    import argparse

    from ilora.atari import cli

    parser = argparse.ArgumentParser(prog="ilora")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_collect_and_bad_game(tmp_path):
    assert _atari_cli(["collect", "--game", "Freeway", "--episodes", "1", "--max-steps", "30", "--out", str(tmp_path / "fw")]) == 0
    from datasets import load_from_disk

    ds = load_from_disk(str(tmp_path / "fw" / "dataset"))
    assert len(ds) > 0 and ds.features == dataset_features()
    assert json.loads((tmp_path / "fw" / "summary.json").read_text())["rows"] == len(ds)
    with pytest.raises(IloraError, match="known games"):
        _atari_cli(["collect", "--game", "Nope", "--episodes", "1", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    with pytest.raises(IloraError, match="no scripted expert for Alien"):
        _atari_cli(["experts", "--games", "Alien", "--episodes", "1"])


def test_prompt_vocabulary_covers_prompts_and_every_relation_sentence():
    from ilora.atari.prompts import prompt_vocabulary
    from ilora.atari.ram import BOXING_VERTICAL

    texts = prompt_vocabulary(samples_per_game=150)
    assert texts == prompt_vocabulary(samples_per_game=150)
    joined = "\n".join(texts)
    for game in GAMES:
        assert f"the Atari game {game}." in joined
    for sentence in ["ball is above your paddle", "ball is left of the paddle", "no ball in play",
                     "the chicken's next lane is clear", *BOXING_VERTICAL.values()]:
        assert sentence in joined, sentence
