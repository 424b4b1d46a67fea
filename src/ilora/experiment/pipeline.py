"""The end-to-end experiment: base model -> data -> adapters -> merges -> play -> report.

Every unit of work is a cached stage (``ilora.experiment.stages``): rerunning the same config
skips what is done, an interrupted run resumes, ``--force PREFIX`` redoes stages, and a
deleted stage folder is redone together with everything that read it.

Model names used throughout (and in the report):
``base``, ``plain/<game>`` (single-task LoRA), ``routed/<game>`` (routing-tuned LoRA),
``joint`` (one LoRA on all games' data), ``merge/<method>`` (routed adapters merged all at
once), ``iter/<order>/<k>`` (I-LoRA merging one game at a time, after k games),
``keep/<ratio>`` (I-LoRA with another keep ratio), ``ablation/<variant>/<game>`` and
``ablation-merge/<variant>`` (loss ablations on a pair of games), ``refit/<game>`` (a routed
adapter trained on with the other games' routed adapters folded into the base),
``continual/<game>`` (trained, in the order of games, with the earlier games' continual
adapters folded into the base), ``merge-refit/<method>`` and ``merge-continual/<method>``
(those adapters merged all at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilora.atari.games import DEFAULT_FRAME_SKIP
from ilora.config import to_dict
from ilora.errors import IloraError
from ilora.experiment.config import ExperimentConfig
from ilora.experiment.evaluation import own_episodes, resolve_device
from ilora.experiment.schedule import (
    AGENT_STEP_SECONDS,
    GENERAL_ROW_SECONDS,
    ROUTED_COST_FACTOR,
    SCRIPTED_STEP_SECONDS,
    SELECTION_COST_FACTOR,
    TRAIN_ROW_SECONDS,
    TRIAL_ROW_SECONDS,
    Job,
    Schedule,
)
from ilora.experiment.stages import StageNotCached, StageRunner
from ilora.fileio import file_sha256
from ilora.models.load import builtin_base

PLAIN = {"eps_kl": 0.0, "eps_norm": 0.0}


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter the experiment trains (stage ``train/<name>``).

    Attributes:
        name: the model name (``plain/Pong``, ``routed/Pong``, ``joint``, ...).
        task: the games whose rows get the LM loss.
        weights: ``eps_kl`` and ``eps_norm`` (both 0: plain LoRA, no general rows).
        steps: optimiser steps; ``None``: ``train.max_steps``, matched to task rows when routed.
        fold: adapters (model names) added to the base weights before training, frozen.
        init: the adapter (model name) training continues from; ``None``: a fresh LoRA.
        steps_share: the share of those steps this adapter takes.
    """

    name: str
    task: tuple[str, ...]
    weights: dict[str, float]
    steps: int | None = None
    fold: tuple[str, ...] = ()
    init: str | None = None
    steps_share: float = 1.0

    @property
    def routed(self) -> bool:
        return self.weights["eps_kl"] > 0 or self.weights["eps_norm"] > 0

    @property
    def starts_from(self) -> list[str]:
        """The adapters this one is trained on or from (folded ones, then the initial one)."""
        return [*self.fold, *([self.init] if self.init else [])]


@dataclass
class ModelSpec:
    """How to build one evaluated model: the base plus an adapter or a merged state (or nothing)."""

    adapter: Path | None = None
    merged: Path | None = None


class Experiment:
    """Runs the stages of one experiment config in its run folder."""

    def __init__(
        self, config: ExperimentConfig, force: tuple[str, ...] = (), log: Callable[[str], None] | None = None,
        workers: int | None = None,
    ):
        self.cfg = config
        log = log or print_now  # worker processes print to a pipe or file too: flush every line
        self.runner = StageRunner(Path(config.run_dir), force=force, log=log)
        self.log = log
        self.workers = config.workers if workers is None else workers
        self.models: dict[str, ModelSpec] = {}

    # ----------------------------------------------------------------- helpers
    def stage(self, name: str, config: Any, fn: Callable[[Path], Any], deps=()) -> Path:
        return self.runner.run(name, to_dict(config), fn, deps)

    @property
    def base_path(self) -> str:
        return str(self.runner.folder("base") / "model") if self.cfg.base == "builtin" else self.cfg.base

    def load_rows(self, stage: str, split: str):
        from datasets import load_from_disk

        return load_from_disk(str(self.runner.folder(stage) / split))

    # ------------------------------------------------------------------ stages
    def run_base(self) -> None:
        def build(folder: Path):
            if self.cfg.base == "builtin":
                shutil.copytree(builtin_base(), folder / "model")
                record = json.loads((folder / "model" / "pretrain.json").read_text())
                return {"source": "builtin", "heldout": record["heldout"]["overall"]}
            return {"source": self.cfg.base}

        # The shipped base's weights are part of the settings: a new builtin base redoes the run.
        source = file_sha256(builtin_base() / "model.safetensors") if self.cfg.base == "builtin" else self.cfg.base
        self.stage("base", {"base": self.cfg.base, "source": source}, build)

    def collect(self, game: str) -> None:
        """Expert data of ``game`` (stage ``data/<game>``): training and held-out episodes."""
        from ilora.atari.collect import ROW_LAYOUT, collect_dataset

        d = self.cfg.data

        def run(folder: Path):
            opts = dict(object_text=d.object_text, reasoning=d.reasoning, max_steps=d.max_steps)
            train = collect_dataset(game, d.episodes, self.cfg.seed, **opts)
            train.save_to_disk(str(folder / "train"))
            held = collect_dataset(game, d.heldout_episodes, self.cfg.seed + 10_000, **opts)
            held.save_to_disk(str(folder / "heldout"))
            return {"train_rows": len(train), "heldout_rows": len(held)}

        collection = {k: getattr(d, k) for k in ("episodes", "heldout_episodes", "max_steps", "object_text", "reasoning")}
        self.stage(f"data/{game}", {**collection, "game": game, "seed": self.cfg.seed, "layout": ROW_LAYOUT}, run)

    def general_data(self) -> None:
        """General training and benchmark rows (stage ``data/general``)."""
        from ilora.general.data import generate_general

        d = self.cfg.data

        def run(folder: Path):
            generate_general(d.general_rows, self.cfg.seed, "train").save_to_disk(str(folder / "train"))
            generate_general(d.general_eval_rows, self.cfg.seed, "test").save_to_disk(str(folder / "test"))
            return {"train_rows": d.general_rows, "test_rows": d.general_eval_rows}

        self.stage("data/general", {"rows": d.general_rows, "eval": d.general_eval_rows, "seed": self.cfg.seed}, run)

    def train(self, spec: AdapterSpec) -> None:
        """Train adapter ``spec.name`` on its task games' data; general rows join when the weights route them."""
        from ilora.prompt_settings import PromptSettings
        from ilora.routing.collator import Source
        from ilora.routing.train import train_adapter
        from ilora.routing.trainer import RoutingConfig

        t, d = self.cfg.train, self.cfg.data
        task_games, weights, steps, routed = list(spec.task), spec.weights, spec.steps, spec.routed
        others = [g for g in self.cfg.games if g not in task_games] if routed else []
        deps = ["base"] + [f"data/{g}" for g in task_games + others] + (["data/general"] if routed else [])
        # The joint adapter's own step count is in "steps"; the factor behind it concerns no other stage.
        train_settings = {k: v for k, v in to_dict(t).items() if k != "joint_steps_factor"}
        settings = {"train": train_settings, "weights": weights, "task": task_games, "others": others, "steps": steps}
        starts_from = spec.starts_from
        for model in starts_from:
            self.ensure(model)
        fold = [self.models[m].adapter for m in spec.fold]
        init = self.models[spec.init].adapter if spec.init else None
        if starts_from:
            settings["starts_from"] = {"fold": list(spec.fold), "init": spec.init, "steps_share": spec.steps_share}
            deps += [self.stage_of(m) for m in starts_from]

        def fit(folder: Path):
            import torch

            task = [Source(self.load_rows(f"data/{g}", "train"), "task", name=g) for g in task_games]
            n_task = sum(len(s.rows) for s in task)
            general = []
            if routed:
                share = max(1, int(t.general_share * n_task))
                general.append(Source(self.load_rows("data/general", "train"), "general", size=share, name="general"))
                general += [
                    Source(self.load_rows(f"data/{g}", "train"), "general", size=d.other_game_rows, name=g) for g in others
                ]
            n_steps = steps or t.max_steps
            if routed and t.match_task_rows:
                n_steps = task_matched_steps(n_steps, n_task, sum(s.size for s in general))
            n_steps = max(1, round(n_steps * spec.steps_share))
            args = RoutingConfig(
                output_dir=str(folder / "trainer"),
                max_steps=n_steps,
                per_device_train_batch_size=t.batch_size,
                learning_rate=t.learning_rate,
                lr_scheduler_type="linear",
                warmup_steps=max(1, n_steps // 20),
                lora_r=t.lora_r,
                lora_alpha=t.lora_alpha,
                lora_dropout=t.lora_dropout,
                lora_parts=list(t.lora_parts),
                eps_lm=t.eps_lm,
                eps_kl=weights["eps_kl"],
                eps_norm=weights["eps_norm"],
                seed=self.cfg.seed,
                save_strategy="no",
                logging_steps=max(1, n_steps // 10),
                use_cpu=not torch.cuda.is_available(),
                dataloader_num_workers=0,
                disable_tqdm=False,
            )
            prompt = PromptSettings(tuple(task_games), d.object_text, d.reasoning)  # what `ilora play` reads
            train_adapter(
                self.base_path, task, general, args, folder / "adapter", dtype=t.dtype, fold_adapters=fold,
                init_adapter=init, prompt_settings=prompt,
            )
            shutil.rmtree(folder / "adapter.run", ignore_errors=True)
            log = json.loads((folder / "adapter" / "loss_log.json").read_text())
            final = next((h for h in reversed(log) if "train_loss" in h), log[-1] if log else {})
            return {"steps": n_steps, "task_rows": n_task, "final": final}

        self.stage(f"train/{spec.name}", settings, fit, deps)
        self.models[spec.name] = ModelSpec(adapter=self.runner.folder(f"train/{spec.name}") / "adapter")

    def merge(self, name: str, adapters: list[str], method: str, options: dict[str, Any]) -> None:
        """Merge trained adapters (or, for ``iter``, a merged state plus one adapter) into ``merge/...``."""
        from ilora.merge import merge_adapters

        def run(folder: Path):
            inputs = [self.models[a].adapter or self.models[a].merged for a in adapters]
            state = merge_adapters(
                [str(p) for p in inputs], method, base=self.base_path, out=folder / "state", progress=False, **options
            )
            return {"modules": len(state.deltas)}

        deps = ["base"] + [self.stage_of(a) for a in adapters]
        self.stage(name, {"method": method, "inputs": adapters, "options": options}, run, deps)
        self.models[name] = ModelSpec(merged=self.runner.folder(name) / "state")

    def grams(self, game: str) -> None:
        """``game``'s routed adapter with its input Grams on task and general rows (stage
        ``grams/<game>``), the input of data-aware merges and of the interference analysis."""
        from ilora.routing.grams import compute_adapter_grams

        self.ensure(f"routed/{game}")
        source = self.models[f"routed/{game}"].adapter
        n = self.cfg.merge.grams_rows

        def run(folder: Path):
            adapter = folder / "adapter"
            adapter.mkdir()
            for item in source.iterdir():
                if item.is_file():
                    link_or_copy(item, adapter / item.name)
            task, general = self.load_rows(f"data/{game}", "train"), self.load_rows("data/general", "train")
            compute_adapter_grams(
                self.base_path, adapter, head(task, n), head(general, n), device=resolve_device(self.cfg.device)
            )
            return {"task_rows": min(n, len(task)), "general_rows": min(n, len(general))}

        deps = ["base", f"train/routed/{game}", f"data/{game}", "data/general"]
        self.stage(f"grams/{game}", {"rows": n}, run, deps)
        self.models[f"grams/{game}"] = ModelSpec(adapter=self.runner.folder(f"grams/{game}") / "adapter")

    def validation_rows(self, game: str, n: int) -> list[dict]:
        """``n`` held-out rows of ``game`` after those the report scores agreement and margins on:
        what the gate and the tuned merge are fitted on, apart from every reported number."""
        rows, start = self.load_rows(f"data/{game}", "heldout"), self.cfg.eval.agreement_rows
        if len(rows) < start + n:
            raise IloraError(f"data/{game}: {len(rows)} held-out rows; validation needs {start + n} "
                             f"(eval.agreement_rows {start} scored + {n}): collect more data.heldout_episodes")
        return [rows[i] for i in range(start, start + n)]

    def routed_adapters(self) -> dict[str, Path]:
        """Game -> its routed adapter folder, for every game (registered from their stages)."""
        for game in self.cfg.games:
            self.ensure(f"routed/{game}")
        return {g: self.models[f"routed/{g}"].adapter for g in self.cfg.games}

    def tuned_merge(self) -> None:
        """The routed adapters merged with the setting a search found best by its reward on
        validation rows (stage ``tuned-merge``: ``search/`` holds every trial, ``state/`` the merge)."""
        from ilora.experiment.tune_merge import tune_merge
        from ilora.merge import merge_adapters

        search, games = self.cfg.tuned_merge.search, list(self.cfg.games)
        adapters = self.routed_adapters()

        def run(folder: Path):
            rows = {g: self.validation_rows(g, search.rows) for g in games}
            general = head(self.load_rows("data/general", "train"), search.general_rows)
            best = tune_merge([str(adapters[g]) for g in games], self.base_path, rows, folder / "search", search,
                              general=general, progress=False)
            merge_adapters([str(adapters[g]) for g in games], best.method, base=self.base_path, out=folder / "state",
                           progress=False, **best.options)
            return {"method": best.method, "options": best.options, "objective": best.objective,
                    "default_objective": best.default_objective, "strategy": best.strategy, "trial": best.trial,
                    "trials": search.trials * len(search.strategies), "best_per_strategy": best.best_per_strategy}

        deps = ["base", "data/general", *[f"data/{g}" for g in games], *[f"train/routed/{g}" for g in games]]
        settings = {"search": search, "validation_from": self.cfg.eval.agreement_rows}
        self.stage("tuned-merge", settings, run, deps)
        self.models["tuned-merge"] = ModelSpec(merged=self.runner.folder("tuned-merge") / "state")

    def evaluate_selection(self, rule: str) -> None:
        """Play every game with a skill chosen per step by ``rule`` among the routed adapters
        (stage ``eval/select/<rule>``), with the rule's pick accuracy and cost on held-out rows."""
        from ilora.experiment.evaluation import evaluate_selection

        s, games = self.cfg.selection, list(self.cfg.games)
        adapters = self.routed_adapters()

        def run(folder: Path):
            gate_rows = {g: self.validation_rows(g, s.gate_rows) for g in games} if rule == "gate" else None
            heldout = {g: self.load_rows(f"data/{g}", "heldout") for g in games}
            return evaluate_selection(self.base_path, adapters, rule, self.cfg, folder, heldout, gate_rows)

        deps = ["base", *[f"data/{g}" for g in games], *[f"train/routed/{g}" for g in games]]
        settings = {"eval": self.eval_settings(own_game=False), "rule": rule, "seed": self.cfg.seed,
                    **({"gate": s.gate, "gate_rows": s.gate_rows} if rule == "gate" else {})}
        self.stage(f"eval/select/{rule}", settings, run, deps)

    def stage_of(self, model: str) -> str:
        """The stage that produced a model: ``train/<name>`` for an adapter, the merge's own name otherwise."""
        return f"train/{model}" if model in {spec.name for spec in self.training_jobs()} else model

    def training_jobs(self) -> list[AdapterSpec]:
        """Every adapter the experiment trains."""
        t = self.cfg.train
        routed_weights = {"eps_kl": t.eps_kl, "eps_norm": t.eps_norm}
        factor = len(self.cfg.games) if t.joint_steps_factor is None else t.joint_steps_factor
        games = tuple(self.cfg.games)
        jobs = [AdapterSpec("joint", games, PLAIN, int(t.max_steps * factor))] if self.cfg.adapters.joint else []
        jobs += [AdapterSpec(f"plain/{game}", (game,), PLAIN) for game in games]
        jobs += [AdapterSpec(f"routed/{game}", (game,), routed_weights) for game in self.cfg.routed_games()]
        for variant, weights in self.cfg.ablations.variants.items():
            jobs += [AdapterSpec(f"ablation/{variant}/{g}", (g,), {**PLAIN, **weights}) for g in self.cfg.ablations.games]
        if self.cfg.refit.enabled:
            jobs += [
                AdapterSpec(f"refit/{g}", (g,), routed_weights, fold=tuple(f"routed/{o}" for o in games if o != g),
                            init=f"routed/{g}", steps_share=self.cfg.refit.steps_share)
                for g in games
            ]
        if self.cfg.continual.enabled:
            continual = self.continual_adapters()
            jobs += [AdapterSpec(continual[k], (g,), routed_weights, fold=tuple(continual[:k]))
                     for k, g in enumerate(games) if k > 0]
        return jobs

    def continual_adapters(self) -> list[str]:
        """The continual adapter of each game in order: the first game's is its routed adapter (a
        continual adapter with nothing to fold in is trained exactly like it)."""
        games = list(self.cfg.games)
        return [f"routed/{games[0]}", *[f"continual/{g}" for g in games[1:]]]

    def merge_jobs(self) -> list[tuple]:
        """``(name, input models, method, options)`` of every merge, each after the merges it reads."""
        m = self.cfg.merge
        routed = [f"routed/{g}" for g in self.cfg.games]
        jobs: list[tuple] = []
        for method in m.methods:
            jobs.append((f"merge/{method}", self.merge_inputs(method, self.cfg.games), method, self.merge_options(method)))
        for method in self.cfg.refit.methods if self.cfg.refit.enabled else ():
            inputs = self.merge_inputs(method, self.cfg.games, kind="refit")
            jobs.append((f"merge-refit/{method}", inputs, method, self.merge_options(method)))
        for method in self.cfg.continual.methods if self.cfg.continual.enabled else ():
            inputs = self.merge_inputs(method, self.cfg.games, kind="continual")
            jobs.append((f"merge-continual/{method}", inputs, method, self.merge_options(method)))
        jobs += [(f"keep/{keep:g}", routed, "ilora", {"keep": keep}) for keep in m.keep_sweep if keep != m.keep]
        sequences = [("ilora", order) for order in [list(self.cfg.games)] + [list(o) for o in m.orders]] if m.iterative else []
        sequences += [(method, list(self.cfg.games)) for method in m.iterative_methods]
        for method, order in sequences:
            inputs = self.merge_inputs(method, order)
            previous = inputs[0]
            for k in range(2, len(order) + 1):
                name = iterative_name(method, order, k)
                jobs.append((name, [previous, inputs[k - 1]], method, self.merge_options(method)))
                previous = name
        pair = self.cfg.ablation_pair()
        variants = {"plain": "plain", "routed": "routed", **{v: f"ablation/{v}" for v in self.cfg.ablations.variants}}
        for variant, prefix in variants.items() if pair else ():
            jobs.append((f"ablation-merge/{variant}", [f"{prefix}/{g}" for g in pair], "ilora", {"keep": m.keep}))
        return jobs

    def merge_inputs(self, method: str, games: list[str], kind: str = "routed") -> list[str]:
        """The ``kind`` adapters of ``games`` as a merge reads them: the routed ones with their Grams
        for a data-aware method."""
        from ilora.merge.registry import method_class

        if method_class(method).needs_grams:
            if kind != "routed":
                raise IloraError(f"{kind}.methods: {method} needs input Grams, which are measured for routed adapters only")
            kind = "grams"
        if kind == "continual":
            return self.continual_adapters()
        return [f"{kind}/{g}" for g in games]

    def merge_options(self, method: str) -> dict[str, Any]:
        """The experiment's options for a merge method (I-LoRA's keep ratio; the registry's defaults otherwise)."""
        return {"keep": self.cfg.merge.keep} if method == "ilora" else {}

    def ensure(self, model: str) -> None:
        """Register ``model`` (and the models it was merged from) from their finished, cached stages."""
        if model in self.models:
            return
        for spec in self.training_jobs():
            if spec.name == model:
                return self.train(spec)
        if model.startswith("grams/"):
            return self.grams(model.removeprefix("grams/"))
        if model == "tuned-merge":
            return self.tuned_merge()
        for name, inputs, method, options in self.merge_jobs():
            if name == model:
                for source in inputs:
                    self.ensure(source)
                return self.merge(name, inputs, method, options)
        raise KeyError(f"no model named {model!r} in this experiment")

    # -------------------------------------------------------------- evaluation
    def eval_plan(self) -> dict[str, list[str]]:
        """Which games each model is played on."""
        games = list(self.cfg.games)
        pair = self.cfg.ablation_pair()
        plan: dict[str, list[str]] = {"base": games}
        tuned = ["tuned-merge"] if self.cfg.tuned_merge.enabled else []
        for name in [spec.name for spec in self.training_jobs()] + [job[0] for job in self.merge_jobs()] + tuned:
            if name.startswith("continual/"):
                continue  # each acts with the earlier ones: played in their merges only
            if name.startswith(("ablation/", "ablation-merge/")):
                plan[name] = pair
            elif name.startswith("iter"):
                _, tag, k = name.split("/")
                if int(k) < len(games) and not self.cfg.merge.play_intermediate:
                    continue
                plan[name] = tag.split("-")[: int(k)]  # the games merged so far
            elif name.startswith(("plain/", "routed/", "refit/")) and not self.cfg.eval.cross_games:
                plan[name] = [name.split("/")[1]]
            else:
                plan[name] = games
        return plan

    def eval_settings(self, own_game: bool) -> dict:
        """The play settings an evaluation stage depends on (own-game episodes only where played)."""
        settings = to_dict(self.cfg.eval)
        settings.pop("cross_games")  # it decides which games a stage plays, and those are in its settings
        if not own_game or self.cfg.eval.own_game_episodes is None:
            settings.pop("own_game_episodes")
        return settings

    def evaluate_reference(self, game: str) -> None:
        from ilora.experiment.evaluation import evaluate_reference

        e = self.cfg.eval
        self.stage(
            f"eval/reference/{game}",
            {"eval": self.eval_settings(own_game=True), "seed": self.cfg.seed, "game": game},
            lambda folder: evaluate_reference(game, e, self.cfg.seed, folder),
        )

    def evaluate(self, name: str, games: list[str]) -> None:
        """Play ``games`` with model ``name`` and score it (stage ``eval/<name>``)."""
        from ilora.experiment.evaluation import evaluate_model

        if name != "base":
            self.ensure(name)
        e = self.cfg.eval
        spec = self.models.get(name, ModelSpec())
        own_game = name.split("/")[1] if name.startswith(("plain/", "routed/")) else None
        blank = e.blank_check and name.startswith("routed/")
        deps = ["base"] + ([self.stage_of(name)] if name != "base" else [])
        deps += [f"data/{g}" for g in games] + ["data/general"]

        def run(folder: Path):
            return evaluate_model(
                self.base_path,
                spec,
                games,
                e,
                self.cfg,
                folder,
                heldout={g: self.load_rows(f"data/{g}", "heldout") for g in games},
                general=self.load_rows("data/general", "test"),
                own_game=own_game,
                blank_check=blank,
            )

        settings = {"eval": self.eval_settings(own_game is not None), "games": games, "blank": blank, "seed": self.cfg.seed}
        self.stage(f"eval/{name}", settings, run, deps)

    def analyze(self, kind: str) -> None:
        """LoRA activation norms of the first game's ``kind`` adapter on task, general and other-game rows."""
        from ilora.routing.analyze import analyze_activations

        n = self.cfg.eval.activation_rows
        game, others = self.cfg.games[0], self.cfg.games[1:]
        self.ensure(f"{kind}/{game}")

        def run(folder: Path):
            data = {
                "task": head(self.load_rows(f"data/{game}", "heldout"), n),
                "general": head(self.load_rows("data/general", "test"), n),
                "other games": [r for g in others for r in head(self.load_rows(f"data/{g}", "heldout"), n // len(others))],
            }
            table = analyze_activations(self.base_path, self.models[f"{kind}/{game}"].adapter, data, folder / "out")
            return {"table": table}

        deps = ["base", f"train/{kind}/{game}", "data/general"] + [f"data/{g}" for g in self.cfg.games]
        self.stage(f"analysis/{kind}/{game}", {"n": n}, run, deps)

    def final_merges(self) -> list[str]:
        """The merges of every game's routed adapter: one-shot, and the last step of each iterative order."""
        last = f"/{len(self.cfg.games)}"
        return [name for name, *_ in self.merge_jobs() if name.startswith("merge/") or
                (name.startswith("iter") and name.endswith(last))]

    def analyze_interference(self) -> None:
        """Interference in activations (stage ``analysis/interference``): per pair of routed adapters
        ``‖ΔW_j X_i‖ / ‖ΔW_i X_i‖`` on task i's rows, and per merge ``‖(ΔW_M − ΔW_i) X_i‖ / ‖ΔW_i X_i‖``
        (:func:`ilora.merge.interference.activation_interference`), from the adapters' Grams."""
        from ilora.merge.interference import adapter_interference

        games, merges = list(self.cfg.games), self.final_merges()
        for model in [f"grams/{g}" for g in games] + merges:
            self.ensure(model)

        def run(folder: Path):
            adapters = [self.models[f"grams/{g}"].adapter for g in games]
            states = [self.models[m].merged for m in merges]
            stats = adapter_interference(adapters, states)
            (folder / "interference.json").write_text(json.dumps(stats, indent=1))
            merged = {m: stats["merged"][str(path)] for m, path in zip(merges, states)}
            return {"games": games, "ratio": stats["ratio"], "own": stats["own"], "merged": merged}

        deps = [f"grams/{g}" for g in games] + [self.stage_of(m) for m in merges]
        self.stage("analysis/interference", {"merges": merges}, run, deps)

    # ------------------------------------------------------------- scheduling
    def jobs(self) -> list[Job]:
        """Every stage after ``base`` as a job: what it reads, its tier and its estimated cost."""
        d, t, e, games = self.cfg.data, self.cfg.train, self.cfg.eval, self.cfg.games
        data = (*[f"data/{g}" for g in games], "data/general")
        collect = (d.episodes + d.heldout_episodes) * d.max_steps * SCRIPTED_STEP_SECONDS
        jobs = [Job(f"data/{g}", "collect", (g,), tier=0, cost=collect) for g in games]
        general_rows = d.general_rows + d.general_eval_rows
        jobs.append(Job("data/general", "general_data", tier=0, cost=general_rows * GENERAL_ROW_SECONDS))
        for spec in self.training_jobs():
            cost = (spec.steps or t.max_steps) * t.batch_size * TRAIN_ROW_SECONDS
            cost *= ROUTED_COST_FACTOR if spec.routed else 1
            cost *= spec.steps_share
            deps = data + tuple(self.stage_of(m) for m in spec.starts_from)
            jobs.append(Job(f"train/{spec.name}", "train", (spec,), deps, tier=1, cost=cost))
        for name, inputs, method, options in self.merge_jobs():
            deps = tuple(self.stage_of(m) for m in inputs)
            jobs.append(Job(name, "merge", (name, inputs, method, options), deps, local=True))
        episode_steps = e.max_frames / DEFAULT_FRAME_SKIP
        reference = 2 * own_episodes(e) * episode_steps * SCRIPTED_STEP_SECONDS  # random and expert
        jobs += [Job(f"eval/reference/{g}", "evaluate_reference", (g,), tier=2, cost=reference) for g in games]
        for name, played in self.eval_plan().items():
            own = name.startswith(("plain/", "routed/"))
            episodes = e.episodes * len(played) + (own_episodes(e) - e.episodes if own else 0)
            episodes += e.episodes if own and e.blank_check and name.startswith("routed/") else 0
            deps = data + (() if name == "base" else (self.stage_of(name),))
            cost = episodes * episode_steps * AGENT_STEP_SECONDS
            jobs.append(Job(f"eval/{name}", "evaluate", (name, played), deps, tier=3, cost=cost))
        for kind in ("plain", "routed") if self.cfg.routed_games() else ("plain",):
            deps = (f"train/{kind}/{games[0]}", *data)
            jobs.append(Job(f"analysis/{kind}/{games[0]}", "analyze", (kind,), deps, tier=4, cost=5, local=True))
        routed = tuple(f"train/routed/{g}" for g in games)
        if self.cfg.tuned_merge.enabled:
            search = self.cfg.tuned_merge.search
            cost = search.trials * len(search.strategies) * len(games) * search.rows * TRIAL_ROW_SECONDS
            jobs.append(Job("tuned-merge", "tuned_merge", (), (*routed, *data), tier=2, cost=cost))
        for rule in self.cfg.selection.rules:
            cost = len(games) * e.episodes * episode_steps * AGENT_STEP_SECONDS * SELECTION_COST_FACTOR
            jobs.append(Job(f"eval/select/{rule}", "evaluate_selection", (rule,), (*routed, *data), tier=3, cost=cost))
        if self.cfg.adapters.routed:  # the Grams and the interference of every game's routed adapter
            grams_cost = 2 * self.cfg.merge.grams_rows * GENERAL_ROW_SECONDS
            jobs += [Job(f"grams/{g}", "grams", (g,), (f"train/routed/{g}", *data), tier=2, cost=grams_cost) for g in games]
            deps = (*[f"grams/{g}" for g in games], *[self.stage_of(m) for m in self.final_merges()])
            jobs.append(Job("analysis/interference", "analyze_interference", (), deps, tier=4, cost=5, local=True))
        return jobs

    def _call(self, job: Job) -> None:
        getattr(self, job.method)(*job.args)

    def _registered(self, job: Job) -> bool:
        """Re-enter ``job`` without computing: True (and its model registered) when its stage is cached."""
        self.runner.compute = False
        try:
            self._call(job)
            return True
        except StageNotCached:
            return False
        finally:
            self.runner.compute = True

    def run_report(self) -> Path:
        from ilora.experiment.report import write_report

        deps = [s for s in self.runner.all_stages() if not s.startswith("report")]
        # How many processes and threads ran the stages does not change the report.
        settings = {k: v for k, v in to_dict(self.cfg).items() if k not in ("workers", "threads")}
        folder = self.stage("report", settings, lambda folder: write_report(self, folder), deps)
        return folder / "REPORT.md"

    def run(self) -> Path:
        """Run (or resume) every stage of this replicate and its report."""
        run_replicates([self])
        return self.run_report()


def head(rows, n: int):
    """The first ``n`` rows of a dataset (all of them when it has fewer)."""
    return rows.select(range(min(n, len(rows))))


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (an adapter's weights are not copied), copying where links fail."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def iterative_name(method: str, order: list[str], k: int) -> str:
    """The model after merging the first ``k`` games of ``order`` one at a time with ``method``
    (I-LoRA's keep the names of earlier runs: ``iter/<order>/<k>``)."""
    prefix = "iter" if method == "ilora" else f"iter-{method}"
    return f"{prefix}/{'-'.join(order)}/{k}"


def replicate_configs(config: ExperimentConfig) -> list[ExperimentConfig]:
    """One config per replicate: ``config`` itself without ``seeds``, else one per seed in
    ``run_dir/seed-<s>`` (each replicate has its own data, adapters, merges and play)."""
    if config.seeds is None:
        return [config]
    return [
        dataclasses.replace(config, seed=s, seeds=None, run_dir=str(Path(config.run_dir) / f"seed-{s}"))
        for s in config.seeds
    ]


def run_replicates(experiments: list[Experiment]) -> None:
    """Run every stage of the replicates, scheduled together over the first one's workers.

    Jobs are keyed ``<run_dir>:<stage>`` so that the replicates' stages of the same name stay
    apart; cached stages are only registered, the others are computed by worker processes
    (or here, when the job is local or there is one worker).
    """
    first = experiments[0]
    if first.cfg.threads:
        import torch

        torch.set_num_threads(first.cfg.threads)
    owners: dict[str, tuple[Experiment, Job]] = {}
    keyed_jobs = []
    planned = [experiment.jobs() for experiment in experiments]  # a config the stages cannot honour fails here
    for group, (experiment, jobs) in enumerate(zip(experiments, planned)):
        experiment.run_base()
        tag = f"{experiment.cfg.run_dir}:"
        for job in jobs:
            keyed = dataclasses.replace(job, key=tag + job.key, deps=tuple(tag + d for d in job.deps), group=group)
            keyed_jobs.append(keyed)
            owners[keyed.key] = (experiment, job)
    schedule = Schedule(keyed_jobs)
    labels = {  # how the progress lines name a stage: with its replicate's folder when there are several
        key: job.key if len(experiments) == 1 else f"{Path(x.cfg.run_dir).name}/{job.key}"
        for key, (x, job) in owners.items()
    }
    start = time.time()
    pool = None
    running: dict[Future, Job] = {}
    try:
        while not schedule.finished:
            started = False
            for keyed in schedule.ready():
                experiment, job = owners[keyed.key]
                if experiment._registered(job):
                    schedule.finish(keyed, computed=False)
                elif job.local or first.workers <= 1:
                    with output_to(stage_log(experiment.cfg, job.key)):
                        experiment._call(job)
                    schedule.finish(keyed)
                    _progress(first.log, schedule, start, labels[keyed.key])
                elif len(running) < first.workers:
                    if pool is None:
                        import multiprocessing

                        pool = ProcessPoolExecutor(first.workers, mp_context=multiprocessing.get_context("spawn"))
                    schedule.start(keyed)
                    runner = experiment.runner
                    running[pool.submit(_run_job, experiment.cfg, runner.force, runner.redone, job)] = keyed
                else:
                    continue
                started = True
            if not running:
                if not started:
                    raise RuntimeError(f"no stage can start; waiting: {sorted(set(schedule.jobs) - schedule.done)}")
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                keyed = running.pop(future)
                experiment, job = owners[keyed.key]
                try:
                    future.result()
                except Exception as err:  # a worker's error stops the run here, naming the stage's log
                    raise RuntimeError(f"stage {keyed.key} failed; its output: {stage_log(experiment.cfg, job.key)}") from err
                experiment.runner.redone.add(job.key)
                if not experiment._registered(job):
                    raise RuntimeError(f"stage {keyed.key} finished in a worker but its record does not match")
                schedule.finish(keyed)
                _progress(first.log, schedule, start, labels[keyed.key])
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _progress(log: Callable[[str], None], schedule: Schedule, start: float, stage: str) -> None:
    elapsed = time.time() - start
    eta = schedule.eta_seconds(elapsed)
    left = f", about {eta / 60:.0f} min left" if eta is not None else ""
    log(f"[{elapsed / 60:5.1f} min] {stage} done; {len(schedule.done)}/{len(schedule.jobs)} stages done{left}")


def task_matched_steps(steps: int, n_task: int, n_general: int) -> int:
    """Steps at which a routed mix of ``n_task`` task and ``n_general`` general rows has shown as
    many task rows (in expectation) as ``steps`` plain steps over task rows alone.

    Routed batches are drawn from the shuffled mix, so only a share ``n_task / (n_task +
    n_general)`` of their rows are task rows; with the same step count a routed adapter would
    learn its task from fewer examples than the plain adapter it is compared with.
    """
    return math.ceil(steps * (n_task + n_general) / n_task)


def _run_job(config: ExperimentConfig, force: tuple[str, ...], redone: set[str], job: Job) -> None:
    """Worker-process entry of :func:`run_replicates`: compute one job's stage.

    ``redone`` names the stages already recomputed in this run, so that a forced prefix does not
    make the worker redo the stages this job reads (they are only re-entered to load their models).
    Everything the stage prints (progress bars, the emulator's banner) goes to its log file
    (:func:`stage_log`), so the terminal keeps the parent's one line per stage.
    """
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    experiment = Experiment(config, force, workers=1)
    experiment.runner.redone |= redone
    with output_to(stage_log(config, job.key)):
        experiment._call(job)


def stage_log(config: ExperimentConfig, stage: str) -> Path:
    """Where a stage computed by a worker process writes its output: ``run_dir/logs/<stage>.log``."""
    return Path(config.run_dir) / "logs" / f"{stage.replace('/', '__')}.log"


@contextlib.contextmanager
def output_to(path: Path):
    """Send this process's stdout and stderr (Python's and the C libraries') to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def print_now(line: str) -> None:
    """The default progress log: ``print``, flushed."""
    print(line, flush=True)


def run_experiment(
    config: ExperimentConfig, force: tuple[str, ...] = (), log: Callable[[str], None] = print_now
) -> Path:
    """Run (or resume) the experiment; returns the path of its ``REPORT.md`` (with ``seeds``,
    the report over seeds in ``run_dir/report``, beside each replicate's own)."""
    replicates = [Experiment(c, force, log) for c in replicate_configs(config)]
    if config.seeds is None:
        return replicates[0].run()
    from ilora.experiment.seed_report import write_seed_report

    run_replicates(replicates)
    for experiment in replicates:
        experiment.run_report()
    return write_seed_report(config, replicates, Path(config.run_dir) / "report")
