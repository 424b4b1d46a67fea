"""Group rollouts: several continuations from one cloned emulator state, all environments in lockstep.

GRPO needs, for one state, several outcomes of the current policy to compare, so that a
group's mean return is the baseline and no value network is needed. The ALE can copy and
restore its whole state (``ale.cloneState`` / ``ale.restoreState``, through the gymnasium
environment's ``unwrapped.ale``), so a group is: one running episode (the group's *trunk*),
its state cloned into ``group_size`` environments, and from there one continuation each
whose first action is sampled from the policy, then the policy for up to ``horizon`` steps
(or to a lost life, or the end of the episode). The trunk environment plays continuation 0,
so the running episode moves on by one on-policy continuation per update and no frame is
played only to reach the next start state.

The clone includes the emulator's random generator (``include_rng=True``): restored
continuations meet the same sticky-action draws, so within a group their returns differ by
the actions taken, not by the emulator's dice (common random numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ilora.atari.envs import Observation, Transition, TwoFrameEnv


@dataclass(frozen=True)
class EnvSnapshot:
    """Everything needed to put a :class:`BranchingEnv` back where it was.

    Attributes:
        ale_state: ``ale.cloneState(include_rng=True)``: the emulator (frame counters and the
            sticky-action generator included); picklable, so checkpoints can hold it.
        observation: the two-frame observation the environment last returned.
    """

    ale_state: Any
    observation: Observation


class BranchingEnv(TwoFrameEnv):
    """A :class:`~ilora.atari.envs.TwoFrameEnv` whose state can be saved and restored, also into
    another environment of the same game and settings."""

    def snapshot(self) -> EnvSnapshot:
        """The current state (after ``reset``)."""
        if self._last is None:
            raise RuntimeError("call reset() before snapshot()")
        return EnvSnapshot(self._env.unwrapped.ale.cloneState(include_rng=True), self._last)

    def restore(self, snapshot: EnvSnapshot) -> Observation:
        """Continue from ``snapshot``; the next ``step`` plays what followed it. Returns its observation."""
        self._env.unwrapped.ale.restoreState(snapshot.ale_state)
        self._last = snapshot.observation
        return snapshot.observation


class Branchable(Protocol):
    """What group rollouts need from an environment (:class:`BranchingEnv`, or a test's stub)."""

    action_names: tuple[str, ...]
    frame_skip: int

    def reset(self, seed: int | None = None) -> Observation: ...

    def step(self, action: int | str) -> Transition: ...

    def snapshot(self) -> Any: ...

    def restore(self, snapshot: Any) -> Observation: ...

    def close(self) -> None: ...


@dataclass
class GroupBatch:
    """One update's groups: each group's shared start, its continuations' first actions and returns.

    Attributes:
        observations: ``[groups]`` the start observation each group's continuations share.
        actions: long ``[groups, group_size]``, index (in the policy's action names) of each
            continuation's first action, the one the group compares.
        returns: float ``[groups, group_size]``, each continuation's summed game reward.
        frames: emulator frames played since the previous batch (automatic FIRE presses and the
            FIRE after starting an episode included).
        steps: agent steps (policy decisions) taken.
        episode_scores: scores of the running episodes that ended while collecting.
    """

    observations: list[Observation]
    actions: torch.Tensor
    returns: torch.Tensor
    frames: int
    steps: int
    episode_scores: list[float] = field(default_factory=list)


# A policy that samples: observations -> one action index (into ``action_names``) per observation.
Sampler = Callable[[Sequence[Observation]], list[int]]


class GroupRollouts:
    """``groups`` running episodes, each with ``group_size`` environments to branch it into.

    Args:
        make_env: builds one environment (all of one game and one set of emulator settings).
        action_names: the policy's action names (its sampled indices index them).
        groups: start states per batch (running episodes).
        group_size: continuations per start state.
        horizon: agent steps per continuation at most.
        seed: the running episodes are reset with ``seed``, ``seed + 1``, ... in the order they start.
        stop_on_life_loss: end a continuation at a lost life (or lost point, ``Transition.life_lost``).
        fire_on_reset: press FIRE after every reset and lost life (games that have FIRE), as
            :func:`ilora.atari.evaluate.play_episodes` does with ``fire_on_reset``.
    """

    def __init__(
        self,
        make_env: Callable[[], Branchable],
        action_names: Sequence[str],
        groups: int,
        group_size: int,
        horizon: int,
        seed: int = 0,
        *,
        stop_on_life_loss: bool = True,
        fire_on_reset: bool = True,
    ) -> None:
        self.action_names = tuple(action_names)
        self.horizon = horizon
        self.stop_on_life_loss = stop_on_life_loss
        self.envs = [[make_env() for _ in range(group_size)] for _ in range(groups)]
        self.auto_fire = fire_on_reset and "FIRE" in self.envs[0][0].action_names
        self.seed = seed
        self.episodes_started = 0
        self.trunk_scores = [0.0] * groups  # score so far of each running episode
        self.frames_played = 0  # emulator frames stepped by every environment, automatic FIRE presses included
        self.frames_reported = 0  # frames_played when the last batch was returned
        for g, group in enumerate(self.envs):
            for env in group[1:]:
                env.reset(seed=seed)  # an environment must be reset once before it is restored into
            self._start_episode(g)

    def _start_episode(self, g: int) -> None:
        trunk = self.envs[g][0]
        trunk.reset(seed=self.seed + self.episodes_started)
        self.episodes_started += 1
        self.trunk_scores[g] = 0.0
        if self.auto_fire:
            self.trunk_scores[g] += self._step(trunk, "FIRE").reward

    def _step(self, env: Branchable, action: str) -> Transition:
        self.frames_played += env.frame_skip
        return env.step(action)

    def _act(self, env: Branchable, action: str) -> tuple[Transition, float]:
        """One decision's step, then FIRE after a lost life when auto-firing; the transition that ends
        it and the reward of both."""
        transition = self._step(env, action)
        reward = transition.reward
        if self.auto_fire and transition.life_lost and not transition.done:
            life_lost = transition.life_lost
            transition = self._step(env, "FIRE")
            reward += transition.reward
            transition = Transition(transition.observation, transition.reward, transition.terminated,
                                    transition.truncated, life_lost)
        return transition, reward

    def collect(self, sample: Sampler) -> GroupBatch:
        """Branch every running episode into ``group_size`` continuations and play them all in
        lockstep (one ``sample`` call per agent step for every running continuation); each
        trunk then continues from where its continuation 0 ended (a new episode if it ended)."""
        groups, group_size = len(self.envs), len(self.envs[0])
        starts = [group[0].snapshot() for group in self.envs]
        observations = [group[0].restore(start) for group, start in zip(self.envs, starts)]
        for group, start in zip(self.envs, starts):
            for env in group[1:]:
                env.restore(start)
        running = {(g, i): observations[g] for g in range(groups) for i in range(group_size)}
        actions = torch.zeros(groups, group_size, dtype=torch.long)
        returns = torch.zeros(groups, group_size, dtype=torch.float64)
        steps, ended = 0, []
        for step in range(self.horizon):
            if not running:
                break
            keys = sorted(running)
            chosen = sample([running[key] for key in keys])
            steps += len(keys)
            for (g, i), index in zip(keys, chosen):
                if step == 0:
                    actions[g, i] = index
                transition, reward = self._act(self.envs[g][i], self.action_names[index])
                returns[g, i] += reward
                if i == 0:
                    self.trunk_scores[g] += reward
                if transition.done or (self.stop_on_life_loss and transition.life_lost):
                    del running[(g, i)]
                    if i == 0 and transition.done:
                        ended.append(self.trunk_scores[g])
                        self._start_episode(g)
                else:
                    running[(g, i)] = transition.observation
        frames, self.frames_reported = self.frames_played - self.frames_reported, self.frames_played
        return GroupBatch(observations, actions, returns.float(), frames, steps, ended)

    def state(self) -> dict:
        """The running episodes (picklable), for a checkpoint; :meth:`load_state` resumes them."""
        return {
            "trunks": [group[0].snapshot() for group in self.envs],
            "trunk_scores": list(self.trunk_scores),
            "episodes_started": self.episodes_started,
            "frames_played": self.frames_played,
            "frames_reported": self.frames_reported,
        }

    def load_state(self, state: dict) -> None:
        """Put the running episodes back as :meth:`state` saved them."""
        if len(state["trunks"]) != len(self.envs):
            raise ValueError(f"the saved state has {len(state['trunks'])} running episodes, not {len(self.envs)}")
        for group, trunk in zip(self.envs, state["trunks"]):
            group[0].restore(trunk)
        self.trunk_scores = list(state["trunk_scores"])
        self.episodes_started = state["episodes_started"]
        self.frames_played = state["frames_played"]
        self.frames_reported = state["frames_reported"]

    def close(self) -> None:
        for group in self.envs:
            for env in group:
                env.close()
