"""Skills chosen per input (routing/select.py): the norm rule, the gate, the oracle, and that the
chosen adapter acts exactly as that adapter's own agent."""

from __future__ import annotations

import pytest
import torch
from atari_helpers import spread_observations

from ilora.atari.agent import VLMAgent
from ilora.atari.evaluate import play_episodes
from ilora.errors import IloraError
from ilora.models.inputs import encode_rows
from ilora.models.load import load_vlm, lora_target_modules
from ilora.routing.hooks import LoraOutputRecorder
from ilora.routing.select import (
    GateConfig,
    SkillPolicy,
    SkillSelector,
    fit_gate,
    selection_accuracy,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _save_adapter(base_dir, out, seed: int, zero_b: bool = False):
    """A LoRA adapter on every linear of the tiny VLM (vision, projector, language), random A and B
    (or B = 0: an adapter whose output is zero everywhere)."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_vlm(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(base), init_lora_weights=False)
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    if zero_b:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def adapters(tiny_vlm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("skills")
    return {
        "pong": _save_adapter(tiny_vlm_dir, root / "pong", seed=1),
        "breakout": _save_adapter(tiny_vlm_dir, root / "breakout", seed=2),
        "zero": _save_adapter(tiny_vlm_dir, root / "zero", seed=3, zero_b=True),
    }


@pytest.fixture(scope="module")
def rows(tiny_vlm):
    """Prepared rows per game as the agent builds them (object text on), labelled with their game."""
    model, processor = tiny_vlm
    out = {}
    for game, n in (("Pong", 6), ("Breakout", 6)):
        agent = VLMAgent(model, processor, game, object_text=True)
        out[game] = [{**row, "game": game, "action": "NOOP"} for row in agent.rows(spread_observations(n, game))]
    return out


def _own_agent(base_dir, adapter_dir, game):
    """The agent of one adapter alone (PEFT, unmerged): the reference a selected skill must equal."""
    from peft import PeftModel

    model, processor = load_vlm(base_dir)
    return VLMAgent(PeftModel.from_pretrained(model, adapter_dir).eval(), processor, game, object_text=True)


def _selector(base_dir, adapters, names, rule, **kw):
    return SkillSelector.load(base_dir, {name: adapters[key] for name, key in names.items()}, rule, object_text=True, **kw)


@pytest.mark.parametrize("rule", ["norm", "gate", "oracle"])
def test_one_skill_is_always_chosen_and_acts_exactly_as_its_own_agent(tiny_vlm_dir, adapters, rows, rule):
    selector = _selector(tiny_vlm_dir, adapters, {"Pong": "pong"}, rule)
    pong = rows["Pong"]
    if rule == "gate":
        selector.fit_gate({"Pong": pong[:2]})
    assert selector.select(pong) == [0] * len(pong)
    own = _own_agent(tiny_vlm_dir, adapters["pong"], "Pong")
    with torch.inference_mode():
        want = own.score_rows(pong)
    assert torch.equal(selector.score_rows(pong, "Pong"), want)  # same operations, same batch
    decisions, choices = selector.decide_rows(pong, "Pong")
    assert decisions == own.decide_rows(pong, batch_size=len(pong)) and choices == [0] * len(pong)


def test_oracle_reproduces_each_games_own_adapter(tiny_vlm_dir, adapters, rows):
    selector = _selector(tiny_vlm_dir, adapters, {"Pong": "pong", "Breakout": "breakout"}, "oracle")
    mixed = [rows["Breakout"][0], rows["Pong"][0], rows["Breakout"][1]]
    assert selector.select(mixed) == [1, 0, 1]
    # The two skills really differ on these rows, so choosing the right one matters.
    as_pong, as_breakout = (selector.score_rows(rows["Pong"], "Pong", [k] * len(rows["Pong"])) for k in (0, 1))
    assert (as_pong - as_breakout).abs().max() > 1e-3
    for game, key in (("Pong", "pong"), ("Breakout", "breakout")):
        own = _own_agent(tiny_vlm_dir, adapters[key], game)
        with torch.inference_mode():
            want = own.score_rows(rows[game])
        assert torch.equal(selector.score_rows(rows[game], game), want)
        assert selector.decide_rows(rows[game], game)[0] == own.decide_rows(rows[game], batch_size=len(rows[game]))
    with pytest.raises(IloraError, match="no skill of that name"):
        selector.select([{**rows["Pong"][0], "game": "Boxing"}])


@pytest.mark.parametrize("order", [("zero", "pong"), ("pong", "zero")])
def test_norm_rule_picks_the_only_adapter_with_an_output(tiny_vlm_dir, adapters, rows, order):
    selector = _selector(tiny_vlm_dir, adapters, {"first": order[0], "second": order[1]}, "norm")
    both = rows["Pong"] + rows["Breakout"]
    norms = selector.adapter_norms(both)
    loud = order.index("pong")
    assert (norms[:, 1 - loud] == 0).all() and (norms[:, loud] > 0).all()
    assert selector.select(both) == [loud] * len(both)


def test_row_norms_are_the_routing_recorders_norms_of_each_prompt_alone(tiny_vlm_dir, adapters, rows):
    """Per row, the norm rule's measure (prefix cache, batched rows) is Table 6's number measured on
    that row's full prompt alone: mean over LoRA layers of the mean squared LoRA-B output."""
    from peft import PeftModel

    selector = _selector(tiny_vlm_dir, adapters, {"Pong": "pong", "Breakout": "breakout"}, "norm")
    batch = rows["Pong"][:3] + rows["Breakout"][:2]
    norms = selector.adapter_norms(batch)
    model, processor = load_vlm(tiny_vlm_dir)
    single = PeftModel.from_pretrained(model, adapters["breakout"]).eval()
    recorder = LoraOutputRecorder(single)
    for i, row in enumerate(batch):
        inputs = encode_rows(processor, [row], with_answer=False)
        with torch.inference_mode(), recorder.record(inputs["attention_mask"]):
            single(**inputs, use_cache=False)
        per_layer = [float(total) / recorder.counts[name] for name, total in recorder.sums.items()]
        assert norms[i, 1].item() == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-4)


def test_gate_separates_a_separable_toy_and_is_deterministic_under_its_seed():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    labels = torch.arange(3).repeat_interleave(20)
    features = centres[labels] + torch.randn(60, 3, generator=g)
    test_labels = torch.arange(3).repeat_interleave(10)
    test_features = centres[test_labels] + torch.randn(30, 3, generator=g)
    for hidden in (0, 8):
        config = GateConfig(hidden_units=hidden, seed=5)
        gate = fit_gate(features, labels, 3, config)
        assert torch.equal(gate(features).argmax(-1), labels)
        assert torch.equal(gate(test_features).argmax(-1), test_labels)
        again = fit_gate(features, labels, 3, config)
        assert all(torch.equal(a, b) for a, b in zip(gate.state_dict().values(), again.state_dict().values()))
        other = fit_gate(features, labels, 3, GateConfig(hidden_units=hidden, seed=6))
        assert not all(torch.equal(a, b) for a, b in zip(gate.state_dict().values(), other.state_dict().values()))
    with pytest.raises(IloraError, match="labels"):
        fit_gate(features, labels + 1, 3)
    with pytest.raises(IloraError, match="gate features"):
        GateConfig(features="pixels")


@pytest.mark.parametrize("features", ["hidden", "norms"])
def test_gate_trained_on_some_rows_picks_each_games_skill_on_others(tiny_vlm_dir, adapters, rows, features):
    selector = _selector(tiny_vlm_dir, adapters, {"Pong": "pong", "Breakout": "breakout"}, "gate")
    with pytest.raises(IloraError, match="not trained"):
        selector.select(rows["Pong"])
    train = {"Pong": rows["Pong"][:3], "Breakout": rows["Breakout"][:3]}
    summary = selector.fit_gate(train, GateConfig(features=features, seed=1))
    assert summary["train_accuracy"] == 1.0 and summary["rows"] == {"Pong": 3, "Breakout": 3}
    held = rows["Pong"][3:] + rows["Breakout"][3:]
    chosen = selector.select(held)
    assert chosen == [0] * 3 + [1] * 3
    first = {k: v.clone() for k, v in selector.gate.state_dict().items()}
    selector.fit_gate(train, GateConfig(features=features, seed=1))
    assert all(torch.equal(first[k], v) for k, v in selector.gate.state_dict().items())
    assert selector.select(held) == chosen
    with pytest.raises(IloraError, match="without rows"):
        selector.fit_gate({"Pong": rows["Pong"][:2]})


def test_selection_accuracy_counts_choices_and_times_both_models(tiny_vlm_dir, adapters, rows):
    heldout = {"Pong": rows["Pong"][:4], "Breakout": rows["Breakout"][:4]}
    skills = {"Pong": adapters["pong"], "Breakout": adapters["zero"]}  # Breakout's skill is silent
    oracle = selection_accuracy(tiny_vlm_dir, skills, heldout, "oracle", batch_size=2)
    assert oracle["accuracy"] == 1.0 and oracle["games"]["Breakout"]["chosen"] == {"Pong": 0, "Breakout": 4}
    norm = selection_accuracy(tiny_vlm_dir, skills, heldout, "norm", batch_size=2, rows_per_game=3)
    assert norm["games"]["Pong"]["accuracy"] == 1.0 and norm["games"]["Breakout"]["accuracy"] == 0.0
    assert norm["accuracy"] == 0.5 and norm["games"]["Breakout"]["rows"] == 3
    for result in (oracle, norm):
        assert result["seconds_per_decision"] > 0 and result["merged_seconds_per_decision"] > 0
        assert result["cost_ratio"] == pytest.approx(
            result["seconds_per_decision"] / result["merged_seconds_per_decision"], rel=1e-9
        )
        assert all(0 <= g["agreement"] <= 1 for g in result["games"].values())
    with pytest.raises(IloraError, match="gate_rows"):
        selection_accuracy(tiny_vlm_dir, skills, heldout, "gate")
    with pytest.raises(IloraError, match="selection rule"):
        selection_accuracy(tiny_vlm_dir, skills, heldout, "vote")


def test_policy_plays_as_the_chosen_adapters_own_agent(tiny_vlm_dir, adapters):
    selector = _selector(tiny_vlm_dir, adapters, {"Pong": "pong", "Breakout": "breakout"}, "oracle")
    policy = SkillPolicy(selector, "Pong", source={"model": str(tiny_vlm_dir)})
    kw = {"n_envs": 2, "max_frames": 48, "progress": False}
    played = play_episodes(policy, "Pong", 2, seed=4, **kw)
    own = play_episodes(_own_agent(tiny_vlm_dir, adapters["pong"], "Pong"), "Pong", 2, seed=4, **kw)
    assert [r.action_counts for r in played.records] == [r.action_counts for r in own.records]
    assert policy.chosen == {"Pong": played.steps, "Breakout": 0}
    assert played.settings["rule"] == "oracle" and played.settings["skills"] == ["Pong", "Breakout"]
    with pytest.raises(IloraError, match="no skill of that name"):
        SkillPolicy(selector, "Boxing")
