"""Training-step time with and without running the shared prompt prefix once (``share_prompt_prefix``).

Rows like the Atari data: a game's real context (intro, rules, numbered actions) before two
frames, a short per-step prompt and a direct answer after them. Three batch shapes, each
trained on repeatedly by the routing trainer with ``share_prompt_prefix`` off and on:

- ``plain``: one game's task rows only (a plain single-game adapter);
- ``routed``: half of them, plus general rows (short questions about one image) and rows of
  another game as general rows (KL + LoRA-norm), as in the default experiment's routed mix;
- ``joint``: task rows of four games (one prefix group per game).

Off is the SPEC's one forward over all rows padded to the longest; on groups the rows by the
text before their images (each group trimmed to its own length) and runs each task group's
prefix once. Step = ``Trainer.training_step`` + optimiser step, timed alternately (off, on,
off, ...) so machine load hits both alike; the median is reported, and the loss of the first
step of each, which must agree.

    python benchmarks/bench_prompt_prefix.py            # CPU, one thread, the shipped tiny base
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from routing_helpers import make_rows  # noqa: E402

from ilora.atari.prompts import build_context, build_step_prompt  # noqa: E402
from ilora.experiment.pipeline import builtin_base  # noqa: E402
from ilora.models.load import load_vlm  # noqa: E402
from ilora.routing.collator import RoutingCollator  # noqa: E402
from ilora.routing.trainer import RoutingConfig, RoutingTrainer  # noqa: E402

GAMES = ("Pong", "Breakout", "Freeway", "Boxing")


def game_rows(game: str, n: int, seed: int) -> list[dict]:
    """``n`` rows with ``game``'s context, two random frames, a step prompt and an action answer."""
    rng = random.Random(seed)
    step = build_step_prompt(object_text="ball (3, 4) -> (4, 5); your paddle (8, 6) -> (8, 5).", reasoning=False)
    return [
        {**row, "context": build_context(game), "prompt": step, "answer": f"Action: {rng.choice(['NOOP', 'UP', 'DOWN'])}"}
        for row in make_rows(n, seed, n_images=2)
    ]


def batches(batch_size: int) -> dict[str, list[dict]]:
    half = batch_size // 2
    general = make_rows(half - 2, 1, n_images=1, answer_len=1)
    return {
        "plain": [{**r, "route": "task"} for r in game_rows("Pong", batch_size, 0)],
        "routed": [{**r, "route": "task"} for r in game_rows("Pong", half, 0)]
        + [{**r, "route": "general"} for r in general + game_rows("Breakout", 2, 2)],
        "joint": [{**r, "route": "task"} for g, game in enumerate(GAMES) for r in game_rows(game, batch_size // 4, g)],
    }


def make_trainer(model_dir: Path, share: bool, routed: bool, out: Path):
    model, proc = load_vlm(model_dir)
    eps = {"eps_kl": 0.01, "eps_norm": 0.01} if routed else {"eps_kl": 0.0, "eps_norm": 0.0}
    args = RoutingConfig(
        output_dir=str(out), lora_r=16, lora_alpha=32, lora_dropout=0.0, report_to="none", disable_tqdm=True,
        use_cpu=True, save_strategy="no", share_prompt_prefix=share, **eps,
    )
    trainer = RoutingTrainer(model, args, train_dataset=None, processing_class=proc)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we bypass
    return trainer, proc


def step(trainer, batch) -> float:
    loss = trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="rows per batch (the default experiment's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped tiny base)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = args.model or builtin_base()
    print(f"{model_dir.name}: one thread, batch {args.batch}, LoRA r=16 on every linear; median of {args.steps} steps")
    print(f"{'batch':>7} {'tokens':>7} {'off s/step':>11} {'on s/step':>10} {'speed-up':>9} {'first loss off':>15} {'on':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, rows in batches(args.batch).items():
            runs = {}
            for share in (False, True):
                trainer, proc = make_trainer(model_dir, share, kind == "routed", Path(tmp) / f"{kind}-{share}")
                runs[share] = (trainer, trainer._prepare_inputs(RoutingCollator(proc)(rows)), [], [])
            for i in range(args.steps + 2):
                for trainer, batch, times, losses in runs.values():
                    start = time.perf_counter()
                    losses.append(step(trainer, batch))
                    if i >= 2:  # warm-up
                        times.append(time.perf_counter() - start)
            off, on = (statistics.median(runs[s][2]) for s in (False, True))
            tokens = int(runs[False][1]["attention_mask"].sum())
            print(f"{kind:>7} {tokens:7d} {off:11.4f} {on:10.4f} {off / on:9.2f} {runs[False][3][0]:15.6f} {runs[True][3][0]:10.6f}")


if __name__ == "__main__":
    main()
