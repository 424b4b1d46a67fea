"""The end-to-end experiment: base model -> data -> adapters -> merges -> play -> report.

Every unit of work is a cached stage (``ilora.experiment.stages``) described by a typed spec of
the experiment's plan (``ilora.experiment.plan``, which also names the models): rerunning the
same config skips what is done, an interrupted run resumes, ``--force PREFIX`` redoes stages,
and a deleted stage folder is redone together with everything that read it. Stages not cached
run as Ray tasks (``ilora.experiment.ray_runner``), on this machine or a cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ilora.atari.games import DEFAULT_FRAME_SKIP
from ilora.config import to_dict
from ilora.errors import IloraError
from ilora.experiment.config import ExperimentConfig
from ilora.experiment.evaluation import own_episodes, resolve_device
from ilora.experiment.plan import (
    Activations,
    AdapterSpec,
    EvalSpec,
    GameData,
    GeneralData,
    Grams,
    Interference,
    MergeSpec,
    Reference,
    Selection,
    StageSpec,
    TunedMerge,
    build_plan,
)
from ilora.experiment.plan import iterative_name as iterative_name  # re-exported: results.py reads it here
from ilora.experiment.schedule import (
    AGENT_STEP_SECONDS,
    GENERAL_ROW_SECONDS,
    ROUTED_COST_FACTOR,
    SCRIPTED_STEP_SECONDS,
    SELECTION_COST_FACTOR,
    TRAIN_ROW_SECONDS,
    TRIAL_ROW_SECONDS,
    Job,
    LocalExecutor,
    Resources,
    RunOutcome,
    Schedule,
    run_jobs,
)
from ilora.experiment.stages import StageNotCached, StageRunner
from ilora.fileio import file_sha256
from ilora.models.load import builtin_base


@dataclass
class ModelSpec:
    """How to build one evaluated model: the base plus an adapter or a merged state (or nothing)."""

    adapter: Path | None = None
    merged: Path | None = None


@dataclass(frozen=True)
class ExecutionSettings:
    """Where the stages that are not cached run (how, not what: no stage's settings).

    Attributes:
        executor: ``ray`` (Ray tasks) or ``local`` (this machine's worker processes, where Ray
            cannot start: see :class:`~ilora.experiment.schedule.LocalExecutor`).
        address: a Ray cluster to run on; ``None``: ``RAY_ADDRESS`` when set, else this machine.
        gpus: GPUs each model stage (training, play, Grams, search) holds; 0 on a CPU machine.
    """

    executor: Literal["ray", "local"] = "ray"
    address: str | None = None
    gpus: float = 0.0


class Experiment:
    """Runs the stages of one experiment config in its run folder."""

    def __init__(
        self, config: ExperimentConfig, force: tuple[str, ...] = (), log: Callable[[str], None] | None = None,
        workers: int | None = None, execution: ExecutionSettings = ExecutionSettings(),
    ):
        self.cfg = config
        log = log or print_now  # worker processes print to a pipe or file too: flush every line
        self.runner = StageRunner(Path(config.run_dir), force=force, log=log)
        self.log = log
        self.workers = config.workers if workers is None else workers
        self.execution = execution
        self.plan = build_plan(config)  # a config the stages cannot honour fails here
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

    def collect(self, spec: GameData) -> None:
        """Expert data of a game (stage ``data/<game>``): training and held-out episodes."""
        from ilora.atari.collect import ROW_LAYOUT, collect_dataset

        d, game = self.cfg.data, spec.game

        def run(folder: Path):
            opts = dict(object_text=d.object_text, reasoning=d.reasoning, max_steps=d.max_steps)
            train = collect_dataset(game, d.episodes, self.cfg.seed, **opts)
            train.save_to_disk(str(folder / "train"))
            held = collect_dataset(game, d.heldout_episodes, self.cfg.seed + 10_000, **opts)
            held.save_to_disk(str(folder / "heldout"))
            return {"train_rows": len(train), "heldout_rows": len(held)}

        collection = {k: getattr(d, k) for k in ("episodes", "heldout_episodes", "max_steps", "object_text", "reasoning")}
        self.stage(spec.stage, {**collection, "game": game, "seed": self.cfg.seed, "layout": ROW_LAYOUT}, run, spec.deps)

    def general_data(self, spec: GeneralData) -> None:
        """General training and benchmark rows (stage ``data/general``)."""
        from ilora.general.data import generate_general

        d = self.cfg.data

        def run(folder: Path):
            generate_general(d.general_rows, self.cfg.seed, "train").save_to_disk(str(folder / "train"))
            generate_general(d.general_eval_rows, self.cfg.seed, "test").save_to_disk(str(folder / "test"))
            return {"train_rows": d.general_rows, "test_rows": d.general_eval_rows}

        self.stage(spec.stage, {"rows": d.general_rows, "eval": d.general_eval_rows, "seed": self.cfg.seed}, run, spec.deps)

    def train(self, spec: AdapterSpec) -> None:
        """Train adapter ``spec.name`` on its task games' data; general rows join when the weights route them."""
        from ilora.prompt_settings import PromptSettings
        from ilora.routing.collator import Source
        from ilora.routing.train import train_adapter
        from ilora.routing.trainer import RoutingConfig

        t, d = self.cfg.train, self.cfg.data
        task_games, others, steps, routed = list(spec.task), list(spec.others), spec.steps, spec.routed
        settings = {"train": t.read_by_adapter(routed), "weights": dataclasses.asdict(spec.weights), "task": task_games,
                    "others": others, "steps": steps}
        if routed:
            settings["other_game_rows"] = d.other_game_rows
        for model in spec.starts_from:
            self.ensure(model)
        fold = [self.models[m].adapter for m in spec.fold]
        init = self.models[spec.init].adapter if spec.init else None
        if spec.starts_from:
            settings["starts_from"] = {"fold": list(spec.fold), "init": spec.init, "steps_share": spec.steps_share}

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
                **dataclasses.asdict(spec.weights),
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

        self.stage(spec.stage, settings, fit, spec.deps)
        self.models[spec.name] = ModelSpec(adapter=self.runner.folder(spec.stage) / "adapter")

    def merge(self, spec: MergeSpec) -> None:
        """Merge trained adapters (or, iteratively, a merged state plus one adapter)."""
        from ilora.merge import merge_adapters

        for source in spec.inputs:
            self.ensure(source)

        def run(folder: Path):
            inputs = [self.models[a].adapter or self.models[a].merged for a in spec.inputs]
            state = merge_adapters(
                [str(p) for p in inputs], spec.method, base=self.base_path, out=folder / "state", progress=False,
                **spec.options,
            )
            return {"modules": len(state.deltas)}

        self.stage(spec.stage, spec.settings(), run, spec.deps)
        self.models[spec.name] = ModelSpec(merged=self.runner.folder(spec.stage) / "state")

    def grams(self, spec: Grams) -> None:
        """A game's routed adapter with its input Grams on task and general rows (stage
        ``grams/<game>``), the input of data-aware merges and of the interference analysis."""
        from ilora.routing.grams import compute_adapter_grams

        game = spec.game
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

        self.stage(spec.stage, {"rows": n}, run, spec.deps)
        self.models[spec.stage] = ModelSpec(adapter=self.runner.folder(spec.stage) / "adapter")

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

    def tuned_merge(self, spec: TunedMerge) -> None:
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

        settings = {"search": search, "validation_from": self.cfg.eval.agreement_rows}
        self.stage(spec.stage, settings, run, spec.deps)
        self.models[spec.stage] = ModelSpec(merged=self.runner.folder(spec.stage) / "state")

    def evaluate_selection(self, spec: Selection) -> None:
        """Play every game with a skill chosen per step by a rule among the routed adapters
        (stage ``eval/select/<rule>``), with the rule's pick accuracy and cost on held-out rows."""
        from ilora.experiment.evaluation import evaluate_selection

        s, games, rule = self.cfg.selection, list(self.cfg.games), spec.rule
        adapters = self.routed_adapters()

        def run(folder: Path):
            gate_rows = {g: self.validation_rows(g, s.gate_rows) for g in games} if rule == "gate" else None
            heldout = {g: self.load_rows(f"data/{g}", "heldout") for g in games}
            return evaluate_selection(self.base_path, adapters, rule, self.cfg, folder, heldout, gate_rows)

        settings = {"eval": self.eval_settings(own_game=False), "rule": rule, "seed": self.cfg.seed,
                    **({"gate": s.gate, "gate_rows": s.gate_rows} if rule == "gate" else {})}
        self.stage(spec.stage, settings, run, spec.deps)

    def ensure(self, model: str) -> None:
        """Register ``model`` (and the models it was made from) from their finished, cached stages."""
        if model not in self.models:
            self.compute(self.plan.model(model))

    def compute(self, spec: StageSpec) -> None:
        """Run (or, cached, only register) the stage of ``spec``."""
        match spec:
            case AdapterSpec():
                self.train(spec)
            case MergeSpec():
                self.merge(spec)
            case EvalSpec():
                self.evaluate(spec)
            case GameData():
                self.collect(spec)
            case GeneralData():
                self.general_data(spec)
            case Grams():
                self.grams(spec)
            case TunedMerge():
                self.tuned_merge(spec)
            case Reference():
                self.evaluate_reference(spec)
            case Selection():
                self.evaluate_selection(spec)
            case Activations():
                self.analyze(spec)
            case Interference():
                self.analyze_interference(spec)
            case _:
                raise TypeError(f"not a stage spec: {spec!r}")

    # -------------------------------------------------------------- evaluation
    def eval_settings(self, own_game: bool) -> dict:
        """The play settings an evaluation stage depends on (own-game episodes only where played)."""
        settings = to_dict(self.cfg.eval)
        settings.pop("cross_games")  # it decides which games a stage plays, and those are in its settings
        if not own_game or self.cfg.eval.own_game_episodes is None:
            settings.pop("own_game_episodes")
        return settings

    def evaluate_reference(self, spec: Reference) -> None:
        """Random and expert play of a game (stage ``eval/reference/<game>``)."""
        from ilora.experiment.evaluation import evaluate_reference

        e, game = self.cfg.eval, spec.game
        self.stage(
            spec.stage,
            {"eval": self.eval_settings(own_game=True), "seed": self.cfg.seed, "game": game},
            lambda folder: evaluate_reference(game, e, self.cfg.seed, folder),
            spec.deps,
        )

    def evaluate(self, spec: EvalSpec) -> None:
        """Play a model on its games and score it (stage ``eval/<model>``)."""
        from ilora.experiment.evaluation import evaluate_model

        if spec.model != "base":
            self.ensure(spec.model)
        e, games = self.cfg.eval, list(spec.games)
        model = self.models.get(spec.model, ModelSpec())

        def run(folder: Path):
            return evaluate_model(
                self.base_path,
                model,
                games,
                e,
                self.cfg,
                folder,
                heldout={g: self.load_rows(f"data/{g}", "heldout") for g in games},
                general=self.load_rows("data/general", "test"),
                own_game=spec.own_game,
                blank_check=spec.blank,
            )

        settings = {"eval": self.eval_settings(spec.own_game is not None), "games": games, "blank": spec.blank,
                    "seed": self.cfg.seed}
        self.stage(spec.stage, settings, run, spec.deps)

    def analyze(self, spec: Activations) -> None:
        """LoRA activation norms of the first game's plain or routed adapter on task, general and other-game rows."""
        from ilora.routing.analyze import analyze_activations

        n, kind, game = self.cfg.eval.activation_rows, spec.kind, spec.game
        others = [g for g in self.cfg.games if g != game]
        self.ensure(f"{kind}/{game}")

        def run(folder: Path):
            data = {
                "task": head(self.load_rows(f"data/{game}", "heldout"), n),
                "general": head(self.load_rows("data/general", "test"), n),
                "other games": [r for g in others for r in head(self.load_rows(f"data/{g}", "heldout"), n // len(others))],
            }
            table = analyze_activations(self.base_path, self.models[f"{kind}/{game}"].adapter, data, folder / "out")
            return {"table": table}

        self.stage(spec.stage, {"n": n}, run, spec.deps)

    def analyze_interference(self, spec: Interference) -> None:
        """Interference in activations (stage ``analysis/interference``): per pair of routed adapters
        ``‖ΔW_j X_i‖ / ‖ΔW_i X_i‖`` on task i's rows, and per merge ``‖(ΔW_M − ΔW_i) X_i‖ / ‖ΔW_i X_i‖``
        (:func:`ilora.merge.interference.activation_interference`), from the adapters' Grams."""
        from ilora.merge.interference import adapter_interference

        games, merges = list(self.cfg.games), list(spec.merges)
        for model in [f"grams/{g}" for g in games] + merges:
            self.ensure(model)

        def run(folder: Path):
            adapters = [self.models[f"grams/{g}"].adapter for g in games]
            states = [self.models[m].merged for m in merges]
            stats = adapter_interference(adapters, states)
            (folder / "interference.json").write_text(json.dumps(stats, indent=1))
            merged = {m: stats["merged"][str(path)] for m, path in zip(merges, states)}
            return {"games": games, "ratio": stats["ratio"], "own": stats["own"], "merged": merged}

        self.stage(spec.stage, {"merges": merges}, run, spec.deps)

    # ------------------------------------------------------------- scheduling
    def jobs(self) -> list[Job]:
        """Every stage of the plan as a job: what it reads besides ``base``, its estimated cost and resources."""
        return [self.job(spec) for spec in self.plan.specs()]

    def job(self, spec: StageSpec) -> Job:
        """``spec`` as a job: its estimated single-core seconds, whether it runs in the scheduling
        process (quick stages) and what it holds."""
        d, t, e, games = self.cfg.data, self.cfg.train, self.cfg.eval, self.cfg.games
        episode_steps = e.max_frames / DEFAULT_FRAME_SKIP
        cost, local, model_stage = 1.0, False, True
        match spec:
            case GameData():
                cost, model_stage = (d.episodes + d.heldout_episodes) * d.max_steps * SCRIPTED_STEP_SECONDS, False
            case GeneralData():
                cost, model_stage = (d.general_rows + d.general_eval_rows) * GENERAL_ROW_SECONDS, False
            case AdapterSpec():
                cost = (spec.steps or t.max_steps) * t.batch_size * TRAIN_ROW_SECONDS * spec.steps_share
                cost *= ROUTED_COST_FACTOR if spec.routed else 1
            case MergeSpec():
                local = True
            case Reference():
                model_stage = False
                cost = 2 * own_episodes(e) * episode_steps * SCRIPTED_STEP_SECONDS  # random and expert
            case EvalSpec():
                own = spec.own_game is not None
                episodes = e.episodes * len(spec.games) + (own_episodes(e) - e.episodes if own else 0)
                episodes += e.episodes if spec.blank else 0
                cost = episodes * episode_steps * AGENT_STEP_SECONDS
            case Activations() | Interference():
                cost, local = 5.0, True
            case TunedMerge():
                search = self.cfg.tuned_merge.search
                cost = search.trials * len(search.strategies) * len(games) * search.rows * TRIAL_ROW_SECONDS
            case Selection():
                cost = len(games) * e.episodes * episode_steps * AGENT_STEP_SECONDS * SELECTION_COST_FACTOR
            case Grams():
                cost = 2 * self.cfg.merge.grams_rows * GENERAL_ROW_SECONDS
        resources = Resources(cpus=max(1, self.cfg.threads), gpus=self.execution.gpus if model_stage else 0.0)
        deps = tuple(d for d in spec.deps if d != "base")  # base is built before any job
        return Job(spec.stage, deps=deps, cost=cost, local=local, spec=spec, resources=resources)

    def registered(self, spec: StageSpec) -> bool:
        """Re-enter ``spec``'s stage without computing: True (and its model registered) when it is cached."""
        self.runner.compute = False
        try:
            self.compute(spec)
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
        """Run (or resume) every stage of this replicate and its report.

        Raises:
            StagesFailed: a stage failed (the others that did not read it were run; no report).
        """
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


def replicate_configs(config: ExperimentConfig) -> list[ExperimentConfig]:
    """One config per replicate: ``config`` itself without ``seeds``, else one per seed in
    ``run_dir/seed-<s>`` (each replicate has its own data, adapters, merges and play)."""
    if config.seeds is None:
        return [config]
    return [
        dataclasses.replace(config, seed=s, seeds=None, run_dir=str(Path(config.run_dir) / f"seed-{s}"))
        for s in config.seeds
    ]


class StagesFailed(IloraError):
    """Stages failed; the stages that did not read them ran."""

    def __init__(self, outcome: RunOutcome, labels: dict[str, str]):
        lines = [f"{len(outcome.failed)} stage(s) failed:"]
        lines += [f"  {labels[f.stage]}: {f.error} (log: {f.log})" for f in outcome.failed]
        if outcome.blocked:
            lines.append(f"not run, as they read a failed stage: {', '.join(labels[k] for k in outcome.blocked)}")
        super().__init__("\n".join(lines))
        self.outcome = outcome


@dataclass
class _Replicates:
    """The :class:`~ilora.experiment.schedule.JobHost` of :func:`run_replicates`: jobs keyed
    ``<run_dir>:<stage>``, each owned by its replicate's experiment."""

    owners: dict[str, Experiment]

    def register(self, job: Job, computed_elsewhere: bool = False) -> bool:
        experiment = self.owners[job.key]
        if computed_elsewhere:
            experiment.runner.redone.add(job.spec.stage)
        return experiment.registered(job.spec)

    def run_here(self, job: Job) -> None:
        experiment = self.owners[job.key]
        with logged_to(self.log_path(job)):
            experiment.compute(job.spec)

    def remote_call(self, job: Job) -> tuple[Callable[..., Any], tuple]:
        experiment = self.owners[job.key]
        runner = experiment.runner
        return compute_stage, (experiment.cfg, runner.force, set(runner.redone), job.spec, os.getcwd())

    def log_path(self, job: Job) -> Path:
        experiment = self.owners[job.key]
        return stage_log(experiment.cfg, job.spec.stage)


def run_replicates(experiments: list[Experiment]) -> None:
    """Run every stage of the replicates, scheduled together over the first one's workers.

    Jobs are keyed ``<run_dir>:<stage>`` so that the replicates' stages of the same name stay
    apart; cached stages are only registered, quick ones (and all of them with one worker) are
    computed here, the others as Ray tasks (:class:`~ilora.experiment.ray_runner.RayExecutor`),
    ``workers`` at a time on this machine, as many as the cluster's CPUs hold on a cluster.

    Raises:
        StagesFailed: a stage failed; every stage that did not read it was run.
    """
    from ilora.experiment.ray_runner import RayExecutor

    first = experiments[0]
    if first.cfg.threads:
        import torch

        torch.set_num_threads(first.cfg.threads)
    owners: dict[str, Experiment] = {}
    labels: dict[str, str] = {}  # how progress lines name a stage: with its replicate's folder when there are several
    keyed_jobs = []
    for group, experiment in enumerate(experiments):
        experiment.run_base()
        tag = f"{experiment.cfg.run_dir}:"
        for job in experiment.jobs():
            keyed = dataclasses.replace(job, key=tag + job.key, deps=tuple(tag + d for d in job.deps), group=group)
            keyed_jobs.append(keyed)
            owners[keyed.key] = experiment
            labels[keyed.key] = job.key if len(experiments) == 1 else f"{Path(experiment.cfg.run_dir).name}/{job.key}"

    execution, slots, made = first.execution, first.workers, []
    if execution.executor == "local":
        factory = functools.partial(LocalExecutor, first.workers)
    elif execution.address or os.environ.get("RAY_ADDRESS"):  # a cluster: as many stages at a time as its CPUs hold
        made.append(RayExecutor(execution.address))
        slots = made[0].capacity(keyed_jobs[0].resources) if keyed_jobs else 1
        factory = None
    else:
        factory = functools.partial(RayExecutor, num_cpus=first.workers)

    def make_executor():  # on this machine, started only when a stage is not cached; closed after the run
        if not made:
            made.append(factory())
        return made[0]

    try:
        outcome = run_jobs(Schedule(keyed_jobs), _Replicates(owners), make_executor, slots, first.log,
                           label=lambda job: labels[job.key])
    finally:
        for executor in made:
            executor.close()
    if outcome.failed:
        raise StagesFailed(outcome, labels)


def task_matched_steps(steps: int, n_task: int, n_general: int) -> int:
    """Steps at which a routed mix of ``n_task`` task and ``n_general`` general rows has shown as
    many task rows (in expectation) as ``steps`` plain steps over task rows alone.

    Routed batches are drawn from the shuffled mix, so only a share ``n_task / (n_task +
    n_general)`` of their rows are task rows; with the same step count a routed adapter would
    learn its task from fewer examples than the plain adapter it is compared with.
    """
    return math.ceil(steps * (n_task + n_general) / n_task)


def compute_stage(config: ExperimentConfig, force: tuple[str, ...], redone: set[str], spec: StageSpec, cwd: str) -> None:
    """Ray task of :func:`run_replicates`: compute one stage in a worker.

    ``redone`` names the stages already recomputed in this run, so that a forced prefix does not
    make the worker redo the stages this one reads (they are only re-entered to load their models).
    Everything the stage prints (progress bars, the emulator's banner, an error's traceback) goes
    to its log file (:func:`stage_log`), so the terminal keeps the driver's one line per stage.
    ``cwd`` is the driver's folder, which a relative ``run_dir`` is relative to.
    """
    os.chdir(cwd)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    experiment = Experiment(config, force, workers=1)
    experiment.runner.redone |= redone
    with logged_to(stage_log(config, spec.stage)):
        experiment.compute(spec)


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


@contextlib.contextmanager
def logged_to(path: Path):
    """:func:`output_to` ``path``, with the traceback of an error raised inside written there too."""
    with output_to(path):
        try:
            yield
        except BaseException:
            traceback.print_exc()
            raise


def print_now(line: str) -> None:
    """The default progress log: ``print``, flushed."""
    print(line, flush=True)


def run_experiment(
    config: ExperimentConfig, force: tuple[str, ...] = (), log: Callable[[str], None] = print_now,
    execution: ExecutionSettings = ExecutionSettings(),
) -> Path:
    """Run (or resume) the experiment; returns the path of its ``REPORT.md`` (with ``seeds``,
    the report over seeds in ``run_dir/report``, beside each replicate's own).

    Raises:
        StagesFailed: a stage failed (the stages that did not read it were run; no report).
    """
    replicates = [Experiment(c, force, log, execution=execution) for c in replicate_configs(config)]
    if config.seeds is None:
        return replicates[0].run()
    from ilora.experiment.seed_report import write_seed_report

    run_replicates(replicates)
    for experiment in replicates:
        experiment.run_report()
    return write_seed_report(config, replicates, Path(config.run_dir) / "report")
