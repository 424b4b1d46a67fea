"""Sharing the task rows' prompt prefix: where it stops, and that it changes no loss or gradient."""

from __future__ import annotations

import pytest
import torch
from routing_helpers import WORDS, make_rows, routing_args, tag

from ilora.models.load import load_vlm
from ilora.routing.collator import RoutingCollator
from ilora.routing.prefix import MIN_SHARED_TOKENS, plan_forwards, shared_prefix_length
from ilora.routing.trainer import RoutingTrainer

IMG = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shared_prefix_stops_at_images_targets_padding_and_differences():
    n = MIN_SHARED_TOKENS + 4
    ids = torch.arange(10, 10 + n + 6).repeat(3, 1)
    mask = torch.ones_like(ids)
    no_positions = torch.tensor([], dtype=torch.long)
    assert shared_prefix_length(ids, mask, no_positions, None) == ids.shape[1]
    ids[:, n] = IMG
    assert shared_prefix_length(ids, mask, no_positions, IMG) == n  # images are never shared
    assert shared_prefix_length(ids, mask, torch.tensor([n + 3, n - 2]), IMG) == n - 2  # a needed logit
    ids[2, n - 1] = 7
    assert shared_prefix_length(ids, mask, no_positions, IMG) == n - 1  # rows differ
    mask[1, n - 3 :] = 0
    assert shared_prefix_length(ids, mask, no_positions, IMG) == n - 3  # padding
    assert shared_prefix_length(ids, mask, torch.tensor([MIN_SHARED_TOKENS - 2]), IMG) == 0  # too short to pay
    assert shared_prefix_length(ids[:1], mask[:1], no_positions, IMG) == 0  # one row: nothing to share


def test_plan_forwards_splits_only_when_it_saves_padding():
    head = list(range(10, 10 + MIN_SHARED_TOKENS))
    game_a, game_b, question = head + [IMG] * 4 + [9] * 10, head[::-1] + [IMG] * 4 + [9] * 10, [1, IMG, 5]
    rows = [game_a, game_b, game_a, question, question, question]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    is_task = torch.tensor([True, True, True, False, False, False])
    assert plan_forwards(ids, mask, is_task, IMG) == [[0, 2], [1], [3, 4, 5]]  # route and text before the images
    mixed = torch.tensor([True, False, True, False, False, False])
    assert plan_forwards(ids, mask, mixed, IMG) == [[0, 2], [1], [3, 4, 5]]  # game B's row as a general row
    same = ids[[0, 2, 0]]
    assert plan_forwards(same, mask[[0, 2, 0]], is_task[:3], IMG) is None  # one group
    alike = ids[[0, 1]]  # two groups of one length, no prefix to share: splitting saves nothing
    assert plan_forwards(alike, mask[[0, 1]], torch.tensor([True, False]), IMG) is None


def game_rows(n, seed, context, n_images=2):
    return [{**row, "context": context} for row in make_rows(n, seed, n_images=n_images, answer_len=3)]


CONTEXT_A = "Rules of game A: " + " ".join(WORDS * 3)
CONTEXT_B = "Rules of game B: " + " ".join(reversed(WORDS * 3))


@pytest.mark.parametrize("mix", ["plain", "routed", "routed-two-games"])
def test_shared_prefix_gives_the_same_losses_and_gradients(tiny_vlm_dir, tmp_path, mix):
    task = game_rows(4, 0, CONTEXT_A) + (game_rows(3, 1, CONTEXT_B, n_images=(1, 2)) if mix == "routed-two-games" else [])
    rows = tag(task, "task")
    weights = {"eps_kl": 0.0, "eps_norm": 0.0}
    if mix != "plain":
        rows += tag(game_rows(2, 2, CONTEXT_B), "general") + tag(make_rows(2, 3), "general")
        weights = {}
        batch = RoutingCollator(load_vlm(tiny_vlm_dir)[1])(rows)
        plan = plan_forwards(batch["input_ids"], batch["attention_mask"], batch["is_task"], IMG)
        assert plan is not None and len(plan) == (4 if mix == "routed-two-games" else 3)  # the split path runs
    results = []
    for share in (False, True):
        model, proc = load_vlm(tiny_vlm_dir)
        trainer = RoutingTrainer(
            model, routing_args(tmp_path / str(share), share_prompt_prefix=share, **weights), train_dataset=rows,
            processing_class=proc,
        )
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        trainer.model.train()
        terms = trainer.routing_terms(trainer.model, RoutingCollator(proc)(rows))
        sum(terms.values()).backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results.append((terms, grads, trainer._share_prefix))
    (full, full_grads, checked), (shared, shared_grads, used) = results
    assert checked is None and used is True  # sharing was checked against the full forward and used
    assert set(full) == set(shared) == ({"lm"} if mix == "plain" else {"lm", "kl", "norm"})
    for name in full:
        torch.testing.assert_close(shared[name], full[name], rtol=1e-5, atol=1e-6)
    assert full_grads.keys() == shared_grads.keys() and len(full_grads) == 56
    for name, grad in full_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
