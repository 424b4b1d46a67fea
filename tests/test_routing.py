"""Routing tuning: loss maths, routing separation, frozen base, accumulation, plain-LoRA equivalence."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from routing_helpers import make_rows, routing_args, tag, text_rows, tiny_text_lm

from ilora.errors import IloraError
from ilora.models.load import load_vlm, module_part
from ilora.routing.collator import RoutingCollator, Source, mix_sources, select_rows
from ilora.routing.hooks import LoraOutputRecorder, find_lora_layers
from ilora.routing.lora import AdapterSwitch, apply_lora, load_adapter
from ilora.routing.losses import (
    causal_lm_loss,
    kl_base_lora,
    lora_b_squared_norm,
    lora_b_squared_norms,
    lora_norm_loss,
    target_positions,
)
from ilora.routing.trainer import RoutingTrainer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def vlm(tiny_vlm_dir):
    """A fresh copy of the tiny VLM (tests train it) and its processor."""
    return load_vlm(tiny_vlm_dir)


def randomize_lora_b(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_trainer(model, proc, rows, tmp_path, **overrides):
    return RoutingTrainer(model, routing_args(tmp_path, **overrides), train_dataset=rows, processing_class=proc)


# ---- pure loss functions -------------------------------------------------------------------


def test_kl_chunks_match_direct_kl_and_gradient():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 50, generator=g)
    lora = torch.randn(7, 50, generator=g, requires_grad=True)
    direct = (base.softmax(-1) * (base.log_softmax(-1) - lora.log_softmax(-1))).sum(-1).mean()
    (direct_grad,) = torch.autograd.grad(direct, lora)
    for chunk in (1, 3, 100):
        value = kl_base_lora(base, lora, chunk_size=chunk)
        (grad,) = torch.autograd.grad(value, lora)
        torch.testing.assert_close(value, direct)
        torch.testing.assert_close(grad, direct_grad)
    assert kl_base_lora(base, base.clone()).item() == 0.0
    assert kl_base_lora(base[:0], lora[:0]).item() == 0.0


def test_lm_loss_matches_shifted_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 1, 2, -100, -100, -100]])
    rows, positions, targets = target_positions(labels)
    assert positions.tolist() == [1, 2, 3, 0, 1] and targets.tolist() == [3, 4, 5, 1, 2]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(causal_lm_loss(logits[rows, positions], targets), expected)


def test_low_rank_norm_matches_direct_formula_and_gradients():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 5, 3, generator=g, requires_grad=True)
    weight = torch.randn(7, 3, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    direct = ((0.5 * (h @ weight.T)).pow(2).sum(-1) * mask).sum()
    expected = torch.autograd.grad(direct, (h, weight))
    value = lora_b_squared_norm(h, weight, 0.5, mask)
    torch.testing.assert_close(value, direct)
    for got, want in zip(torch.autograd.grad(value, (h, weight)), expected):
        torch.testing.assert_close(got, want)
    unmasked = lora_b_squared_norm(h, weight, 0.5, None)
    torch.testing.assert_close(unmasked, (0.5 * (h @ weight.T)).pow(2).sum())
    assert lora_b_squared_norm(h, torch.zeros(7, 3), 2.0, None).item() == 0.0
    torch.testing.assert_close(lora_norm_loss([torch.tensor(4.0), torch.tensor(9.0)], [2, 3]), torch.tensor(5.0))


def test_grouped_norms_with_row_index_match_per_layer_formula():
    # Several layers at once (two weight shapes, interleaved), only rows 0 and 2, a token mask.
    g = torch.Generator().manual_seed(3)
    hs = [torch.randn(3, 4, 5, generator=g, requires_grad=True) for _ in range(4)]
    ws = [torch.randn(d, 5, generator=g, requires_grad=True) for d in (7, 6, 7, 6)]
    index = torch.tensor([0, 2])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float32)
    full = torch.zeros(3, 4)
    full[index] = mask
    direct = torch.stack([((h @ w.T).pow(2).sum(-1) * full).sum() for h, w in zip(hs, ws)])
    got = lora_b_squared_norms(hs, ws, mask, index)
    torch.testing.assert_close(got, direct)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    expected = torch.autograd.grad((direct * weights).sum(), hs + ws)
    grads = torch.autograd.grad((got * weights).sum(), hs + ws)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)
    assert bool((grads[0][1] == 0).all()) and bool((grads[0][0] != 0).any())  # row 1 is not selected
    zero = lora_b_squared_norms(hs[:2], [torch.zeros(7, 5), torch.zeros(6, 5)], mask, index)
    assert zero.tolist() == [0.0, 0.0]


# ---- data ------------------------------------------------------------------------------------


def test_mixer_sizes_routes_and_determinism():
    task, general = make_rows(5, 0), make_rows(3, 1)
    snapshot = [dict(r) for r in task]
    ds = mix_sources([Source(task, "task", 7)], [Source(general, "general", 2)], seed=3)
    assert len(ds) == 9 and ds.route_counts() == {"task": 7, "general": 2}
    assert [ds[i]["prompt"] for i in range(9)] == [mix_sources([Source(task, "task", 7)], [Source(general, "general", 2)], seed=3)[i]["prompt"] for i in range(9)]
    assert all("route" not in r for r in task) and task == snapshot  # inputs never modified
    with pytest.raises(IloraError, match="route"):
        mix_sources([Source(task, "general")])


def test_select_rows_splits_pixels_by_image_count(vlm):
    _, proc = vlm
    rows = tag(make_rows(2, 0, n_images=(2, 0)), "task") + tag(make_rows(2, 1, n_images=(1, 3)), "general")
    batch = RoutingCollator(proc)(rows)
    assert batch["n_images"].tolist() == [2, 0, 1, 3] and batch["is_task"].tolist() == [True, True, False, False]
    general = select_rows(batch, ~batch["is_task"], batch["n_images"])
    alone = RoutingCollator(proc)(rows[2:])
    assert torch.equal(general["pixel_values"], alone["pixel_values"])
    assert torch.equal(general["input_ids"], alone["input_ids"]) and torch.equal(general["labels"], alone["labels"])
    task = select_rows(batch, batch["is_task"], batch["n_images"])
    assert torch.equal(task["pixel_values"], RoutingCollator(proc)(rows[:2])["pixel_values"])


# ---- the trainer ---------------------------------------------------------------------------------


def test_at_init_kl_and_norm_are_zero_and_lm_is_base_loss(vlm, tmp_path):
    model, proc = vlm
    rows = tag(make_rows(3, 0, n_images=(1, 2)), "task") + tag(make_rows(3, 1, n_images=(2, 1)), "general")
    task_batch = RoutingCollator(proc)(rows[:3])
    with torch.no_grad():
        base_loss = model(**{k: v for k, v in task_batch.items() if k not in ("is_task", "n_images")}).loss
    trainer = make_trainer(model, proc, rows, tmp_path)
    trainer.model.train()
    terms = trainer.routing_terms(trainer.model, RoutingCollator(proc)(rows))
    assert terms["kl"].item() == 0.0 and terms["norm"].item() == 0.0
    torch.testing.assert_close(terms["lm"], base_loss, rtol=1e-6, atol=1e-6)


def test_only_lora_parameters_change(vlm, tmp_path, tiny_vlm_dir):
    model, proc = vlm
    rows = tag(make_rows(8, 0), "task") + tag(make_rows(8, 1, n_images=2), "general")
    trainer = make_trainer(model, proc, rows, tmp_path, max_steps=3, learning_rate=1e-2)
    trainer.train()
    reference, _ = load_vlm(tiny_vlm_dir)
    base = dict(reference.named_parameters())
    changed = 0
    for name, p in trainer.model.named_parameters():
        if "lora_" in name:
            changed += int(not torch.equal(p, torch.zeros_like(p))) if "lora_B" in name else 0
            continue
        original = base[name.removeprefix("base_model.model.").replace(".base_layer", "")]
        assert torch.equal(p.detach(), original), name
        assert not p.requires_grad
    assert changed == len(find_lora_layers(trainer.model)) == 28
    log = [e for e in trainer.state.log_history if "loss" in e]
    assert all({"loss_lm", "loss_kl", "loss_norm"} <= set(e) for e in log if e.get("loss_kl") is not None)
    assert any("loss_norm" in e for e in log)


def test_norm_gradient_reaches_every_lora_a(vlm, tmp_path):
    model, proc = vlm
    rows = tag(make_rows(2, 0), "task") + tag(make_rows(2, 1, n_images=(1, 2)), "general")
    trainer = make_trainer(model, proc, rows, tmp_path, eps_kl=0.0)
    randomize_lora_b(trainer.model)
    terms = trainer.routing_terms(trainer.model, RoutingCollator(proc)(rows[2:]))
    assert set(terms) == {"norm"} and terms["norm"].item() > 0
    terms["norm"].backward()
    lora_a = {n: p.grad for n, p in trainer.model.named_parameters() if "lora_A" in n}
    assert len(lora_a) == 28
    missing = [n for n, g in lora_a.items() if g is None or not bool(g.abs().sum() > 0)]
    assert not missing, missing


def test_routing_separation_with_crafted_batches(vlm, tmp_path):
    model, proc = vlm
    t1, t2 = tag(make_rows(2, 10), "task"), tag(make_rows(2, 11, n_images=2, answer_len=4), "task")
    g1, g2 = tag(make_rows(2, 20, n_images=(1, 2)), "general"), tag(make_rows(2, 21, answer_len=5), "general")
    t3, g3 = tag(make_rows(2, 12), "task"), tag(make_rows(2, 22, n_images=(1, 2)), "general")  # shapes of t1, g1
    trainer = make_trainer(model, proc, t1 + g1, tmp_path)
    randomize_lora_b(trainer.model)
    trainer.model.eval()  # no dropout anyway; eval keeps the comparison deterministic
    collate = RoutingCollator(proc)
    assert collate(t1 + g3)["input_ids"].shape == collate(t3 + g1)["input_ids"].shape == collate(t1 + g1)["input_ids"].shape

    def terms(rows):
        with torch.no_grad():
            return trainer.routing_terms(trainer.model, collate(rows))

    # All rows run in one forward, so other rows can only change the padded batch shape: with
    # the same shapes the terms are bitwise equal, with other shapes equal up to float32 rounding
    # (a few ulps per op: 4e-6 relative seen once the tokenizer's vocabulary changed).
    a, b, b_same = terms(t1 + g1), terms(t1 + g2), terms(t1 + g3)
    assert torch.equal(a["lm"], b_same["lm"])  # general rows never enter the LM loss
    torch.testing.assert_close(a["lm"], b["lm"], rtol=2e-5, atol=0)
    assert not torch.equal(a["kl"], b["kl"]) and not torch.equal(a["norm"], b["norm"])
    assert not torch.equal(a["kl"], b_same["kl"]) and not torch.equal(a["norm"], b_same["norm"])
    c, c_same = terms(t2 + g1), terms(t3 + g1)
    assert torch.equal(a["kl"], c_same["kl"]) and torch.equal(a["norm"], c_same["norm"])  # task rows never enter KL/norm
    for name in ("kl", "norm"):
        torch.testing.assert_close(a[name], c[name], rtol=2e-5, atol=0)
    assert not torch.equal(a["lm"], c["lm"]) and not torch.equal(a["lm"], c_same["lm"])
    assert set(terms(t1)) == {"lm"} and set(terms(g1)) == {"kl", "norm"}  # missing rows: term skipped
    assert all(torch.isfinite(v) for v in terms(g1).values())


def test_gradients_reach_only_their_own_rows_images(vlm, tmp_path):
    # The joint forward's per-row masks must cover the vision tower: the LM loss never reaches
    # a general row's images, KL and norm never a task row's, with several images per row.
    model, proc = vlm
    rows = tag(make_rows(2, 30, n_images=(2, 1)), "task") + tag(make_rows(2, 31, n_images=(1, 3)), "general")
    rows = [rows[0], rows[2], rows[1], rows[3]]  # task, general, task, general
    trainer = make_trainer(model, proc, rows, tmp_path)
    randomize_lora_b(trainer.model)
    batch = RoutingCollator(proc)(rows)
    assert batch["n_images"].tolist() == [2, 1, 1, 3]
    image_is_task = torch.tensor([True, True, False, True, False, False, False])
    batch["pixel_values"].requires_grad_(True)
    terms = trainer.routing_terms(trainer.model, batch)
    for names, own in ((("lm",), image_is_task), (("kl",), ~image_is_task), (("norm",), ~image_is_task)):
        (grad,) = torch.autograd.grad(sum(terms[n] for n in names), batch["pixel_values"], retain_graph=True)
        per_image = grad.abs().flatten(1).sum(1)
        assert bool((per_image[~own] == 0).all()), (names, per_image)
        assert bool((per_image[own] > 0).all()), (names, per_image)


def test_recorder_row_selection_equals_recording_the_rows_alone(vlm):
    model, proc = vlm
    peft_model = apply_lora(model, r=4, alpha=8, seed=0)
    randomize_lora_b(peft_model)
    recorder = LoraOutputRecorder(peft_model)
    rows = make_rows(5, 40, n_images=(2, 0, 1, 3, 1), answer_len=3)
    keep = torch.tensor([False, True, True, False, True])
    collate = RoutingCollator(proc)
    batch = collate(tag(rows, "general"))
    alone = collate(tag([r for r, k in zip(rows, keep.tolist()) if k], "general"))

    def inputs(b):
        return {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}

    with torch.no_grad():
        with recorder.record(batch["attention_mask"], keep, batch["n_images"]):
            peft_model(**inputs(batch), use_cache=False)
        joint_sums, joint_counts, joint_loss = recorder.sums, dict(recorder.counts), recorder.norm_loss()
        with recorder.record(alone["attention_mask"]):
            peft_model(**inputs(alone), use_cache=False)
        alone_sums, alone_counts, alone_loss = recorder.sums, dict(recorder.counts), recorder.norm_loss()
    assert joint_counts == alone_counts and len(joint_counts) == 28
    assert {module_part(n) for n in joint_counts} == {"vision", "projector", "language"}
    for name in alone_sums:
        torch.testing.assert_close(joint_sums[name], alone_sums[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(joint_loss, alone_loss, rtol=1e-5, atol=1e-7)
    recorder.remove()


def test_adapter_switch_equals_peft_disable_adapter(vlm):
    model, proc = vlm
    peft_model = apply_lora(model, r=4, alpha=8, seed=0)
    randomize_lora_b(peft_model)
    switch = AdapterSwitch(peft_model)
    assert switch._fast
    batch = RoutingCollator(proc)(tag(make_rows(2, 50, n_images=(1, 2)), "general"))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    grads_before = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    with torch.no_grad():
        with peft_model.disable_adapter():
            reference = peft_model(**inputs, use_cache=False).logits
        with switch.disabled():
            fast = peft_model(**inputs, use_cache=False).logits
        adapted = peft_model(**inputs, use_cache=False).logits
    with torch.inference_mode(), switch.disabled():
        inference = peft_model(**inputs, use_cache=False).logits
    assert torch.equal(fast, reference) and torch.equal(inference, reference)
    assert not torch.equal(adapted, reference)  # the adapter is back on after the block
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == grads_before
    with switch.disabled():  # gradients enabled: PEFT's own context, same result
        assert torch.equal(peft_model(**inputs, use_cache=False).logits.detach(), reference)


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_gradient_accumulation_2x4_equals_1x8(tiny_vlm, tmp_path):
    vocab = len(tiny_vlm[1].tokenizer)
    # Alternating routes + sequential order: every micro-batch of 4 holds 2 task + 2 general rows.
    task, general = tag(text_rows(4, 0, vocab), "task"), tag(text_rows(4, 1, vocab), "general")
    rows = [r for pair in zip(task, general) for r in pair]
    results = []
    for batch, accum in ((8, 1), (4, 2)):
        trainer = make_trainer(
            tiny_text_lm(vocab), tiny_vlm[1].tokenizer, rows, tmp_path, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum, max_steps=1, optim="sgd", learning_rate=0.5,
            train_sampling_strategy="sequential", max_grad_norm=0.0,
        )
        before = _lora_state(trainer.model)
        trainer.train()
        after = _lora_state(trainer.model)
        loss = next(e for e in trainer.state.log_history if "loss" in e)
        results.append((loss, {n: after[n] - before[n] for n in after}))
    (log8, update8), (log4, update4) = results
    for key in ("loss", "loss_lm", "loss_kl", "loss_norm"):
        assert log8[key] == pytest.approx(log4[key], rel=1e-5, abs=1e-7), key
    assert any(bool(u.abs().sum() > 0) for u in update8.values())
    for name in update8:
        torch.testing.assert_close(update4[name], update8[name], rtol=1e-4, atol=1e-7)


def test_zero_weights_equal_plain_lora_with_vanilla_trainer(vlm, tmp_path, tiny_vlm_dir):
    from transformers import Trainer, TrainingArguments

    model, proc = vlm
    rows = tag(make_rows(8, 0, n_images=(1, 2)), "task")
    settings = dict(max_steps=3, optim="sgd", learning_rate=0.1, train_sampling_strategy="sequential")
    routed = make_trainer(model, proc, rows, tmp_path / "routed", eps_kl=0.0, eps_norm=0.0, **settings)
    randomize_lora_b(routed.model)  # a non-trivial starting point for both
    start = _lora_state(routed.model)
    routed.train()

    plain_model = apply_lora(load_vlm(tiny_vlm_dir)[0], r=4, alpha=8, dropout=0.0, seed=0)
    with torch.no_grad():
        for n, p in plain_model.named_parameters():
            if n in start:
                p.copy_(start[n])
    collate = RoutingCollator(proc)
    plain = Trainer(
        plain_model,
        TrainingArguments(
            output_dir=str(tmp_path / "plain"), per_device_train_batch_size=4, save_strategy="no", report_to="none",
            disable_tqdm=True, remove_unused_columns=False, use_cpu=True, seed=0, **settings,
        ),
        train_dataset=rows,
        data_collator=lambda b: {k: v for k, v in collate(b).items() if k not in ("is_task", "n_images")},
    )
    plain.train()
    routed_state, plain_state = _lora_state(routed.model), _lora_state(plain.model)
    assert any(not torch.equal(routed_state[n], start[n]) for n in start)
    for n in start:
        torch.testing.assert_close(routed_state[n], plain_state[n], rtol=1e-4, atol=1e-6)


# ---- bad input ---------------------------------------------------------------------------------------


def test_clear_errors(vlm, tmp_path, tiny_vlm_dir):
    model, proc = vlm
    task = tag(make_rows(2, 0), "task")
    with pytest.raises(IloraError, match="no general rows"):
        make_trainer(model, proc, task, tmp_path)
    with pytest.raises(IloraError, match="no 'route'"):
        make_trainer(model, proc, make_rows(2, 0), tmp_path, eps_kl=0.0, eps_norm=0.0)
    with pytest.raises(IloraError, match="no labels"):
        RoutingCollator(proc)([{"prompt": "x", "images": [], "route": "task"}])
    with pytest.raises(IloraError, match=r"match no nn.Linear.*q_proj"):
        make_trainer(model, proc, task, tmp_path, eps_kl=0.0, eps_norm=0.0, lora_target_modules=["query_key_value"])
    with pytest.raises(IloraError, match="would get no loss"):
        make_trainer(model, proc, task + tag(make_rows(1, 1), "general"), tmp_path, eps_kl=0.0, eps_norm=0.0)
    # an adapter saved for the VLM does not fit a text-only model
    adapter = tmp_path / "adapter"
    apply_lora(load_vlm(tiny_vlm_dir)[0], r=4, alpha=8).save_pretrained(adapter)
    with pytest.raises(IloraError, match="does not fit"):
        load_adapter(tiny_text_lm(len(proc.tokenizer)), adapter)
    with pytest.raises(IloraError, match="not a PEFT adapter"):
        load_adapter(model, tmp_path)


def test_train_adapter_saves_and_resumes(tiny_vlm_dir, tmp_path):
    from ilora.routing.train import train_adapter

    task, general = make_rows(8, 0), make_rows(4, 1, n_images=2)
    out = tmp_path / "adapter"
    args = routing_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    train_adapter(tiny_vlm_dir, [task], [general], args, out)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "routing_config.json", "loss_log.json", "loss.png"} <= files
    assert json.loads((out / "routing_config.json").read_text())["eps_norm"] == 2.0
    first = json.loads((out / "loss_log.json").read_text())
    assert [e["step"] for e in first if "loss" in e] == [1, 2]
    resumed = routing_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    train_adapter(tiny_vlm_dir, [task], [general], resumed, out, resume=True)
    log = json.loads((out / "loss_log.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]
    assert not any(p.name.startswith(".adapter") for p in tmp_path.iterdir())  # no temp folders left
    loaded = load_adapter(load_vlm(tiny_vlm_dir)[0], out)
    assert len(find_lora_layers(loaded)) == 28
