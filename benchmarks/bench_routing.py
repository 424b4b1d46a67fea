"""Routing-tuning cost vs plain LoRA at the same batch composition (issue 3 target: ratio <= 1.25).

For each model size, one batch of ``--task`` task rows and ``--general`` general rows (two
frames each, like the Atari data) is trained on repeatedly by

- plain LoRA: every row takes the LM loss (``eps_kl = eps_norm = 0``), one forward;
- routing: task rows -> LM loss, general rows -> KL + LoRA-norm: the task rows' forward and
  the general rows' forward (LoRA-B outputs recorded), plus a no-grad forward of the base
  (adapter disabled) on the general rows only, which is the floor of the extra cost.

Step = ``Trainer.training_step`` (forward + backward) + optimiser step, timed alternately
(plain, routed, plain, ...) so machine load hits both alike; the median is reported. ``floor``
is ``1 + (that base forward alone) / (plain step)``, timed in the same alternation: the ratio
no implementation of the SPEC's KL can beat (the norm term and the KL itself come on top). Peak
memory: CUDA ``max_memory_allocated`` on a GPU; on CPU the peak bytes held by autograd for the
backward pass (tensors saved for backward), which is what the routing terms add to.

    python benchmarks/bench_routing.py                 # CPU (one thread), tiny + ~15M models
    python benchmarks/bench_routing.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from routing_helpers import make_rows  # noqa: E402

from ilora.base.pretrain import tokenizer_corpus  # noqa: E402
from ilora.models.load import load_vlm  # noqa: E402
from ilora.models.tiny import TinyVLMConfig, build_tiny_vlm  # noqa: E402
from ilora.routing.collator import RoutingCollator  # noqa: E402
from ilora.routing.trainer import RoutingConfig, RoutingTrainer  # noqa: E402

SIZES = {
    "tiny": TinyVLMConfig(),
    "15m": TinyVLMConfig(vision_hidden=256, vision_layers=4, vision_heads=4, text_hidden=384, text_layers=8,
                         text_heads=6, text_kv_heads=2, vocab_size=4096),
}


class SavedTensorMeter:
    """Peak bytes of tensors autograd holds for backward (CPU stand-in for peak memory)."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def pack(self, t):
        size = t.numel() * t.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        return (t, size)

    def unpack(self, packed):
        return packed[0]

    def reset_step(self):
        self.live = 0


def make_trainer(model_dir, device, routed: bool, out: Path):
    model, proc = load_vlm(model_dir, device=device)
    eps = {} if routed else {"eps_kl": 0.0, "eps_norm": 0.0}
    args = RoutingConfig(
        output_dir=str(out), lora_r=16, lora_alpha=32, lora_dropout=0.0, per_device_train_batch_size=8,
        report_to="none", disable_tqdm=True, use_cpu=device == "cpu", save_strategy="no", **eps,
    )
    trainer = RoutingTrainer(model, args, train_dataset=None, processing_class=proc)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we bypass
    return trainer, proc


def run_step(trainer, batch):
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def general_base_forward(trainer, batch):
    """The least a routed step must add to a plain one: the no-grad, adapter-disabled forward
    of the general rows alone (timed on its own as the floor of the ratio)."""
    from ilora.routing.collator import select_rows
    from ilora.routing.losses import target_positions

    general = select_rows(batch, ~batch["is_task"], batch["n_images"])
    rows, positions, _ = target_positions(general["labels"])
    switch = trainer._adapter_switch

    def run():
        with torch.inference_mode(), switch.disabled():
            trainer._target_logits(switch.peft_model, general, rows, positions)

    return run


def measure(model_dir, device, n_task, n_general, steps, out):
    rows = make_rows(n_task, 0, n_images=2, answer_len=8) + make_rows(n_general, 1, n_images=2, answer_len=8)
    routes = ["task"] * n_task + ["general"] * n_general
    trainers, batches = {}, {}
    for mode in ("plain", "routed"):
        trainers[mode], proc = make_trainer(model_dir, device, mode == "routed", out / mode)
        tagged = [{**r, "route": route if mode == "routed" else "task"} for r, route in zip(rows, routes)]
        batches[mode] = trainers[mode]._prepare_inputs(RoutingCollator(proc)(tagged))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    base_forward = general_base_forward(trainers["routed"], batches["routed"])
    ops = {"plain": lambda: run_step(trainers["plain"], batches["plain"]),
           "routed": lambda: run_step(trainers["routed"], batches["routed"]), "base": base_forward}
    times = {m: [] for m in ops}
    for i in range(steps + 2):
        for mode, op in ops.items():
            sync()
            start = time.perf_counter()
            op()
            sync()
            if i >= 2:  # warm-up
                times[mode].append(time.perf_counter() - start)
    memory = {}
    for mode in ("plain", "routed"):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            run_step(trainers[mode], batches[mode])
            memory[mode] = torch.cuda.max_memory_allocated()
        else:
            meter = SavedTensorMeter()
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
                run_step(trainers[mode], batches[mode])
            memory[mode] = meter.peak
    params = sum(p.numel() for p in trainers["plain"].model.get_base_model().parameters())
    return {m: statistics.median(t) for m, t in times.items()}, memory, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="tiny,15m", help=f"comma-separated, from {sorted(SIZES)}")
    parser.add_argument("--task", type=int, default=5, help="task rows per batch")
    parser.add_argument("--general", type=int, default=3, help="general rows per batch (paper mix 100k:60k)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default on CPU: 1, as these small models run faster and steadier on one "
             "thread of a shared machine; 0: leave torch's default)",
    )
    parser.add_argument("--models", type=Path, help="folder with prebuilt models named after the sizes (built if missing)")
    args = parser.parse_args()
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    mem_kind = "peak CUDA memory" if args.device == "cuda" else "peak saved-for-backward"
    print(f"device {args.device} ({torch.get_num_threads()} threads), batch {args.task} task + {args.general} "
          f"general rows (2 images each), LoRA r=16 on every linear; median of {args.steps} steps")
    print(f"{'model':>6} {'params':>8} {'plain s/step':>13} {'routed s/step':>14} {'ratio':>6} {'floor':>6} "
          f"{mem_kind + ' plain':>32} {'routed':>9} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes.split(","):
            model_dir = (args.models or Path(tmp)) / name
            if not model_dir.is_dir():
                build_tiny_vlm(model_dir, SIZES[name], seed=0, corpus=tokenizer_corpus())
            times, memory, params = measure(model_dir, args.device, args.task, args.general, args.steps, Path(tmp))
            print(
                f"{name:>6} {params / 1e6:7.2f}M {times['plain']:13.4f} {times['routed']:14.4f} "
                f"{times['routed'] / times['plain']:6.3f} {1 + times['base'] / times['plain']:6.3f} "
                f"{memory['plain'] / 2**20:29.1f}MiB "
                f"{memory['routed'] / 2**20:6.1f}MiB {memory['routed'] / memory['plain']:6.3f}"
            )


if __name__ == "__main__":
    main()
