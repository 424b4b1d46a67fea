"""``ilora rl-compare``: does an adapter trained by on-policy RL forget less than a cloned one? (issue 19)

For each compared game, three adapters of one experiment replicate (a ``run_dir`` of ``ilora
experiment``, or one of its ``seed-<s>`` folders) are measured side by side:

- ``clone``: the replicate's own cloned adapter of the game (``train/plain/<game>``, or
  ``train/routed/<game>`` with ``cloned: routed``), reused as it is;
- ``rl-base``: GRPO (``ilora.rl.train.train_rl``) from the base, a new LoRA;
- ``rl-clone``: GRPO continuing the cloned adapter;

each RL run playing as many emulator frames as the expert data the clone was trained on
(training rows x frame skip). Every adapter is played on its own game and on the other games,
scored on the general benchmark (``ilora.experiment.evaluation.evaluate_model``), merged with
the other games' routed adapters (``ilora.merge.merge_adapters``, ``merge.methods``), the
merged model played on the adapter's game, and the merge's interference in activations
measured (``ilora.merge.interference.adapter_interference``, from Grams each adapter gets on its
game's rows). Every unit is a cached stage (``ilora.experiment.stages.StageRunner``) under
``run_dir/<replicate>/``; the report (``run_dir/report``: ``REPORT.md``, ``summary.json``,
``rl_compare.png``) gives means with 95% bootstrap intervals over episodes, and over replicates
when several sources are given (``ilora.experiment.stats``).

    ilora rl-compare configs/rl_compare.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ilora.config import field
from ilora.errors import IloraError
from ilora.merge.ilora import ILoRAMerge
from ilora.rl.config import GRPOSettings

KINDS = ("clone", "rl-base", "rl-clone")  # the compared adapters of each game
PARTNER = "routed"  # the other games' adapters every compared adapter is merged with
CLONED = ("plain", "routed")
LABELS = {"base": "base", "clone": "cloned", "rl-base": "RL from base", "rl-clone": "RL from the clone"}
SET_BY_COMPARISON = ("frames", "seed")  # GRPOSettings the comparison sets per game and replicate


@dataclasses.dataclass
class CompareEval:
    """Play and scoring of the comparison (the experiment's play settings by default)."""

    own_episodes: int = field(8, help="episodes of each adapter on its own game, of the random and expert "
                              "references, of the base on the compared games, and of each merged model")
    other_episodes: int = field(4, help="episodes of each adapter (and of the base) on each other game (forgetting)")
    n_envs: int = field(8, help="environments played side by side")
    max_frames: int = field(2000, help="episode cap in emulator frames (the default experiment's)")
    fire_on_reset: bool = field(True, help="FireReset, as the experiment plays")
    general_rows: int = field(200, help="general benchmark rows (the first of the source's data/general/test)")
    margin_rows: int = field(100, help="held-out expert rows per game for answer margins and offline agreement")
    grams_rows: int = field(128, help="rows of its game on which each adapter's input Grams are measured "
                            "(interference in activations)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool) and value < 1:
                raise IloraError(f"eval.{f.name} = {value}: must be >= 1")


@dataclasses.dataclass
class CompareMerge:
    """How each compared adapter is merged with the other games' routed adapters."""

    methods: list[str] = field(default_factory=lambda: ["sum", "ilora"], help="registry merge methods (no "
                               "data-aware ones: the Grams here are on task rows only)")
    keep: float = field(ILoRAMerge.keep, help="I-LoRA keep ratio")


@dataclasses.dataclass
class RLCompareConfig:
    """``ilora rl-compare``'s settings (YAML keys; ``--set key=value``)."""

    run_dir: str = field("runs/rl-compare", help="where every stage and the report are written; rerunning resumes")
    sources: list[str] = field(
        default_factory=lambda: ["runs/seeds-full/seed-1"],
        help="experiment replicate folders (with base/model, data/<game>, train/plain|routed/<game>/adapter) whose "
        "data and adapters are reused, read only; several: a replicate each, intervals over replicates x episodes",
    )
    games: list[str] = field(default_factory=lambda: ["Boxing", "Breakout"], help="games RL is compared on")
    all_games: list[str] = field(
        default_factory=lambda: ["Pong", "Breakout", "Freeway", "Boxing"],
        help="the source's games: forgetting is played on them, and their routed adapters are the merge partners",
    )
    cloned: str = field("plain", help="the cloned adapter compared and continued: plain (behaviour cloning) or routed")
    frames: int | None = field(None, help="RL budget in emulator frames per run; null: the frames of the expert data "
                               "the clone learned from (training rows x frame skip)")
    seed: int = field(0, help="a replicate's seed (its RL runs', and its play episodes' 20,000 + it) is seed + n for a "
                      "source folder named seed-<n> (an experiment replicate), else seed + a number drawn from the "
                      "folder's name: distinct per replicate, and adding a source redoes none of the others' stages")
    rl: GRPOSettings = field(default_factory=GRPOSettings, help="GRPO settings of both RL runs (frames and seed "
                             "are set by the comparison)")
    per_game: dict[str, dict[str, Any]] = field(default_factory=dict, help="GRPO settings that differ for one game's "
                                                "RL runs, e.g. {Breakout: {horizon: 32}} (used when it is compared)")
    from_clone: dict[str, Any] = field(default_factory=dict, help="GRPO settings that differ for RL from the clone, "
                                       "e.g. {learning_rate: 0.0002}")
    merge: CompareMerge = field(default_factory=CompareMerge, help="merging with the other games' routed adapters")
    eval: CompareEval = field(default_factory=CompareEval, help="play and scoring")
    notes: list[str] = field(default_factory=list, help="lines printed in the report's notes (how the settings "
                             "were chosen)")
    workers: int = field(2, help="processes running independent stages side by side")
    threads: int = field(1, help="torch CPU threads per process (0: torch's default)")
    device: str = field("cpu", help="device for RL, play and scoring: cpu, cuda, auto")

    def __post_init__(self) -> None:
        from ilora.atari.experts import get_expert
        from ilora.atari.games import get_game
        from ilora.atari.ram import has_object_text

        if not self.sources:
            raise IloraError("sources: give at least one experiment replicate folder")
        names = [Path(s).name for s in self.sources]
        if len(set(names)) != len(names):
            raise IloraError(f"sources = {self.sources}: their folder names must differ (each names a replicate)")
        for key in ("games", "all_games"):
            values = getattr(self, key)
            if not values or len(set(values)) != len(values):
                raise IloraError(f"{key} = {values}: need at least one game, each once")
            setattr(self, key, [get_game(g).name for g in values])  # unknown names: one line listing the known
        for game in self.all_games:
            get_expert(game)  # the references (and the source's data) need one
            if self.rl.object_text and not has_object_text(game):
                raise IloraError(f"all_games: {game} has no RAM reader for rl.object_text")
        missing = [g for g in self.games if g not in self.all_games]
        if missing:
            raise IloraError(f"games: {missing} not in all_games {self.all_games}")
        if len(self.all_games) < 2:
            raise IloraError(f"all_games = {self.all_games}: merging needs at least one other game")
        if self.cloned not in CLONED:
            raise IloraError(f"cloned = {self.cloned!r}: expected one of {', '.join(CLONED)}")
        if self.frames is not None and self.frames < 1:
            raise IloraError(f"frames = {self.frames}: must be >= 1 (or null: the expert data's frames)")
        default = GRPOSettings()
        for name in SET_BY_COMPARISON:
            if getattr(self.rl, name) != getattr(default, name):
                raise IloraError(f"rl.{name}: set by the comparison (frames: top-level frames; seed: top-level seed)")
        allowed = {f.name for f in dataclasses.fields(GRPOSettings)} - set(SET_BY_COMPARISON)
        overrides = {"from_clone": self.from_clone, **{f"per_game.{g}": o for g, o in self.per_game.items()}}
        for key, settings in overrides.items():
            bad = sorted(set(settings) - allowed)
            if bad:
                raise IloraError(f"{key}: {bad} are not GRPO settings it may change (frames and seed are the comparison's)")
        unknown = sorted(set(self.per_game) - set(self.all_games))  # a game not compared (games narrowed) is fine
        if unknown:
            raise IloraError(f"per_game: {unknown} are not among all_games {self.all_games}")
        for game in [*self.games, *self.per_game]:
            for kind in ("rl-base", "rl-clone"):
                self.rl_settings(kind, game)  # the overrides must make valid settings
        if self.workers < 1 or self.threads < 0:
            raise IloraError(f"workers = {self.workers}, threads = {self.threads}: need workers >= 1, threads >= 0")
        from ilora.merge.registry import method_class

        if not self.merge.methods or len(set(self.merge.methods)) != len(self.merge.methods):
            raise IloraError(f"merge.methods = {self.merge.methods}: need at least one method, each once")
        for method in self.merge.methods:
            if method_class(method).needs_grams:
                raise IloraError(f"merge.methods: {method} needs general Grams, which the comparison does not measure")
        if not 0 < self.merge.keep <= 1:
            raise IloraError(f"merge.keep = {self.merge.keep}: must be in (0, 1]")

    def rl_settings(self, kind: str, game: str, frames: int = 1, seed: int = 0) -> GRPOSettings:
        """The GRPO settings of an RL run on ``game`` (``kind``: ``rl-base`` or ``rl-clone``): ``rl``, then
        the game's ``per_game``, then ``from_clone`` for RL from the clone."""
        from ilora.config import from_dict, to_dict

        data = {**to_dict(self.rl), **self.per_game.get(game, {}), **(self.from_clone if kind == "rl-clone" else {}),
                "frames": frames, "seed": seed}
        where = "rl"  # the key an invalid value is reported under: the last layer that set values
        if game in self.per_game:
            where = f"per_game.{game}"
        if kind == "rl-clone" and self.from_clone:
            where = "from_clone"
        return from_dict(GRPOSettings, data, where)


@dataclasses.dataclass(frozen=True)
class Replicate:
    """One source replicate: its name (the stage prefix), folder and seed."""

    name: str
    source: Path
    seed: int

    def path(self, stage: str) -> Path:
        return self.source / stage


def replicate_seed(name: str) -> int:
    """``n`` for an experiment replicate's folder ``seed-<n>``; else a number from the name's hash (below 10,000)."""
    match = re.fullmatch(r"seed-(\d+)", name)
    if match:
        return int(match.group(1))
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % 10_000


def replicates(cfg: RLCompareConfig) -> list[Replicate]:
    return [Replicate(Path(s).name, Path(s), cfg.seed + replicate_seed(Path(s).name)) for s in cfg.sources]


def source_stages(cfg: RLCompareConfig) -> list[str]:
    """The source's finished stages the comparison reads (their fingerprints key its caches)."""
    return (["base", "data/general"] + [f"data/{g}" for g in cfg.all_games]
            + [f"train/{cfg.cloned}/{g}" for g in cfg.games] + [f"train/{PARTNER}/{g}" for g in cfg.all_games])


def check_sources(cfg: RLCompareConfig) -> None:
    """Refuse, in one line, a source that lacks a finished stage or a folder the comparison reads."""
    for rep in replicates(cfg):
        if not rep.source.is_dir():
            raise IloraError(f"sources: {rep.source} is not a folder")
        for stage in source_stages(cfg):
            if not (rep.path(stage) / "stage.json").is_file():
                raise IloraError(f"sources: {rep.path(stage)} is not a finished stage (no stage.json); run the "
                                 "experiment that writes it first")
        needed = [rep.path("base/model"), rep.path("data/general/test")]
        needed += [rep.path(f"data/{g}/{split}") for g in cfg.all_games for split in ("train", "heldout")]
        needed += [rep.path(f"train/{cfg.cloned}/{g}/adapter") for g in cfg.games]
        needed += [rep.path(f"train/{PARTNER}/{g}/adapter") for g in cfg.all_games]
        for path in needed:
            if not path.is_dir():
                raise IloraError(f"sources: {path} is missing")


def link_files(source: Path, target: Path, link: Callable[[Path, Path], None]) -> None:
    """The files of adapter folder ``source`` (not its Grams) into a new folder ``target``, by ``link``."""
    target.mkdir()
    for item in source.iterdir():
        if item.is_file() and item.name != "grams.safetensors":
            link(item, target / item.name)


def source_fingerprint(rep: Replicate, stage: str) -> str:
    return json.loads((rep.path(stage) / "stage.json").read_text())["fingerprint"]


class RLCompare:
    """The comparison's stages in ``cfg.run_dir`` (a stage of replicate ``r`` is named ``r/<stage>``)."""

    def __init__(self, cfg: RLCompareConfig, force: tuple[str, ...] = (), log: Callable[[str], None] | None = None):
        from ilora.experiment.stages import StageRunner

        self.cfg = cfg
        from ilora.experiment.pipeline import print_now

        self.log = log or print_now
        self.runner = StageRunner(Path(cfg.run_dir), force=force, log=self.log)
        self.reps = {rep.name: rep for rep in replicates(cfg)}

    # ----------------------------------------------------------------- helpers
    def rows(self, rep: Replicate, stage: str, split: str, n: int | None = None):
        from datasets import load_from_disk

        rows = load_from_disk(str(rep.path(stage) / split))
        return rows if n is None else rows.select(range(min(n, len(rows))))

    def base_path(self, rep: Replicate) -> str:
        return str(rep.path("base/model"))

    def adapter_dir(self, rep: Replicate, kind: str, game: str) -> Path:
        return self.runner.folder(f"{rep.name}/adapter/{kind}/{game}") / "adapter"

    def grams_dir(self, rep: Replicate, kind: str, game: str) -> Path:
        return self.runner.folder(f"{rep.name}/grams/{kind}/{game}") / "adapter"

    def merged_dir(self, rep: Replicate, kind: str, game: str, method: str) -> Path:
        return self.runner.folder(f"{rep.name}/merge/{kind}/{game}/{method}") / "state"

    def expert_frames(self, rep: Replicate, game: str) -> int:
        """The frames of the expert data the clone learned from: its training rows x frame skip."""
        from ilora.atari.games import DEFAULT_FRAME_SKIP

        if self.cfg.frames is not None:
            return self.cfg.frames
        return len(self.rows(rep, f"data/{game}", "train")) * DEFAULT_FRAME_SKIP

    def eval_settings(self):
        from ilora.experiment.config import EvalSettings

        e = self.cfg.eval
        return EvalSettings(episodes=e.other_episodes, own_game_episodes=e.own_episodes, n_envs=e.n_envs,
                            max_frames=e.max_frames, fire_on_reset=e.fire_on_reset, blank_check=False,
                            cross_games=True, agreement_rows=e.margin_rows)

    def play_settings(self) -> dict[str, Any]:
        """The eval settings every played score depends on."""
        return {k: getattr(self.cfg.eval, k) for k in ("own_episodes", "n_envs", "max_frames", "fire_on_reset")}

    def play_config(self, rep: Replicate):
        """The experiment config ``evaluate_model`` reads: the play seed, dtype, device and prompt."""
        from ilora.experiment.config import (
            DataSettings,
            ExperimentConfig,
            TrainSettings,
        )

        return ExperimentConfig(seed=rep.seed, device=self.cfg.device, data=DataSettings(object_text=self.cfg.rl.object_text),
                                train=TrainSettings(dtype=self.cfg.rl.dtype))

    def sources_of(self, rep: Replicate, *stages: str) -> dict[str, str]:
        return {stage: source_fingerprint(rep, stage) for stage in stages}

    # ------------------------------------------------------------------ stages
    def adapter(self, rep_name: str, kind: str, game: str) -> None:
        """Stage ``<rep>/adapter/<kind>/<game>``: the source's adapter (linked, not copied) or one
        trained by RL (``ilora.rl.train.train_rl``) with the expert data's frames."""
        from ilora.experiment.pipeline import link_or_copy

        rep, cfg = self.reps[rep_name], self.cfg
        source = {PARTNER: f"train/{PARTNER}/{game}", "clone": f"train/{cfg.cloned}/{game}"}.get(kind)
        settings: dict[str, Any] = {"game": game, "source": self.sources_of(rep, "base", f"data/{game}")}
        deps = []
        if source is not None:
            settings["source"][source] = source_fingerprint(rep, source)
        else:
            rl = cfg.rl_settings(kind, game, self.expert_frames(rep, game), rep.seed)
            settings["rl"] = dataclasses.asdict(rl)
            if kind == "rl-clone":
                deps.append(f"{rep.name}/adapter/clone/{game}")

        def run(folder: Path):
            out = folder / "adapter"
            if source is not None:
                link_files(rep.path(f"{source}/adapter"), out, link_or_copy)
                return {"source": str(rep.path(f"{source}/adapter"))}
            from ilora.rl.train import train_rl

            init = self.adapter_dir(rep, "clone", game) if kind == "rl-clone" else None
            t0 = time.time()
            train_rl(game, self.base_path(rep), rl, out, init_adapter=init, progress=False)
            shutil.rmtree(folder / "adapter.run", ignore_errors=True)  # the finished run's last checkpoint
            return {"rl_seconds": round(time.time() - t0, 1), "frames": rl.frames}

        self.runner.run(f"{rep.name}/adapter/{kind}/{game}", settings, run, deps)

    def grams(self, rep_name: str, kind: str, game: str) -> None:
        """Stage ``<rep>/grams/<kind>/<game>``: the adapter (linked) with its input Grams on
        ``eval.grams_rows`` of its game's training rows, measured in its own model."""
        from ilora.experiment.evaluation import resolve_device
        from ilora.experiment.pipeline import link_or_copy
        from ilora.routing.grams import compute_adapter_grams

        rep, n = self.reps[rep_name], self.cfg.eval.grams_rows

        def run(folder: Path):
            link_files(self.adapter_dir(rep, kind, game), folder / "adapter", link_or_copy)
            compute_adapter_grams(self.base_path(rep), folder / "adapter", self.rows(rep, f"data/{game}", "train", n),
                                  device=resolve_device(self.cfg.device))
            return {"task_rows": n}

        self.runner.run(f"{rep.name}/grams/{kind}/{game}", {"rows": n}, run, [f"{rep.name}/adapter/{kind}/{game}"])

    def reference(self, rep_name: str, game: str) -> None:
        """Stage ``<rep>/eval/reference/<game>``: random and scripted-expert play."""
        from ilora.experiment.evaluation import evaluate_reference

        rep, e = self.reps[rep_name], self.eval_settings()
        settings = {"eval": self.play_settings(), "seed": rep.seed, "game": game}
        self.runner.run(f"{rep.name}/eval/reference/{game}", settings,
                        lambda folder: evaluate_reference(game, e, rep.seed, folder))

    def evaluate(self, rep_name: str, model: str) -> None:
        """Stage ``<rep>/eval/<model>``: ``base`` on every game (``own_episodes`` on the compared ones),
        ``<kind>/<game>`` on every game (``own_episodes`` on its own), ``merge/<kind>/<game>/<method>``
        on its game; each with the general benchmark and the answer margins."""
        from ilora.experiment.evaluation import evaluate_model
        from ilora.experiment.pipeline import ModelSpec

        rep, cfg = self.reps[rep_name], self.cfg
        e = self.eval_settings()
        parts = model.split("/")
        deps: list[str] = []
        if model == "base":
            spec, own, games = ModelSpec(), None, list(cfg.all_games)
        elif parts[0] == "merge":
            _, kind, own, method = parts
            spec, games = ModelSpec(merged=self.merged_dir(rep, kind, own, method)), [own]
            deps.append(f"{rep.name}/merge/{kind}/{own}/{method}")
        else:
            kind, own = parts
            spec, games = ModelSpec(adapter=self.adapter_dir(rep, kind, own)), list(cfg.all_games)
            deps.append(f"{rep.name}/adapter/{kind}/{own}")
        scoring = {k: getattr(cfg.eval, k) for k in ("other_episodes", "general_rows", "margin_rows")}
        settings = {"eval": {**self.play_settings(), **scoring}, "games": games, "seed": rep.seed, "device": cfg.device,
                    "prompt": {"object_text": cfg.rl.object_text, "dtype": cfg.rl.dtype},
                    "source": self.sources_of(rep, "base", "data/general", *[f"data/{g}" for g in games])}

        def run(folder: Path):
            heldout = {g: self.rows(rep, f"data/{g}", "heldout") for g in games}
            general = self.rows(rep, "data/general", "test", cfg.eval.general_rows)
            play_cfg = self.play_config(rep)
            if model == "base":  # every game as often as an adapter plays its own: the reference of every change
                e_base = dataclasses.replace(e, episodes=cfg.eval.own_episodes)
                return evaluate_model(self.base_path(rep), spec, games, e_base, play_cfg, folder, heldout, general)
            return evaluate_model(self.base_path(rep), spec, games, e, play_cfg, folder, heldout, general, own_game=own)

        self.runner.run(f"{rep.name}/eval/{model}", settings, run, deps)

    def merge_order(self, kind: str, game: str) -> list[tuple[str, str]]:
        """``(kind, game)`` of the merge's inputs in the order of ``all_games``, the compared adapter in its game's place."""
        return [(kind if g == game else PARTNER, g) for g in self.cfg.all_games]

    def merge(self, rep_name: str, kind: str, game: str, method: str) -> None:
        """Stage ``<rep>/merge/<kind>/<game>/<method>``: the adapter merged with the other games' routed adapters."""
        from ilora.merge import merge_adapters

        rep, cfg = self.reps[rep_name], self.cfg
        inputs = self.merge_order(kind, game)
        options = {"keep": cfg.merge.keep} if method == "ilora" else {}

        def run(folder: Path):
            from ilora.merge.io import LoraAdapter

            adapters = [LoraAdapter(self.adapter_dir(rep, k, g)) for k, g in inputs]
            for adapter in adapters:
                # Every input was trained on this replicate's base; a source adapter records the path its
                # base had then (the replicate's folder may have been renamed since), an RL one today's.
                adapter.base_model = self.base_path(rep)
            state = merge_adapters(adapters, method, base=self.base_path(rep), out=folder / "state", progress=False,
                                   **options)
            return {"modules": len(state.deltas)}

        deps = [f"{rep.name}/adapter/{k}/{g}" for k, g in inputs]
        self.runner.run(f"{rep.name}/merge/{kind}/{game}/{method}", {"method": method, "options": options}, run, deps)

    def interference(self, rep_name: str, kind: str, game: str) -> None:
        """Stage ``<rep>/interference/<kind>/<game>``: from the Grams, the other routed adapters' output on
        this adapter's rows relative to its own, its output on theirs relative to theirs, and how far
        each merge moves its output on its rows (``adapter_interference``)."""
        from ilora.merge.interference import adapter_interference

        rep, cfg = self.reps[rep_name], self.cfg
        others = [g for g in cfg.all_games if g != game]
        adapters = [self.grams_dir(rep, kind, game)] + [self.grams_dir(rep, PARTNER, g) for g in others]
        states = [self.merged_dir(rep, kind, game, m) for m in cfg.merge.methods]

        def run(folder: Path):
            stats = adapter_interference(adapters, states)
            (folder / "interference.json").write_text(json.dumps(stats, indent=1))
            return {
                "others": others,
                "others_on_own_rows": stats["ratio"][0][1:],  # ||dW_j X_own|| / ||dW_own X_own||
                "own_on_others_rows": [row[0] for row in stats["ratio"][1:]],  # ||dW_own X_j|| / ||dW_j X_j||
                "own_energy": stats["own"][0],
                "merged_change": {m: stats["merged"][str(s)][0] for m, s in zip(cfg.merge.methods, states)},
            }

        deps = [f"{rep.name}/grams/{kind}/{game}"] + [f"{rep.name}/grams/{PARTNER}/{g}" for g in others]
        deps += [f"{rep.name}/merge/{kind}/{game}/{m}" for m in cfg.merge.methods]
        self.runner.run(f"{rep.name}/interference/{kind}/{game}", {"methods": cfg.merge.methods}, run, deps)

    # ------------------------------------------------------------- scheduling
    def jobs(self) -> list:
        """Every stage as a job of ``ilora.experiment.schedule`` (costs: rough single-core seconds)."""
        from ilora.experiment.schedule import AGENT_STEP_SECONDS, Job

        cfg, e = self.cfg, self.cfg.eval
        episode = e.max_frames / 4 * AGENT_STEP_SECONDS
        jobs = []
        for k, rep in enumerate(self.reps.values()):
            r = rep.name
            for g in cfg.all_games:
                jobs.append(Job(f"{r}/adapter/{PARTNER}/{g}", "adapter", (r, PARTNER, g), cost=1, local=True, group=k))
                jobs.append(Job(f"{r}/grams/{PARTNER}/{g}", "grams", (r, PARTNER, g), (f"{r}/adapter/{PARTNER}/{g}",),
                                cost=10, group=k))
            jobs += [Job(f"{r}/eval/reference/{g}", "reference", (r, g), cost=20, group=k) for g in cfg.games]
            jobs.append(Job(f"{r}/eval/base", "evaluate", (r, "base"),
                            cost=episode * e.own_episodes * len(cfg.all_games), group=k))
            for g in cfg.games:
                jobs.append(Job(f"{r}/adapter/clone/{g}", "adapter", (r, "clone", g), cost=1, local=True, group=k))
                for kind in ("rl-base", "rl-clone"):
                    deps = (f"{r}/adapter/clone/{g}",) if kind == "rl-clone" else ()
                    jobs.append(Job(f"{r}/adapter/{kind}/{g}", "adapter", (r, kind, g), deps, cost=120, group=k))
                for kind in KINDS:
                    own = f"{r}/adapter/{kind}/{g}"
                    jobs.append(Job(f"{r}/grams/{kind}/{g}", "grams", (r, kind, g), (own,), cost=10, group=k))
                    cost = episode * (e.own_episodes + e.other_episodes * (len(cfg.all_games) - 1))
                    jobs.append(Job(f"{r}/eval/{kind}/{g}", "evaluate", (r, f"{kind}/{g}"), (own,), cost=cost, group=k))
                    inputs = tuple(f"{r}/adapter/{kk}/{gg}" for kk, gg in self.merge_order(kind, g))
                    for m in cfg.merge.methods:
                        name = f"merge/{kind}/{g}/{m}"
                        jobs.append(Job(f"{r}/{name}", "merge", (r, kind, g, m), inputs, local=True, group=k))
                        jobs.append(Job(f"{r}/eval/{name}", "evaluate", (r, name), (f"{r}/{name}",),
                                        cost=episode * e.own_episodes, group=k))
                    merges = tuple(f"{r}/merge/{kind}/{g}/{m}" for m in cfg.merge.methods)
                    grams = tuple(f"{r}/grams/{kk}/{gg}" for kk, gg in self.merge_order(kind, g))
                    jobs.append(Job(f"{r}/interference/{kind}/{g}", "interference", (r, kind, g), grams + merges, cost=5, local=True, group=k))
        return jobs

    def _call(self, job) -> None:
        getattr(self, job.method)(*job.args)

    # The JobHost of ilora.experiment.schedule.run_jobs.
    def register(self, job, computed_elsewhere: bool = False) -> bool:
        """Whether ``job``'s stage is cached (re-entered without computing); ``computed_elsewhere``: a
        worker just computed it (a forced stage is not forced again)."""
        from ilora.experiment.stages import StageNotCached

        if computed_elsewhere:
            self.runner.redone.add(job.key)
        self.runner.compute = False
        try:
            self._call(job)
            return True
        except StageNotCached:
            return False
        finally:
            self.runner.compute = True

    def run_here(self, job) -> None:
        from ilora.experiment.pipeline import logged_to

        with logged_to(self.log_path(job)):
            self._call(job)

    def remote_call(self, job) -> tuple[Callable[..., Any], tuple]:
        return _run_job, (self.cfg, self.runner.force, set(self.runner.redone), job)

    def log_path(self, job) -> Path:
        return Path(self.cfg.run_dir) / "logs" / f"{job.key.replace('/', '__')}.log"

    def run_stages(self) -> None:
        """Run (or find cached) every stage: quick ones here, the others in ``workers`` processes.

        Raises:
            StagesFailed: a stage failed (the stages that do not read it ran).
        """
        from ilora.experiment.pipeline import StagesFailed
        from ilora.experiment.schedule import LocalExecutor, Schedule, run_jobs

        if self.cfg.threads:
            import torch

            torch.set_num_threads(self.cfg.threads)
        schedule = Schedule(self.jobs())
        outcome = run_jobs(schedule, self, lambda: LocalExecutor(self.cfg.workers), self.cfg.workers, self.log)
        if outcome.failed or outcome.blocked:
            raise StagesFailed(outcome, {key: key for key in schedule.jobs})

    def run(self) -> Path:
        """Every stage, then the report (stage ``report``); returns the path of ``REPORT.md``."""
        check_sources(self.cfg)
        self.run_stages()
        deps = [key for key in self.runner.all_stages() if key != "report"]
        settings = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in ("workers", "threads")}
        folder = self.runner.run("report", settings, lambda folder: write_report(build_summary(self), folder), deps)
        return folder / "REPORT.md"


def _run_job(cfg: RLCompareConfig, force: tuple[str, ...], redone: set[str], job) -> None:
    """Worker-process entry of :meth:`RLCompare.run_stages`: compute one job's stage, its output in its log."""
    from ilora.experiment.pipeline import logged_to

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    compare = RLCompare(cfg, force)
    compare.runner.redone |= redone
    with logged_to(compare.log_path(job)):
        compare._call(job)


# --------------------------------------------------------------------- summary
def difference(a, b):
    """``a - b`` of two estimates drawn with the same seed picks, with the interval of the paired draws."""
    import numpy as np

    from ilora.experiment.stats import Estimate

    draws = a.draws - b.draws
    ok = draws[np.isfinite(draws)]
    low, high = np.percentile(ok, [2.5, 97.5]) if len(ok) else (math.nan, math.nan)
    return Estimate(a.value - b.value, float(low), float(high), draws)


def build_summary(x: RLCompare) -> dict[str, Any]:
    """Every number of the report from the finished stages (``summary.json``).

    Scores are means over replicates of per-replicate means with two-level bootstrap intervals
    (replicates, then episodes; ``ilora.experiment.stats``); the same seed picks for every cell,
    so differences between models are paired over replicates.
    """
    import numpy as np

    from ilora.experiment import stats
    from ilora.general.benchmark import wilson_interval

    cfg, reps = x.cfg, list(x.reps.values())

    def result(rep: Replicate, stage: str) -> Any:
        return x.runner.result(f"{rep.name}/{stage}")
    rng = np.random.default_rng(0)
    picks = stats.seed_picks(len(reps), rng)

    def scores(stage: str, game: str) -> list[np.ndarray]:
        return [np.asarray(result(rep, stage)["play"][game]["scores"], float) for rep in reps]

    def reference(game: str, who: str) -> list[float]:
        return [float(result(rep, f"eval/reference/{game}")[who]["mean"]) for rep in reps]

    def mean_score(per_rep: list[np.ndarray]):
        # The expert-normalised score with random 0 and expert 1 is the score itself.
        return stats.normalised_score([stats.SeedCell(s, s, 0.0, 1.0) for s in per_rep], picks, rng)

    def normalised(per_rep: list[np.ndarray], game: str):
        cells = [stats.SeedCell(s, s, r, e) for s, r, e in zip(per_rep, reference(game, "random"), reference(game, "expert"))]
        return stats.normalised_score(cells, picks, rng)

    def general(stage: str) -> dict:
        counts = [result(rep, stage)["general"] for rep in reps]
        n, correct = sum(c["n"] for c in counts), sum(c["correct"] for c in counts)
        low, high = wilson_interval(correct, n)
        return {"accuracy": correct / n if n else math.nan, "low": low, "high": high, "n": n}

    def margin(stage: str, game: str) -> dict:
        values = [result(rep, stage)["margin"][game] for rep in reps]
        return {k: float(np.mean([v[k] for v in values])) for k in ("mean", "positive")}

    summary: dict[str, Any] = {
        "games": cfg.games, "all_games": cfg.all_games, "replicates": [rep.name for rep in reps],
        "sources": [str(rep.source) for rep in reps], "cloned": cfg.cloned, "methods": cfg.merge.methods,
        "episodes": {"own": cfg.eval.own_episodes, "other": cfg.eval.other_episodes, "max_frames": cfg.eval.max_frames},
        "frames": {rep.name: {g: x.expert_frames(rep, g) for g in cfg.games} for rep in reps},
        "rl": {"settings": dataclasses.asdict(cfg.rl), "per_game": cfg.per_game, "from_clone": cfg.from_clone},
        "notes": cfg.notes, "own": {}, "damage": {}, "general": {}, "merge": {}, "claim": {}, "training": {},
    }
    base_general = general("eval/base")
    summary["general"]["base"] = {**base_general, "change": 0.0}
    damage_means: dict[str, Any] = {}
    for g in cfg.games:
        own = {}
        for who in ("random", "expert"):
            per_rep = [np.asarray(result(rep, f"eval/reference/{g}")[who]["scores"], float) for rep in reps]
            own[who] = {"score": mean_score(per_rep).as_dict(), "normalised": normalised(per_rep, g).as_dict()}
        for model in ["base", *[f"{k}/{g}" for k in KINDS]]:
            per_rep = scores(f"eval/{model}", g)
            own[model.split("/")[0]] = {"score": mean_score(per_rep).as_dict(), "normalised": normalised(per_rep, g).as_dict(),
                                        "margin": margin(f"eval/{model}", g)}
        summary["own"][g] = own
        for kind in KINDS:
            model = f"{kind}/{g}"
            cells, estimates = {}, []
            for other in cfg.all_games:
                if other == g:
                    continue
                change = difference(mean_score(scores(f"eval/{model}", other)), mean_score(scores("eval/base", other)))
                estimates.append(change)
                cells[other] = change.as_dict()
            damage_means[model] = stats.combine(estimates, "mean")
            cells["mean"] = damage_means[model].as_dict()
            summary["damage"][model] = cells
            acc = general(f"eval/{model}")
            summary["general"][model] = {**acc, "change": acc["accuracy"] - base_general["accuracy"]}
            alone = scores(f"eval/{model}", g)
            merges = {}
            for m in cfg.merge.methods:
                stage = f"eval/merge/{model}/{m}"
                merged = scores(stage, g)
                cells_ = [stats.SeedCell(s, a, r, e) for s, a, r, e in
                          zip(merged, alone, reference(g, "random"), reference(g, "expert"))]
                acc = general(stage)
                merges[m] = {
                    "score": mean_score(merged).as_dict(),
                    "normalised": normalised(merged, g).as_dict(),
                    "retention": stats.retention(cells_, picks, rng).as_dict(),
                    "margin": margin(stage, g),
                    "general": {**acc, "change": acc["accuracy"] - base_general["accuracy"]},
                    "output_change": float(np.mean([result(rep, f"interference/{model}")["merged_change"][m] for rep in reps])),
                }
            inter = [result(rep, f"interference/{model}") for rep in reps]
            summary["merge"][model] = {
                "methods": merges,
                "others_on_own_rows": float(np.mean([np.sum(np.square(i["others_on_own_rows"])) ** 0.5 for i in inter])),
                "own_on_others_rows": float(np.mean([np.mean(i["own_on_others_rows"]) for i in inter])),
                "own_output": float(np.mean([i["own_energy"] for i in inter])) ** 0.5,
            }
        for kind in ("rl-base", "rl-clone"):
            summary["claim"][f"{kind}/{g}"] = {
                "damage_difference": difference(damage_means[f"{kind}/{g}"], damage_means[f"clone/{g}"]).as_dict(),
                "general_difference": summary["general"][f"{kind}/{g}"]["accuracy"] - summary["general"][f"clone/{g}"]["accuracy"],
                "own_difference": summary["own"][g][kind]["score"]["value"] - summary["own"][g]["clone"]["score"]["value"],
            }
        for kind in ("rl-base", "rl-clone"):
            summary["training"][f"{kind}/{g}"] = [training_record(x, rep, kind, g) for rep in reps]
    summary["minutes"] = round(sum(stage_seconds(x)) / 60, 1)
    return summary


def training_record(x: RLCompare, rep: Replicate, kind: str, game: str) -> dict:
    """An RL run's numbers: updates, frames, seconds, and return / entropy / KL early and late."""
    folder = x.adapter_dir(rep, kind, game)
    log = json.loads((folder / "rl_log.json").read_text())
    quarter = max(1, len(log) // 4)

    def mean(key: str, part: list[dict]) -> float:
        values = [e[key] for e in part if key in e and e[key] is not None]
        return float(sum(values) / len(values)) if values else math.nan

    first, last = log[:quarter], log[-quarter:]
    return {
        "replicate": rep.name, "updates": len(log), "frames": log[-1]["frames"] if log else 0,
        "seconds": x.runner.result(f"{rep.name}/adapter/{kind}/{game}").get("rl_seconds"),
        **{f"{key}_{when}": mean(key, part) for key in ("return", "entropy", "kl", "informative_groups")
           for when, part in (("first", first), ("last", last))},
    }


def stage_seconds(x: RLCompare) -> list[float]:
    """Each stage's own run time (first computation), report excluded."""
    out = []
    for record in Path(x.cfg.run_dir).rglob("stage.json"):
        data = json.loads(record.read_text())
        if data.get("name") != "report":
            out.append(float(data.get("seconds", 0.0)))
    return out


# ---------------------------------------------------------------------- report
def cell(e: dict | None, digits: int = 1) -> str:
    """``value [low, high]`` of an estimate dict (``n/a`` parts where undefined)."""

    def f(v: float | None) -> str:
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"

    if not e:
        return "n/a"
    return f"{f(e.get('value'))} [{f(e.get('low'))}, {f(e.get('high'))}]"


def signed(e: dict, digits: int = 1) -> str:
    """``+value [+low, +high]`` of a difference's estimate dict."""
    v, lo, hi = (e.get(k) for k in ("value", "low", "high"))
    if v is None:
        return "n/a"

    def f(t: float | None) -> str:
        return "n/a" if t is None else f"{t:+.{digits}f}"

    return f"{f(v)} [{f(lo)}, {f(hi)}]"


def verdict(e: dict, more: str, less: str) -> str:
    """Which way a difference's 95% interval lies: ``more`` above 0, ``less`` below, else no separation."""
    lo, hi = e.get("low"), e.get("high")
    if lo is None or hi is None:
        return "undefined"
    return more if lo > 0 else less if hi < 0 else "no separation (the interval includes 0)"


def label(model: str) -> str:
    """``clone/Boxing`` -> ``cloned (Boxing)``; ``base`` -> ``base``."""
    kind, _, game = model.partition("/")
    return f"{LABELS[kind]} ({game})" if game else LABELS[kind]


def render_report(summary: dict[str, Any]) -> str:
    """``REPORT.md`` from :func:`build_summary`'s dict."""
    from ilora.experiment.report import table

    games, all_games, methods = summary["games"], summary["all_games"], summary["methods"]
    reps = summary["replicates"]
    ep = summary["episodes"]
    over = "replicates, then episodes" if len(reps) > 1 else "episodes"
    md = [
        "# On-policy RL vs cloning: own game, forgetting, merging (`ilora rl-compare`)", "",
        f"Sources: {', '.join(f'`{s}`' for s in summary['sources'])} (replicate{'s' if len(reps) > 1 else ''} "
        f"{', '.join(reps)}). Cloned adapter: **{summary['cloned']}** (the source's `train/{summary['cloned']}/<game>`). "
        "RL: GRPO (`ilora rl`) from the base (a new LoRA) and from the cloned adapter, each with as many emulator frames "
        "as the expert data the clone learned from ("
        + "; ".join(f"{r}: " + ", ".join(f"{g} {n:,}" for g, n in fr.items()) for r, fr in summary["frames"].items())
        + f"). Play: {ep['own']} episodes of each adapter on its own game (and of each merged model, the random and expert "
        f"references and the base), {ep['other']} on each other game, capped at {ep['max_frames']} frames, FireReset, "
        f"sticky actions 0.25, the same episode seeds for every model. Intervals: 95% bootstrap over {over} "
        "(`ilora.experiment.stats`, 2,000 draws); general accuracy: Wilson 95%.", "",
    ]
    if ep["own"] < 10 or ep["other"] < 5:
        md += [f"The CPU budget allows {ep['own']} and {ep['other']} episodes per cell: the intervals are wide, and a "
               "difference that does not separate is not evidence of no difference.", ""]

    # Summary: one row per adapter.
    rows = []
    for g in games:
        for kind in KINDS:
            model = f"{kind}/{g}"
            own, merged = summary["own"][g][kind], summary["merge"][model]["methods"]
            rows.append([g, LABELS[kind], cell(own["score"]), cell(own["normalised"], 2), signed(summary["damage"][model]["mean"]),
                         f"{summary['general'][model]['change']:+.3f}", *[cell(merged[m]["retention"], 2) for m in methods]])
    md += ["## Summary", "",
           f"Per adapter: own-game score and expert-normalised score, mean score change on the other games vs the base "
           f"(negative: forgetting), general accuracy change vs the base ({summary['general']['base']['accuracy']:.3f}), "
           "and own-game retention after merging with the other games' routed adapters. Details below.", "",
           table(["game", "adapter", "own-game score", "expert-normalised", "other games vs base", "general acc. vs base",
                  *[f"retention after {m}" for m in methods]], rows), ""]

    # 1. Own-game score.
    rows = []
    for g in games:
        own = summary["own"][g]
        for model in ("random", "expert", "base", *KINDS):
            name = LABELS.get(model, model)
            rows.append([g, name, cell(own[model]["score"]), cell(own[model]["normalised"], 2),
                         "" if "margin" not in own[model] else f"{own[model]['margin']['mean']:.2f} ({own[model]['margin']['positive']:.2f})"])
    md += ["## 1. Own-game score", "",
           "Expert-normalised: `(score - random) / (expert - random)`. Answer margin on held-out expert rows: mean of the "
           "expert action's score minus the best other action's (share of rows where it is positive).", "",
           table(["game", "model", "score", "expert-normalised", "answer margin"], rows), ""]

    # 2. Forgetting: other games.
    rows = [[label(m), *["—" if g == m.split("/")[1] else signed(d[g]) for g in all_games], signed(d["mean"])]
            for m, d in summary["damage"].items()]
    md += ["## 2. Damage to the other games (the experiment report's Table 2 format)", "",
           "Mean score of a one-game adapter on each other game minus the base model's score there (0 = no change; "
           "negative = forgetting), with the paired interval.", "",
           table(["adapter", *all_games, "mean over the other games"], rows), ""]

    # 3. General accuracy.
    rows = [[label(m), f"{s['accuracy']:.3f} [{s['low']:.3f}, {s['high']:.3f}]", str(s["n"]), f"{s['change']:+.3f}"]
            for m, s in summary["general"].items()]
    md += ["## 3. General benchmark accuracy (Table 3 format)", "",
           table(["model", "accuracy [95% CI]", "n", "change vs base"], rows), ""]

    # 4. Merging.
    rows = []
    for m, d in summary["merge"].items():
        alone_margin = summary["own"][m.split("/")[1]][m.split("/")[0]]["margin"]
        for method in methods:
            r = d["methods"][method]
            rows.append([label(m), method, cell(r["score"]), cell(r["retention"], 2),
                         f"{alone_margin['mean']:.2f} ({alone_margin['positive']:.2f}) -> {r['margin']['mean']:.2f} "
                         f"({r['margin']['positive']:.2f})", f"{r['output_change']:.2f}", f"{r['general']['change']:+.3f}"])
    md += ["## 4. Merged with the other games' routed adapters", "",
           "Each adapter merged with the routed adapters of " + ", ".join(all_games) + " but its own game, then played on "
           "its game. Retention: `(merged - random) / (adapter alone - random)` (n/a where the adapter alone does not beat "
           "random). Margin: alone -> merged. Output change: `||(dW_merged - dW_own) X|| / ||dW_own X||` on the game's rows "
           "(`ilora.merge.interference`, from Grams; 0: the merge leaves the adapter's output unchanged).", "",
           table(["adapter", "merge", "merged score", "retention", "answer margin", "output change", "general acc. vs base"],
                 rows), ""]
    rows = [[label(m), f"{d['own_output']:.3g}", f"{d['others_on_own_rows']:.2f}", f"{d['own_on_others_rows']:.2f}"]
            for m, d in summary["merge"].items()]
    md += ["Interference in activations, per adapter: its own output norm on its rows (`||dW X|| / sqrt(count)`), the "
           "other games' routed adapters' output on its rows relative to it (root of the summed squares), and its output "
           "on their rows relative to theirs (mean).", "",
           table(["adapter", "own output", "others on its rows", "it on others' rows"], rows), ""]

    # 5. The claim.
    lines = []
    for m, c in summary["claim"].items():
        kind, g = m.split("/")
        lines.append(f"- {g}, {LABELS[kind]} vs cloned: damage to the other games {signed(c['damage_difference'])} "
                     f"(positive: RL damages less) -> {verdict(c['damage_difference'], 'RL forgets less', 'RL forgets more')}; "
                     f"general accuracy {c['general_difference']:+.3f}; own-game score {c['own_difference']:+.1f}.")
    md += ["## 5. Does RL forget less than cloning?", "",
           "Paired differences (RL adapter minus the cloned adapter of the same game) of the mean damage over the other "
           "games, with 95% intervals; general accuracy and own-game score as point differences.", "", *lines, "",
           "![comparison](rl_compare.png)", ""]

    # 6. Training.
    rows = []
    for m, runs in summary["training"].items():
        for t in runs:
            rows.append([label(m), t["replicate"], str(t["updates"]), f"{t['frames']:,}",
                         "n/a" if t["seconds"] is None else f"{t['seconds']:.0f}",
                         f"{t['return_first']:.2f} -> {t['return_last']:.2f}", f"{t['entropy_first']:.2f} -> {t['entropy_last']:.2f}",
                         f"{t['kl_first']:.3f} -> {t['kl_last']:.3f}",
                         f"{t['informative_groups_first']:.2f} -> {t['informative_groups_last']:.2f}"])
    s, fc = summary["rl"]["settings"], summary["rl"]["from_clone"]
    per_game = summary["rl"].get("per_game", {})

    def listed(settings: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v}" for k, v in settings.items())

    md += ["## 6. The RL runs", "",
           f"Settings: groups {s['groups']} x group size {s['group_size']} x horizon {s['horizon']}, learning rate "
           f"{s['learning_rate']:g}, epochs {s['epochs']}, beta {s['beta']:g}, temperature {s['temperature']:g}"
           + "".join(f"; {game}: {listed(o)}" for game, o in per_game.items())
           + (f"; from the clone: {listed(fc)}" if fc else "")
           + ". Per run, the mean over its first and last quarter of updates of the continuations' return, the policy's "
           "entropy (nats), its KL to the start weights and the share of groups whose returns differ.", "",
           table(["run", "replicate", "updates", "frames", "seconds", "return", "entropy", "KL to start", "informative groups"],
                 rows), ""]
    if summary["notes"]:
        md += ["## Notes", "", *[f"- {n}" for n in summary["notes"]], ""]
    md += [f"Compute: {summary['minutes']:.1f} min summed over the stages' own run times.", ""]
    return "\n".join(md)


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Three panels with 95% error bars: own-game expert-normalised score, mean damage to the other
    games, and retention after each merge; one bar per adapter kind, grouped by game."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    games, methods = summary["games"], summary["methods"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(KINDS)

    def bars(ax, get, title: str, ylabel: str, groups: list[str], group_label: Callable[[str], str]) -> None:
        for i, kind in enumerate(KINDS):
            values, lows, highs = [], [], []
            for grp in groups:
                e = get(kind, grp) or {}
                v, lo, hi = (e.get(k) for k in ("value", "low", "high"))
                finite = v is not None and math.isfinite(v)
                values.append(v if finite else 0.0)
                lows.append(max(0.0, v - lo) if finite and lo is not None else 0.0)
                highs.append(max(0.0, hi - v) if finite and hi is not None else 0.0)
            ax.bar(np.arange(len(groups)) + i * width, values, width, yerr=[lows, highs], capsize=3, label=LABELS[kind])
        ax.set_xticks(np.arange(len(groups)) + width * (len(KINDS) - 1) / 2)
        ax.set_xticklabels([group_label(grp) for grp in groups], rotation=15)
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)

    bars(axes[0], lambda k, g: summary["own"][g][k]["normalised"], "Own game", "expert-normalised score", games, str)
    bars(axes[1], lambda k, g: summary["damage"][f"{k}/{g}"]["mean"], "Other games (forgetting)",
         "score change vs base, mean over games", games, str)
    pairs = [f"{g}|{m}" for g in games for m in methods]
    bars(axes[2], lambda k, p: summary["merge"][f"{k}/{p.split('|')[0]}"]["methods"][p.split("|")[1]]["retention"],
         "After merging with the other routed adapters", "retention", pairs, lambda p: p.replace("|", "\n"))
    axes[2].axhline(1.0, color="gray", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(summary: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``REPORT.md``, ``summary.json`` and ``rl_compare.png`` into ``folder`` (the report stage's
    temporary folder, renamed into place when complete)."""
    from ilora.fileio import to_json

    (folder / "summary.json").write_text(to_json(summary))
    plot_summary(summary, folder / "rl_compare.png")
    (folder / "REPORT.md").write_text(render_report(summary))
    return {"minutes": summary["minutes"]}


# ------------------------------------------------------------------------- CLI
EXAMPLE = """example:
  ilora rl-compare configs/rl_compare.yaml
  ilora rl-compare configs/rl_compare.yaml --set 'sources=[runs/seeds-full/seed-0,runs/seeds-full/seed-1]'
  ilora rl-compare configs/rl_compare.yaml --force seed-1/adapter/rl-clone    # redo a stage and what read it
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from ilora.config import describe

    p = subparsers.add_parser(
        "rl-compare",
        help="compare RL-trained adapters (GRPO from the base and from the clone) with cloned ones: own game, "
        "forgetting, merging",
        description="For each game: the source experiment's cloned adapter, GRPO from the base and GRPO from the clone "
        "with the expert data's frames; each played on every game, scored on the general benchmark, merged with the "
        "other games' routed adapters and played again. Writes RUN_DIR/report/REPORT.md, summary.json and "
        "rl_compare.png; stages are cached (rerun to resume).",
        epilog=EXAMPLE + "\nsettings (YAML keys, --set KEY=VALUE):\n" + describe(RLCompareConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", type=Path, help="YAML preset, e.g. configs/rl_compare.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. eval.own_episodes=4")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo a stage or every stage under a prefix, and what depends on it")
    p.set_defaults(func=run_cli)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RLCompareConfig:
    """The config file with ``--set`` overrides, checked (unknown keys, games, settings) in one line."""
    from ilora.config import load_yaml

    return load_yaml(RLCompareConfig, path, list(overrides))


def run_cli(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    check_sources(cfg)
    report = RLCompare(cfg, tuple(args.force)).run()
    print((report.parent / "REPORT.md").read_text().split("## 2.")[0])
    print(f"report: {report}")
    return 0
