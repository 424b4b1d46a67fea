"""Routing loss scale under gradient accumulation and activation checkpointing.

Each term is normalised over the whole optimiser step, so splitting one batch into micro-batches
changes neither the update nor the logged losses, even where a micro-batch lacks a route or the
micro-batches hold different numbers of label tokens, images and general tokens.
"""

from __future__ import annotations

import pytest
import torch
from routing_helpers import make_rows, routing_args, tag
from test_routing import _lora_state, make_trainer, randomize_lora_b

from ilora.errors import IloraError
from ilora.models.load import load_vlm

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = {"lm": 1.0, "kl": 0.5, "norm": 2.0}  # a KL weight large enough to move the update measurably


@pytest.fixture(scope="module")
def uneven_rows():
    """Eight rows in a fixed order: task answers of 1 or 4 words, general rows with 1 or 2 images.

    Micro-batches of 2 are [task, task] (no general row), [task, general], [task, general],
    [general, general] (no task row); of 4, three task rows then one, with unequal label counts.
    """
    short, long = make_rows(2, 0, answer_len=1), make_rows(2, 1, answer_len=4)
    one, two = make_rows(2, 2, n_images=1, answer_len=2), make_rows(2, 3, n_images=2, answer_len=3)
    task, general = tag([short[0], long[0], short[1], long[1]], "task"), tag([one[0], two[0], one[1], two[1]], "general")
    return [task[0], task[1], task[2], general[0], task[3], general[1], general[2], general[3]]


def one_step(model_dir, proc, rows, tmp_path, batch, accumulation, **overrides):
    """One SGD step (no clipping) from the same randomised adapter: ``(update per LoRA tensor, log)``."""
    trainer = make_trainer(
        load_vlm(model_dir)[0], proc, rows, tmp_path, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
        train_sampling_strategy="sequential", eps_lm=EPS["lm"], eps_kl=EPS["kl"], eps_norm=EPS["norm"], **overrides,
    )
    randomize_lora_b(trainer.model)  # B = 0 would give KL and L_norm no gradient
    before = _lora_state(trainer.model)
    trainer.train()
    after = _lora_state(trainer.model)
    log = next(e for e in trainer.state.log_history if "loss" in e)
    return {name: after[name] - before[name] for name in after}, log


def assert_same_updates(update, reference):
    """Equal at float32 tolerance (padding and summation order differ), relative to each tensor's scale."""
    assert update.keys() == reference.keys()
    for name, expected in reference.items():
        scale = float(expected.abs().max())
        torch.testing.assert_close(update[name], expected, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_update_and_logs_do_not_depend_on_batch_times_accumulation(tiny_vlm_dir, tiny_vlm, uneven_rows, tmp_path):
    proc = tiny_vlm[1]
    runs = {(b, a): one_step(tiny_vlm_dir, proc, uneven_rows, tmp_path, b, a) for b, a in ((8, 1), (4, 2), (2, 4))}
    reference, reference_log = runs[(8, 1)]
    assert sum(1 for u in reference.values() if bool(u.abs().sum() > 0)) == len(reference)  # every tensor moves
    for (update, log) in runs.values():
        assert_same_updates(update, reference)
        for key in ("loss", "loss_lm", "loss_kl", "loss_norm"):
            assert log[key] == pytest.approx(reference_log[key], rel=1e-5), key
        assert log["loss"] == pytest.approx(sum(EPS[t] * log[f"loss_{t}"] for t in EPS), rel=1e-6)


def test_logged_total_is_weighted_sum_of_logged_terms_over_steps(tiny_vlm_dir, tiny_vlm, uneven_rows, tmp_path):
    # Two steps per log, one of them with a micro-batch that has no general row.
    trainer = make_trainer(
        load_vlm(tiny_vlm_dir)[0], tiny_vlm[1], uneven_rows, tmp_path, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=2, logging_steps=2, train_sampling_strategy="sequential",
        eps_kl=EPS["kl"], eps_norm=EPS["norm"],
    )
    randomize_lora_b(trainer.model)
    trainer.train()
    (log,) = [e for e in trainer.state.log_history if "loss" in e]
    assert log["loss"] == pytest.approx(sum(EPS[t] * log[f"loss_{t}"] for t in EPS), rel=1e-6)


def test_non_reentrant_checkpointing_gives_the_same_gradient(tiny_vlm_dir, tiny_vlm, uneven_rows, tmp_path):
    proc = tiny_vlm[1]
    plain, _ = one_step(tiny_vlm_dir, proc, uneven_rows, tmp_path, 4, 2)
    checkpointed, _ = one_step(tiny_vlm_dir, proc, uneven_rows, tmp_path, 4, 2, activation_checkpointing=True)
    assert_same_updates(checkpointed, plain)


def test_reentrant_checkpointing_is_refused_with_the_norm_term(tmp_path):
    reentrant = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}}
    with pytest.raises(IloraError, match="use_reentrant=True drops L_norm's gradient"):
        routing_args(tmp_path, **reentrant)
    assert routing_args(tmp_path, eps_norm=0.0, **reentrant).activation_checkpointing_kwargs["use_reentrant"]
    # The deprecated name the YAML configs use gets the non-reentrant checkpoint too.
    with pytest.warns(FutureWarning):
        args = routing_args(tmp_path, gradient_checkpointing=True)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
