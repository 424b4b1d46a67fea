"""Agent speed: environment steps per second with 1 vs N environments answered per model call.

Plays the same game with the same agent, once with one environment and once with ``--envs``
environments in lockstep (one batched model call per step), and prints steps/s, the speed-up
(target >= 4x for 8 environments) and where the time went: the model (encoding + forward or
generate), the emulator, and the rest (observation bookkeeping, the loop).

    python benchmarks/bench_agent.py                       # tiny default model, score mode
    python benchmarks/bench_agent.py --mode generate --answer-tokens 32
    python benchmarks/bench_agent.py --model path/to/merged-model --game Breakout
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def measure(agent, game: str, n_envs: int, steps_per_env: int, frame_skip: int = 4) -> dict:
    """Play ``n_envs`` capped episodes of ``steps_per_env`` steps each; time the whole run."""
    from ilora.atari.evaluate import play_episodes

    agent.model_seconds = 0.0
    start = time.perf_counter()
    result = play_episodes(
        agent, game, n_episodes=n_envs, seed=0, n_envs=n_envs, max_frames=steps_per_env * frame_skip, progress=False
    )
    wall = time.perf_counter() - start
    return {
        "envs": n_envs,
        "steps": result.steps,
        "seconds": wall,
        "steps_per_s": result.steps / wall,
        "model_share": agent.model_seconds / wall,
        "emulator_share": result.env_seconds / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: build the tiny default model)")
    parser.add_argument("--game", default="Pong")
    parser.add_argument("--mode", choices=("score", "generate"), default="score")
    parser.add_argument("--answer-tokens", type=int, default=32,
                        help="generate mode: every answer is exactly this long (min = max new tokens), so an "
                             "untrained model is timed like a trained one writing its reasoning")
    parser.add_argument("--object-text", action="store_true", help="object-state text in the prompt")
    parser.add_argument("--envs", type=int, default=8, help="environments of the batched run")
    parser.add_argument("--steps", type=int, default=200,
                        help="agent steps per environment (each run also creates and resets its environments once)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared CPU, spinning threads make timings erratic)")
    args = parser.parse_args()

    import torch

    from ilora.atari.agent import load_agent
    from ilora.models.tiny import build_tiny_vlm

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_tiny_vlm(os.path.join(tmp, "tiny-vlm"), seed=0))
        agent = load_agent(
            model, args.game, device=args.device, mode=args.mode, object_text=args.object_text, max_new_tokens=args.answer_tokens,
            generation_options={"min_new_tokens": args.answer_tokens} if args.mode == "generate" else None,
        )
    measure(agent, args.game, 2, 5)  # warm-up: first-call allocations, emulator ROM load
    runs = [measure(agent, args.game, 1, args.steps), measure(agent, args.game, args.envs, args.steps)]
    answer = f" answer_tokens={args.answer_tokens}" if args.mode == "generate" else ""
    print(
        f"game={args.game} mode={args.mode}{answer} object_text={args.object_text} "
        f"model={args.model or 'tiny default'} torch_threads={torch.get_num_threads()} device={agent.device}"
    )
    print(f"{'envs':>5} {'steps':>6} {'seconds':>8} {'steps/s':>8} {'model':>7} {'emulator':>9} {'other':>6}")
    for r in runs:
        other = 1 - r["model_share"] - r["emulator_share"]
        print(
            f"{r['envs']:>5} {r['steps']:>6} {r['seconds']:>8.2f} {r['steps_per_s']:>8.1f} "
            f"{100 * r['model_share']:>6.1f}% {100 * r['emulator_share']:>8.1f}% {100 * other:>5.1f}%"
        )
    speedup = runs[1]["steps_per_s"] / runs[0]["steps_per_s"]
    verdict = "meets" if speedup >= 4 else "below"
    print(f"speed-up {args.envs} envs vs 1: {speedup:.2f}x ({verdict} the 4x target)")


if __name__ == "__main__":
    main()
