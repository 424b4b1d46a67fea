"""Atari commands: ``ilora experts`` (score table of the scripted experts), ``ilora collect``, ``ilora games``,
``ilora play``.

Each command is one ``_add_<name>(subparsers)`` function listed in ``COMMANDS``; adding a
command means writing one such function and listing it.
"""

from __future__ import annotations

import argparse


def _experts(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ilora.atari.envs import TwoFrameEnv
    from ilora.atari.experts import EXPERTS, RandomPolicy, load_policy, mean_ci95, run_episode
    from ilora.atari.games import parse_games

    games = parse_games(args.games) if args.games else parse_games(sorted(EXPERTS))
    who = "expert" if args.policy == "expert" else "policy"
    header = f"{'game':<10} {who + ' mean':>12} {'95% CI':>8} {'measured random':>16} {'random ref':>11} {'human ref':>10} {'HNS':>6}"
    policies = [load_policy(args.policy, game, seed=args.seed) for game in games]  # every game checked first
    rows = []
    for game, expert in zip(games, policies):
        env = TwoFrameEnv(game, repeat_action_probability=args.sticky)
        seeds = range(args.seed, args.seed + args.episodes)
        bar = tqdm(seeds, desc=f"{game.name} {who}", unit="episode", leave=False)
        scores = [run_episode(expert, env, s, max_steps=args.max_steps).score for s in bar]
        random_scores = []
        if args.random_episodes:
            policy = RandomPolicy(env.action_names, seed=args.seed)
            random_seeds = range(args.seed, args.seed + args.random_episodes)
            random_scores = [run_episode(policy, env, s, max_steps=args.max_steps).score for s in random_seeds]
        env.close()
        mean, half = mean_ci95(scores)
        measured = f"{mean_ci95(random_scores)[0]:.1f}" if random_scores else "-"
        rows.append(
            f"{game.name:<10} {mean:>12.1f} {half:>8.1f} {measured:>16} {game.random_score:>11.1f} "
            f"{game.human_score:>10.1f} {game.human_normalized(mean):>6.2f}"
        )
    cap = "none (env cap 108,000 frames)" if args.max_steps is None else f"{args.max_steps} agent steps"
    print(f"policy={args.policy} episodes={args.episodes} seeds={args.seed}..{args.seed + args.episodes - 1} "
          f"sticky={args.sticky} cap={cap}; HNS = human-normalised {who} mean")
    print(header)
    print("\n".join(rows))
    return 0


def _add_experts(sub) -> None:
    p = sub.add_parser("experts", help="score the scripted RAM experts (or --policy): mean, 95%% CI, random and human references.")
    p.add_argument("--games", default=None, help="Comma-separated games (default: all with a scripted expert).")
    p.add_argument("--policy", default="expert",
                   help="Who plays: expert (default), random, or module:Name / file.py:Name (see ilora collect --help).")
    p.add_argument("--episodes", type=int, default=10, help="Episodes per game (default 10).")
    p.add_argument("--seed", type=int, default=0, help="First episode seed (default 0).")
    p.add_argument("--max-steps", type=int, default=None, help="Agent-step cap per episode (default: none).")
    p.add_argument("--random-episodes", type=int, default=0, help="Also measure a random policy over this many episodes.")
    p.add_argument("--sticky", type=float, default=0.25, help="repeat_action_probability (default 0.25, ALE v5).")
    p.set_defaults(func=_experts)


def _collect(args: argparse.Namespace) -> int:
    import json

    from ilora.atari.collect import CollectConfig, collect_to_disk

    config = CollectConfig(
        game=args.game,
        episodes=args.episodes,
        seed=args.seed,
        policy=args.policy,
        object_text=args.object_text,
        reasoning=args.reasoning,
        max_steps=args.max_steps,
        drop_first=args.drop_first,
        drop_before_failure=args.drop_before_failure,
        rare_repeat=args.rare_repeat,
        repeat_action_probability=args.sticky,
    )
    summary = collect_to_disk(config, args.out, overwrite=args.overwrite)
    print(json.dumps({k: summary[k] for k in ("game", "episodes", "mean_score", "rows", "removed_steps", "row_actions")}))
    print(f"dataset: {args.out}/dataset (datasets.load_from_disk; its prompt: {args.out}/dataset/prompt_settings.json)")
    return 0


def _add_collect(sub) -> None:
    from ilora.atari.collect import CollectConfig

    d = CollectConfig()
    p = sub.add_parser("collect", help="play the scripted expert (or --policy) and write a two-frame prompt/answer dataset.")
    p.add_argument("--game", required=True, help="Game name, e.g. Pong (see ilora games).")
    p.add_argument("--policy", default=d.policy,
                   help="Who plays: expert (the game's scripted expert, default), random, or module:Name / file.py:Name, "
                        "any callable policy(observation) -> action (a class is built with the Game if it takes one).")
    p.add_argument("--episodes", type=int, required=True, help="Number of episodes.")
    p.add_argument("--out", required=True, help="Output folder (resumable: finished episodes are kept).")
    p.add_argument("--overwrite", action="store_true",
                   help="Allow fewer --episodes than --out holds: its dataset is rewritten with only those.")
    p.add_argument("--seed", type=int, default=d.seed, help="Episode i uses seed + i (default %(default)s).")
    p.add_argument("--object-text", action=argparse.BooleanOptionalAction, default=d.object_text,
                   help="Object-state text from the RAM in the prompt (default on).")
    p.add_argument("--reasoning", action=argparse.BooleanOptionalAction, default=d.reasoning,
                   help="Reasoning answers before 'Action: NAME' (default off: direct answers, which play "
                        "ranks in one forward pass; the scripted experts give reasoning, other policies may not).")
    p.add_argument("--direct", dest="reasoning", action="store_false", help="Same as --no-reasoning.")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="Agent-step cap per episode.")
    p.add_argument("--drop-first", type=int, default=d.drop_first, help="Opening steps removed (default %(default)s).")
    p.add_argument("--drop-before-failure", type=int, default=d.drop_before_failure,
                   help="Steps removed before each lost life/point (default %(default)s).")
    p.add_argument("--rare-repeat", type=int, default=d.rare_repeat,
                   help="Write rows of rare actions (e.g. Breakout FIRE) this many times (default %(default)s).")
    p.add_argument("--sticky", type=float, default=d.repeat_action_probability,
                   help="repeat_action_probability (default %(default)s).")
    p.set_defaults(func=_collect)


def _play(args: argparse.Namespace) -> int:
    import sys

    from ilora.atari.agent import load_agent
    from ilora.atari.evaluate import format_summary, play_episodes, play_prompt, recorded_prompt, save_result, summarize
    from ilora.atari.experts import load_policy
    from ilora.atari.games import get_game
    from ilora.atari.video import EpisodeRecorder, check_video_path, save_video
    from ilora.errors import IloraError
    from ilora.fileio import check_output_file

    if (args.model is None) == (args.policy is None):
        raise IloraError("give --model (a VLM, optionally with --adapter) or --policy (any policy), not both")
    if args.video:
        check_video_path(args.video)
    if args.json:
        check_output_file(args.json, "--json")
    if args.policy is not None:
        if args.game is None:
            raise IloraError("--game: name the game the policy plays")
        game = get_game(args.game)
        agent = load_policy(args.policy, game, seed=args.seed)
    else:
        prompt = play_prompt(
            *recorded_prompt(args.model, args.adapter), game=args.game, object_text=args.object_text,
            reasoning=args.reasoning, mode=args.mode,
        )
        for note in prompt.warnings:
            print(f"ilora play: warning: {note}", file=sys.stderr)
        agent = load_agent(
            args.model, prompt.game, adapter=args.adapter, dtype=args.dtype, device=args.device, mode=prompt.mode,
            reasoning=prompt.reasoning, object_text=prompt.object_text, max_new_tokens=args.max_new_tokens,
        )
        game = agent.game
    recorder = EpisodeRecorder(episode=0, max_steps=args.video_steps) if args.video else None
    result = play_episodes(
        agent, game, args.episodes, args.seed, n_envs=args.envs, max_frames=args.max_frames,
        fire_on_reset=args.fire_on_reset, blank_frames=args.blank_frames, on_step=recorder,
    )
    if args.policy is not None:
        result.settings["policy"] = args.policy
    for error in result.errors:
        print(f"emulator error (finished episodes kept): {error}")
    if not result.records:
        raise IloraError(f"{game.name}: no episode finished ({len(result.errors)} emulator error(s))")
    summary = summarize(result.records, game)
    print(format_summary(summary, result.settings))
    if recorder is not None and recorder.steps:
        print(f"video: {save_video(recorder.steps, args.video, game.name)} (episode 0, {len(recorder.steps)} steps)")
    elif recorder is not None:
        print("video: not written, episode 0 did not run (see the errors above)")
    if args.json:
        print(f"results: {save_result(args.json, result, summary)}")
    return 0


def _add_play(sub) -> None:
    from ilora.atari.games import DEFAULT_MAX_EPISODE_FRAMES

    p = sub.add_parser(
        "play", help="a VLM (or merged model / adapter, or any --policy) plays a game; prints score, CI, HNS.",
        description="The prompt (game, object text, reasoning) defaults to the one the adapter or merged model was "
        "trained with (its prompt_settings.json); a flag against it is played as asked, with a warning.",
    )
    p.add_argument("--model", default=None, help="Model folder, 'builtin' (the shipped tiny base) or a cached hub id.")
    p.add_argument("--adapter", default=None, help="A PEFT adapter folder, merged into the model in memory.")
    p.add_argument("--policy", default=None,
                   help="Play a policy instead of a model: random, expert or module:Name (see ilora collect --help); "
                        "a policy that keeps state between steps needs --envs 1.")
    p.add_argument("--game", default=None, help="Game name, e.g. Pong (default: the game the adapter was trained on).")
    p.add_argument("--episodes", type=int, default=10, help="Episodes to play (default %(default)s).")
    p.add_argument("--envs", type=int, default=8, help="Environments answered in one batched model call (default %(default)s).")
    p.add_argument("--mode", choices=("score", "generate"), default=None,
                   help="score: rank the action names in one forward pass (direct answers); generate: greedy "
                        "decoding, parsed (default: generate for reasoning answers, else score).")
    p.add_argument("--reasoning", action=argparse.BooleanOptionalAction, default=None,
                   help="Ask for reasoning before the action (default: as trained; without a record, on in generate "
                        "mode and off in score mode).")
    p.add_argument("--object-text", action=argparse.BooleanOptionalAction, default=None,
                   help="Put the RAM object-state text in the prompt (default: as trained; without a record, off).")
    p.add_argument("--max-new-tokens", type=int, default=96, help="Generation budget per step (default %(default)s).")
    p.add_argument("--max-frames", type=int, default=DEFAULT_MAX_EPISODE_FRAMES,
                   help="Episode cap in emulator frames (default %(default)s = 30 minutes).")
    p.add_argument("--fire-on-reset", action="store_true",
                   help="Press FIRE automatically after a reset and each lost life (reported with the score).")
    p.add_argument("--blank-frames", action="store_true", help="Black out both frames (does the model read the images?).")
    p.add_argument("--seed", type=int, default=0, help="Episode i uses seed + i (default %(default)s).")
    p.add_argument("--video", default=None, help="Save episode 0 as .gif or .mp4 with the model's answer beside the frame.")
    p.add_argument("--video-steps", type=int, default=1000, help="Steps of episode 0 put in the video (default %(default)s).")
    p.add_argument("--json", default=None, help="Also write the summary, settings and per-episode records here.")
    p.add_argument("--dtype", default="float32", help="Model dtype: float32, bfloat16, float16, auto.")
    p.add_argument("--device", default="cpu", help="Torch device (default %(default)s).")
    p.set_defaults(func=_play)


def _games(args: argparse.Namespace) -> int:
    from ilora.atari.experts import EXPERTS
    from ilora.atari.games import GAMES
    from ilora.atari.ram import READERS

    actions_of = {name: game.action_names for name, game in sorted(GAMES.items())}  # the emulator's banner first
    print(f"{'game':<15} {'random ref':>10} {'human ref':>10} {'expert':>6} {'reader':>6}  actions")
    for name, actions in actions_of.items():
        game = GAMES[name]
        print(f"{name:<15} {game.random_score:>10g} {game.human_score:>10g} {'yes' if name in EXPERTS else 'no':>6} "
              f"{'yes' if name in READERS else 'no':>6}  {len(actions)}: {' '.join(actions)}")
    print("expert: a scripted expert plays it (ilora collect's default policy); reader: object-state text from the "
          "console RAM (--object-text); any game can be collected with --policy random or module:Name, and "
          "--no-object-text where it has no reader")
    return 0


def _add_games(sub) -> None:
    p = sub.add_parser("games", help="the game catalog: reference scores, scripted expert, RAM reader, actions.")
    p.set_defaults(func=_games)


COMMANDS = (_add_collect, _add_experts, _add_games, _add_play)


def register(subparsers) -> None:
    """Add the Atari commands to the ``ilora`` parser."""
    for add in COMMANDS:
        add(subparsers)
