"""Sharing the task rows' prompt prefix: where it stops, and that it changes no loss or gradient."""

from __future__ import annotations

import pytest
import torch
from routing_helpers import WORDS, make_rows, routing_args, tag

from ilora.models.load import load_vlm
from ilora.routing.collator import RoutingCollator
from ilora.routing.prefix import MIN_SHARED_TOKENS, prefix_groups, shared_prefix_length
from ilora.routing.trainer import RoutingTrainer

IMG = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


def test_prefix_groups_split_rows_by_their_text_before_the_first_image():
    ids = torch.tensor([[1, 5, IMG, 8], [1, 6, IMG, 8], [1, 5, IMG, 9], [1, 6, 6, 6]])
    assert prefix_groups(ids, IMG) == [[0, 2], [1], [3]]
    assert prefix_groups(ids, None) == [[0, 1, 2, 3]]


def game_rows(n, seed, context, n_images=2):
    return [{**row, "context": context} for row in make_rows(n, seed, n_images=n_images, answer_len=3)]


CONTEXT_A = "Rules of game A: " + " ".join(WORDS * 3)
CONTEXT_B = "Rules of game B: " + " ".join(reversed(WORDS * 3))


@pytest.mark.parametrize("groups", [1, 2])
def test_shared_prefix_gives_the_same_losses_and_gradients(tiny_vlm_dir, tmp_path, groups):
    task = game_rows(4, 0, CONTEXT_A) + (game_rows(3, 1, CONTEXT_B, n_images=(1, 2)) if groups == 2 else [])
    rows = tag(task, "task") + tag(game_rows(2, 2, CONTEXT_B), "general") + tag(make_rows(2, 3), "general")
    results = []
    for share in (False, True):
        model, proc = load_vlm(tiny_vlm_dir)
        trainer = RoutingTrainer(
            model, routing_args(tmp_path / str(share), share_prompt_prefix=share), train_dataset=rows, processing_class=proc
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
    (plain, plain_grads, checked), (shared, shared_grads, used) = results
    assert checked is None and used is True  # sharing was checked against the full forward and used
    assert set(plain) == set(shared) == {"lm", "kl", "norm"}
    for name in plain:
        torch.testing.assert_close(shared[name], plain[name], rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == shared_grads.keys() and len(plain_grads) == 56
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
