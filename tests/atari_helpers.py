"""Shared helpers for the Atari agent tests."""

from __future__ import annotations

from ilora.atari.envs import TwoFrameEnv


def spread_observations(n: int, game: str = "Pong") -> list:
    """``n`` observations spread over an episode (9 steps apart), whose object-state texts differ in length."""
    env = TwoFrameEnv(game, repeat_action_probability=0.0)
    obs = [env.reset(seed=3)]
    while len(obs) < n:
        for _ in range(9):
            transition = env.step(len(obs) % 3)
        obs.append(transition.observation)
    env.close()
    return obs
