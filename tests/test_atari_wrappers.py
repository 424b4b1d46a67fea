"""The gymnasium wrappers and the one episode loop: FIRE on reset, life loss, the episode cap, same episodes."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from ilora.atari import evaluate
from ilora.atari.envs import AUTO_FIRES, LIVES_LOST, TwoFrameEnv, wrapped_env
from ilora.atari.evaluate import play_episodes
from ilora.atari.experts import RandomPolicy, get_expert, run_episode
from ilora.atari.games import get_game


def _noop(observation):
    return "NOOP"


def _same_observation(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.frames + a.rams, b.frames + b.rams)) and a.info == b.info


@pytest.mark.parametrize(("game", "fires"), [("Breakout", True), ("Freeway", False)])
def test_fire_on_reset_presses_fire_after_reset_only_in_games_with_fire(game, fires):
    plain = wrapped_env(game, repeat_action_probability=0.0)
    fired = wrapped_env(game, repeat_action_probability=0.0, fire_on_reset=True)
    expected, _ = plain.reset(seed=3)
    if fires:
        expected, *_ = plain.step(plain.unwrapped.get_action_meanings().index("FIRE"))
    observation, info = fired.reset(seed=3)
    assert info[AUTO_FIRES] == int(fires)
    assert _same_observation(observation, expected)
    # The observation after the press pairs the reset frame with the frame after FIRE.
    assert observation.info["episode_frame_number"] == 4 * int(fires)
    plain.close()
    fired.close()


def test_fire_on_reset_presses_fire_after_each_lost_life_and_not_after_a_lost_point():
    breakout = wrapped_env("Breakout", fire_on_reset=True)
    noop = breakout.unwrapped.get_action_meanings().index("NOOP")
    _, info = breakout.reset(seed=0)
    lives, presses, losses, done = info["lives"], 0, 0, False
    while not done:
        _, _, terminated, truncated, info = breakout.step(noop)
        done = terminated or truncated
        losses += info[LIVES_LOST]
        presses += info[AUTO_FIRES]
        assert info[AUTO_FIRES] == int(info[LIVES_LOST] and not done)
        assert info["lives"] <= lives
        lives = info["lives"]
    assert losses == 5 and presses == 4 and terminated  # the last life's loss ends the game: no press
    breakout.close()

    pong = wrapped_env("Pong", fire_on_reset=True)
    pong.reset(seed=0)
    rewards, presses = [], 0
    for _ in range(400):
        _, reward, *_, info = pong.step(0)
        rewards.append(reward)
        presses += info[AUTO_FIRES]
    assert min(rewards) < 0 and presses == 0  # Pong has no lives: a lost point presses nothing
    pong.close()


def test_life_loss_is_read_from_the_transition_even_after_a_restored_state():
    env = wrapped_env("Breakout", repeat_action_probability=0.0)
    ale = env.unwrapped.ale
    fire = env.unwrapped.get_action_meanings().index("FIRE")
    observation, _ = env.reset(seed=1)
    start, start_observation = ale.cloneState(include_rng=True), observation
    env.step(fire)
    lost_at = None
    for step in range(1, 400):
        before = ale.lives()
        _, _, _, _, info = env.step(0)
        assert info[LIVES_LOST] == (info["lives"] < before)
        if info[LIVES_LOST]:
            lost_at = step
            break
    assert lost_at is not None
    # Back to five lives after a life was lost: no loss is reported where none happened.
    ale.restoreState(start)
    env.set_wrapper_attr("last", start_observation)
    _, _, _, _, info = env.step(0)
    assert not info[LIVES_LOST] and info["lives"] == 5
    env.close()


def test_episode_cap_truncates_at_max_frames_and_the_step_cap_at_max_steps():
    env = TwoFrameEnv("Pong", max_episode_frames=40)
    env.reset(seed=0)
    transitions = [env.step("NOOP") for _ in range(10)]
    assert [t.truncated for t in transitions] == [False] * 9 + [True]
    assert not any(t.terminated for t in transitions)
    result = play_episodes(_noop, "Pong", 2, n_envs=2, max_frames=40, progress=False)
    assert [(r.capped, r.length, r.frames) for r in result.records] == [(True, 10, 40)] * 2
    episode = run_episode(_noop, env, seed=0, max_steps=7)
    assert (episode.length, episode.truncated) == (7, True)
    # A step cap beyond the frame cap: the frame cap ends the episode.
    assert (run_episode(_noop, env, seed=0, max_steps=50).length) == 10
    env.close()


# Recorded from play_episodes before the episode loop moved onto gymnasium wrappers (commit 5ae5a76):
# (episode, seed, score, length, frames, capped, auto_fires, action_counts) per episode.
BREAKOUT_EXPERT_FIRE = [
    (0, 5, 8.0, 298, 1200, True, 2, {"LEFT": 115, "RIGHT": 90, "NOOP": 90, "FIRE": 3}),
    (1, 6, 8.0, 298, 1200, True, 2, {"LEFT": 105, "RIGHT": 93, "NOOP": 97, "FIRE": 3}),
    (2, 7, 8.0, 299, 1200, True, 1, {"RIGHT": 93, "LEFT": 108, "NOOP": 98}),
]
PONG_RANDOM = [
    (0, 11, -2.0, 100, 400, True, 0, {"LEFTFIRE": 19, "LEFT": 17, "FIRE": 12, "NOOP": 16, "RIGHTFIRE": 19, "RIGHT": 17}),
    (1, 12, -2.0, 100, 400, True, 0, {"LEFT": 15, "FIRE": 11, "NOOP": 16, "RIGHTFIRE": 18, "LEFTFIRE": 23, "RIGHT": 17}),
    (2, 13, -2.0, 100, 400, True, 0, {"FIRE": 17, "RIGHT": 13, "LEFTFIRE": 18, "RIGHTFIRE": 18, "NOOP": 18, "LEFT": 16}),
]


@pytest.mark.parametrize(
    ("policy", "game", "seed", "kwargs", "expected"),
    [
        (lambda: get_expert("Breakout"), "Breakout", 5, {"max_frames": 1200, "fire_on_reset": True}, BREAKOUT_EXPERT_FIRE),
        (lambda: RandomPolicy(get_game("Pong").action_names, 0), "Pong", 11, {"max_frames": 400}, PONG_RANDOM),
    ],
)
def test_play_episodes_plays_the_recorded_episodes(policy, game, seed, kwargs, expected):
    result = play_episodes(policy(), game, 3, seed, n_envs=2, progress=False, **kwargs)
    played = [(r.episode, r.seed, r.score, r.length, r.frames, r.capped, r.auto_fires, r.action_counts) for r in result.records]
    assert played == expected


def test_expert_loop_and_play_loop_play_the_same_episode():
    """run_episode (an expert's episode) and play_episodes (scoring) share the loop: same steps, same score."""
    env = TwoFrameEnv("Breakout")
    expert_steps = run_episode(get_expert("Breakout"), env, seed=9, max_steps=120, record=True).steps
    env.close()
    events = []
    result = play_episodes(get_expert("Breakout"), "Breakout", 1, 9, n_envs=1, max_frames=4 * 120, on_step=events.append,
                           progress=False)
    assert [(s.decision.action, s.reward, s.life_lost) for s in expert_steps] == [
        (e.decision.action, e.reward, e.life_lost) for e in events
    ]
    assert all(_same_observation(s.observation, e.observation) for s, e in zip(expert_steps, events))
    assert result.records[0].score == sum(s.reward for s in expert_steps) and len(events) == 120


def test_episodes_do_not_depend_on_the_number_of_environments():
    runs = [
        play_episodes(get_expert("Pong"), "Pong", 4, seed=2, n_envs=n, max_frames=600, progress=False).records
        for n in (1, 3)
    ]
    assert runs[0] == runs[1] and [r.seed for r in runs[0]] == [2, 3, 4, 5]


class _ExplodingStep(gym.Wrapper):
    """Raises from ``step`` in the episode reset with seed 101, once 20 frames have been played."""

    def reset(self, *, seed=None, options=None):
        self.seed = seed
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        if self.seed == 101 and self.env.get_wrapper_attr("last").info["episode_frame_number"] >= 20:
            raise RuntimeError("emulator exploded")
        return self.env.step(action)


def test_emulator_error_keeps_finished_episodes(monkeypatch):
    monkeypatch.setattr(evaluate, "wrapped_env", lambda *a, **kw: _ExplodingStep(wrapped_env(*a, **kw)))
    result = play_episodes(_noop, "Pong", 3, seed=100, n_envs=2, max_frames=40, progress=False)
    assert [r.episode for r in result.records] == [0, 2]
    assert len(result.errors) == 1 and "episode 1" in result.errors[0] and "emulator exploded" in result.errors[0]

