"""A two-task toy: routing keeps the adapter quiet on general data at a comparable task loss."""

from __future__ import annotations

import torch

from ilora.models.load import load_vlm
from ilora.routing.analyze import lora_activation_norms
from ilora.routing.collator import RoutingCollator, mix_sources

from routing_helpers import make_rows, routing_args


def toy_rows(n: int, seed: int, prefix: str):
    """Rows whose answer is the prompt's second word (learnable from the text alone)."""
    return [{**r, "answer": r["prompt"].split()[1]} for r in make_rows(n, seed, prefix=prefix)]


def task_loss(trainer, rows) -> float:
    batch = RoutingCollator(trainer.processing_class)([{**r, "route": "task"} for r in rows])
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.routing_terms(trainer.model, batch)["lm"])


def test_routed_adapter_is_quieter_on_general_data(tiny_vlm_dir, tmp_path, one_thread):
    from ilora.routing.trainer import RoutingTrainer

    task, general = toy_rows(32, 0, "Action:"), make_rows(32, 1, n_images=2, prefix="Describe:")
    held_out_task, held_out_general = toy_rows(16, 2, "Action:"), make_rows(16, 3, n_images=2, prefix="Describe:")
    settings = dict(max_steps=30, per_device_train_batch_size=8, learning_rate=5e-3, lora_r=8, lora_alpha=16)
    results = {}
    for name, general_sources, eps in (("plain", [], dict(eps_kl=0.0, eps_norm=0.0)), ("routed", [general], {})):
        model, proc = load_vlm(tiny_vlm_dir)
        args = routing_args(tmp_path / name, **settings, **eps)
        trainer = RoutingTrainer(model, args, train_dataset=mix_sources([task], general_sources), processing_class=proc)
        trainer.train()
        norms, _ = lora_activation_norms(trainer.model, proc, held_out_general)
        results[name] = (sum(norms.values()) / len(norms), task_loss(trainer, held_out_task))
    (plain_norm, plain_loss), (routed_norm, routed_loss) = results["plain"], results["routed"]
    print(f"\nplain : general LoRA-B norm {plain_norm:.4g}, task loss {plain_loss:.4f}")
    print(f"routed: general LoRA-B norm {routed_norm:.4g}, task loss {routed_loss:.4f}")
    assert routed_norm < 0.5 * plain_norm
    assert routed_loss < 1.25 * plain_loss + 0.05
