"""``ilora rl``: GRPO advantages, emulator branching, LoRA-only gradients, learning, resume, refusals."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from merge_helpers import make_adapter
from routing_helpers import make_rows

from ilora.atari.envs import Observation, Transition
from ilora.atari.games import get_game
from ilora.cli import main
from ilora.models.load import builtin_base
from ilora.rl.config import GRPOSettings
from ilora.rl.env import BranchingEnv, GroupRollouts
from ilora.rl.grpo import GeneralRowTerms, GRPOLearner, group_advantages

pytestmark = pytest.mark.usefixtures("one_thread")


class KnownBestEnv:
    """A one-screen game: every step shows the same frames; action ``best`` scores 1, the others 0."""

    frame_skip = 4

    def __init__(self, best: str, game: str = "Pong") -> None:
        self.game = get_game(game)
        self.action_names = self.game.action_names
        self.best = best
        frame = np.random.default_rng(0).integers(0, 256, size=(210, 160, 3), dtype=np.uint8)
        ram = np.zeros(128, dtype=np.uint8)
        self.observation = Observation((frame, frame), (ram, ram), {"lives": 0}, self.game)

    def reset(self, seed=None) -> Observation:
        return self.observation

    def step(self, action) -> Transition:
        return Transition(self.observation, float(action == self.best), False, False, False)

    def snapshot(self):
        return None  # nothing changes, nothing to save

    def restore(self, snapshot) -> Observation:
        return self.observation

    def close(self) -> None:
        pass


def fresh_policy(settings: GRPOSettings, seed: int = 0):
    """The builtin base with a new LoRA adapter (B = 0: the base's function)."""
    from ilora.models.load import load_vlm
    from ilora.routing.lora import apply_lora

    model, processor = load_vlm("builtin")
    return apply_lora(model, settings.lora_r, settings.lora_alpha, 0.0, None, settings.lora_parts, seed), processor


# ----- advantages ---------------------------------------------------------------------------------


def test_group_advantages_zero_mean_unit_scale_and_zero_for_equal_returns():
    returns = torch.tensor([
        [1.0, 0.0, 0.0, 3.0, -2.0],
        [0.1, 0.1, 0.1, 0.1, 0.1],  # equal returns whose float mean is not exactly 0.1
        [5.0, 5.0, 5.0, 5.0, 6.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ])
    adv = group_advantages(returns)
    assert torch.isfinite(adv).all()
    for g in (0, 2):
        assert abs(float(adv[g].mean())) < 1e-6
        assert float(adv[g].std()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(adv[1], torch.zeros(5)) and torch.equal(adv[3], torch.zeros(5))
    # Order within a group is kept: the best continuation gets the largest advantage.
    assert int(adv[0].argmax()) == 3 and int(adv[2].argmax()) == 4
    # Shifting and scaling a group's rewards leaves its advantages unchanged.
    assert torch.allclose(group_advantages(returns[:1] * 7 + 3), adv[:1], atol=1e-6)


# ----- emulator branching -------------------------------------------------------------------------


def play(env: BranchingEnv, actions: list[int]) -> tuple[list[np.ndarray], list[float]]:
    frames, rewards = [], []
    for action in actions:
        transition = env.step(action)
        frames.append(transition.observation.frame)
        rewards.append(transition.reward)
    return frames, rewards


def test_restoring_a_cloned_state_reproduces_frames_and_rewards():
    rng = np.random.default_rng(0)
    env, other = BranchingEnv("Boxing"), BranchingEnv("Boxing")  # sticky actions on (v5's 0.25)
    env.reset(seed=1)
    other.reset(seed=7)
    play(env, rng.integers(0, len(env.action_names), 30).tolist())
    start = env.snapshot()
    actions = rng.integers(0, len(env.action_names), 120).tolist()
    frames, rewards = play(env, actions)
    assert any(not np.array_equal(frames[0], f) for f in frames)  # the game moved on
    assert any(rewards)  # and scored (punches land in Boxing within 120 random steps)
    for target, snapshot in ((env, start), (other, start), (other, pickle.loads(pickle.dumps(start)))):
        target.restore(snapshot)
        again_frames, again_rewards = play(target, actions)
        assert again_rewards == rewards
        assert all(np.array_equal(a, b) for a, b in zip(again_frames, frames))
    # Another action sequence from the same state is another game (restore is not a replay of frames).
    env.restore(start)
    changed, _ = play(env, [(a + 1) % len(env.action_names) for a in actions])
    assert not all(np.array_equal(a, b) for a, b in zip(changed, frames))
    env.close()
    other.close()


def test_group_rollouts_share_a_start_and_the_trunk_continues_from_continuation_zero():
    rollouts = GroupRollouts(lambda: BranchingEnv("Pong"), get_game("Pong").action_names, groups=2, group_size=3,
                             horizon=5, seed=3, fire_on_reset=False)
    chosen = []

    def sample(observations):
        picks = [len(chosen) % 6 for _ in observations]
        chosen.append(len(observations))
        return picks

    batch = rollouts.collect(sample)
    assert batch.actions.shape == batch.returns.shape == (2, 3)
    assert chosen[0] == 6 and batch.steps == sum(chosen)  # every continuation sampled in one call per step
    assert batch.frames == 4 * batch.steps
    trunk_after = rollouts.envs[0][0].snapshot().observation.frame
    # Continuation 0 of group 0 played to its end in the trunk's environment; the next batch starts there.
    following = rollouts.collect(sample)
    assert np.array_equal(following.observations[0].frame, trunk_after)
    rollouts.close()


# ----- the loss -----------------------------------------------------------------------------------


def known_best_batch(settings: GRPOSettings, learner: GRPOLearner, best: str):
    rollouts = GroupRollouts(lambda: KnownBestEnv(best), learner.action_names, settings.groups, settings.group_size,
                             settings.horizon, fire_on_reset=False)
    return rollouts


def test_gradient_reaches_lora_parameters_only(tmp_path):
    settings = GRPOSettings(groups=2, group_size=4, horizon=1, object_text=False, lora_r=4, lora_alpha=8)
    model, processor = fresh_policy(settings)
    general = GeneralRowTerms(model, processor, make_rows(4, seed=0), settings, str(tmp_path))
    learner = GRPOLearner(model, processor, "Pong", settings, general)
    batch = known_best_batch(settings, learner, "RIGHT").collect(learner.sample)
    batch.returns[0] = torch.arange(settings.group_size, dtype=torch.float32)  # an informative group for sure
    loss, terms = learner.loss(learner.prepare(batch))
    assert {"general_kl", "general_norm", "kl", "policy_loss"} <= set(terms)
    loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name for name in with_grad)
    assert all(not p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)
    assert any(float(p.grad.abs().sum()) > 0 for name, p in model.named_parameters() if p.grad is not None)


def test_updates_raise_the_probability_of_the_best_action():
    settings = GRPOSettings(groups=2, group_size=8, horizon=1, object_text=False, lora_r=4, lora_alpha=8,
                            learning_rate=5e-3, beta=0.0, seed=0)
    model, processor = fresh_policy(settings)
    learner = GRPOLearner(model, processor, "Pong", settings)
    screen = KnownBestEnv("NOOP").observation
    with torch.no_grad():
        before = learner.log_probs([screen])[0].exp()
    best = int(before.argsort(descending=True)[2])  # the third most likely action scores; the top two do not
    rollouts = known_best_batch(settings, learner, learner.action_names[best])
    for _ in range(6):
        learner.update(rollouts.collect(learner.sample))
    with torch.no_grad():
        after = learner.log_probs([screen])[0].exp()
    assert float(after[best]) > float(before[best]) + 0.2, (before.tolist(), after.tolist())
    assert int(after.argmax()) == best


# ----- runs: resume, refusals ---------------------------------------------------------------------

RUN_ARGS = ["--game", "Boxing", "--base", "builtin"]
TINY_RUN = ["frames=60", "groups=1", "group_size=2", "horizon=2", "save_every=2", "lora_r=4", "lora_alpha=8"]


def rl(tmp_path: Path, *args: str, settings: list[str] = TINY_RUN) -> int:
    sets = [arg for pair in settings for arg in ("--set", pair)]
    return main(["rl", *RUN_ARGS, *sets, *args])


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_resume_from_a_checkpoint_replays_the_run(tmp_path, capsys):
    out = tmp_path / "boxing"
    assert rl(tmp_path, "--out", str(out)) == 0
    full_log = json.loads((out / "rl_log.json").read_text())
    full = adapter_weights(out)
    assert [entry["update"] for entry in full_log] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "boxing.run").iterdir()) == ["checkpoint-2", "rl_settings.json"]
    assert json.loads((out / "prompt_settings.json").read_text())["games"] == ["Boxing"]

    # Other settings are refused before anything is loaded, and nothing changes.
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert rl(tmp_path, "--out", str(out), "--resume", settings=[*TINY_RUN, "seed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "settings.seed" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before

    # An interrupted run continued from checkpoint-2 ends where the uninterrupted one did.
    assert rl(tmp_path, "--out", str(out), "--resume") == 0
    resumed_log = json.loads((out / "rl_log.json").read_text())
    assert [(e["frames"], e["return"]) for e in resumed_log] == [(e["frames"], e["return"]) for e in full_log]
    resumed = adapter_weights(out)
    assert resumed.keys() == full.keys()
    assert all(torch.allclose(resumed[k], full[k], atol=1e-6) for k in full)


@pytest.fixture(scope="module")
def general_data(tmp_path_factory) -> Path:
    """A saved dataset of general rows (prompt, answer)."""
    from datasets import Dataset

    path = tmp_path_factory.mktemp("general") / "rows"
    rows = [{"prompt": row["prompt"], "answer": row["answer"]} for row in make_rows(2, seed=0)]
    Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize(
    "case, args, settings, named",
    [
        ("unknown game", ["--game", "Pongg"], TINY_RUN, "Pongg"),
        ("bad setting", [], [*TINY_RUN, "horizon=0"], "horizon"),
        ("unknown setting", [], [*TINY_RUN, "horizn=3"], "horizn"),
        ("no object text", ["--game", "Alien"], TINY_RUN, "object_text"),
        ("not an adapter", ["--init-adapter", "{tmp}"], TINY_RUN, "--init-adapter"),
        ("missing general rows", ["--general", "{tmp}/nowhere"], TINY_RUN, "--general"),
        ("general rows without weights", ["--general", "{data}"], [*TINY_RUN, "eps_kl=0", "eps_norm=0"], "eps_kl"),
        ("existing output", ["--out", "{tmp}"], TINY_RUN, "already exists"),
    ],
)
def test_bad_inputs_are_refused_in_one_line_before_any_work(tmp_path, capsys, general_data, case, args, settings, named):
    args = [a.format(tmp=tmp_path, data=general_data) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "new")]
    files = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    # argparse keeps the last --game, so a case's own --game wins over RUN_ARGS'.
    sets = [arg for pair in settings for arg in ("--set", pair)]
    assert main(["rl", *RUN_ARGS, *sets, *out, *args]) == 2, case
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert sorted(tmp_path.rglob("*")) == files


def test_a_clone_prompted_otherwise_is_refused(tmp_path, capsys):
    from ilora.prompt_settings import PromptSettings

    adapter = make_adapter(builtin_base(), tmp_path / "clone", seed=1, r=4, alpha=8, targets=["q_proj", "v_proj"])
    PromptSettings(("Boxing",), object_text=False, reasoning=False).write(adapter)
    assert rl(tmp_path, "--out", str(tmp_path / "new"), "--init-adapter", str(adapter)) == 2
    err = capsys.readouterr().err.strip()
    assert "object_text=True vs False" in err and not (tmp_path / "new").exists()
