"""The experiment as a plan: one typed spec per stage, each knowing its stage name and the stages it reads.

:func:`build_plan` turns an :class:`~ilora.experiment.config.ExperimentConfig` into a
:class:`Plan`; the pipeline runs its specs (``Experiment.compute``) and the scheduler orders
them by their ``deps`` (``Experiment.plan`` is there for the report to read as well). A spec's
``deps`` are exactly what its stage hashes (``stage.json``'s ``deps``), so they are written once,
here; its settings are only what it reads (a plain adapter is not retrained when ``eps_norm``
changes).

Model names (and the report's): ``base``, ``plain/<game>`` (single-task LoRA), ``routed/<game>``
(routing-tuned LoRA), ``joint`` (one LoRA on all games' data), ``merge/<method>`` (routed adapters
merged all at once), ``iter/<order>/<k>`` (I-LoRA merging one game at a time, after k games),
``keep/<ratio>`` (I-LoRA with another keep ratio), ``ablation/<variant>/<game>`` and
``ablation-merge/<variant>`` (loss ablations on a pair of games), ``refit/<game>`` (a routed
adapter trained on with the other games' routed adapters folded into the base),
``continual/<game>`` (trained, in the order of games, with the earlier games' continual adapters
folded into the base), ``merge-refit/<method>`` and ``merge-continual/<method>`` (those adapters
merged all at once), ``tuned-merge`` (the routed adapters merged with a searched setting).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ilora.errors import IloraError
from ilora.experiment.config import ExperimentConfig, LossWeights

MergeKind = Literal["oneshot", "refit", "continual", "keep", "iterative", "ablation"]
AdapterFamily = Literal["plain", "routed", "joint", "ablation", "refit", "continual"]


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter the experiment trains (stage ``train/<name>``).

    Attributes:
        name: the model name (``plain/Pong``, ``routed/Pong``, ``joint``, ...).
        family: how it is trained: ``plain`` (one game, no general rows), ``routed``, ``joint`` (every
            game, no general rows), ``ablation`` (a loss variant), ``refit`` or ``continual``.
        task: the games whose rows get the LM loss.
        weights: the loss weights (``eps_kl = eps_norm = 0``: plain LoRA, no general rows).
        others: the other games whose rows join the general route (routed adapters only).
        steps: optimiser steps; ``None``: ``train.max_steps``, matched to task rows when routed.
        fold: adapters (model names) added to the base weights before training, frozen.
        init: the adapter (model name) training continues from; ``None``: a fresh LoRA.
        steps_share: the share of those steps this adapter takes.
        deps: the stages it reads.
    """

    name: str
    family: AdapterFamily
    task: tuple[str, ...]
    weights: LossWeights
    others: tuple[str, ...] = ()
    steps: int | None = None
    fold: tuple[str, ...] = ()
    init: str | None = None
    steps_share: float = 1.0
    deps: tuple[str, ...] = ()

    @property
    def stage(self) -> str:
        return f"train/{self.name}"

    @property
    def routed(self) -> bool:
        return self.weights.routed

    @property
    def starts_from(self) -> list[str]:
        """The adapters this one is trained on or from (folded ones, then the initial one)."""
        return [*self.fold, *([self.init] if self.init else [])]


@dataclass(frozen=True)
class MergeSpec:
    """One merge of trained adapters (or, iteratively, of a merged state and one adapter).

    Attributes:
        name: the model name, also its stage (``merge/ties``, ``iter/Pong-Breakout/2``, ...).
        inputs: the models merged, in order.
        method: the merge registry's method.
        options: the method's options (I-LoRA's keep ratio).
        kind: its family: ``oneshot`` (``merge/``), ``refit``, ``continual``, ``keep`` (the keep
            sweep), ``iterative`` (``iter*/``), ``ablation`` (the ablation pair's merges).
        games: the games whose adapters it holds (those it is played on).
        intermediate: an iterative merge before the last game of its order.
        deps: the stages it reads.
    """

    name: str
    inputs: tuple[str, ...]
    method: str
    options: dict[str, Any]
    kind: MergeKind
    games: tuple[str, ...]
    intermediate: bool = False
    deps: tuple[str, ...] = ()

    @property
    def stage(self) -> str:
        return self.name

    def settings(self) -> dict[str, Any]:
        """What the merge stage hashes."""
        return {"method": self.method, "inputs": list(self.inputs), "options": self.options}


@dataclass(frozen=True)
class EvalSpec:
    """One model played on games and scored (stage ``eval/<model>``).

    Attributes:
        model: the model name (``base`` for the base alone).
        games: the games it is played on.
        own_game: for a single-game adapter (plain, routed), its game: played for more episodes there.
        blank: also played with blanked frames.
        deps: the stages it reads.
    """

    model: str
    games: tuple[str, ...]
    own_game: str | None = None
    blank: bool = False
    deps: tuple[str, ...] = ()

    @property
    def stage(self) -> str:
        return f"eval/{self.model}"


@dataclass(frozen=True)
class GameData:
    """Expert data of one game: training and held-out episodes."""

    game: str
    deps: tuple[str, ...] = ()

    @property
    def stage(self) -> str:
        return f"data/{self.game}"


@dataclass(frozen=True)
class GeneralData:
    """General training and benchmark rows."""

    deps: tuple[str, ...] = ()
    stage: str = "data/general"


@dataclass(frozen=True)
class Grams:
    """A game's routed adapter with its input Grams (data-aware merges, interference)."""

    game: str
    deps: tuple[str, ...] = ()

    @property
    def stage(self) -> str:
        return f"grams/{self.game}"


@dataclass(frozen=True)
class TunedMerge:
    """The routed adapters merged with the setting a search found best on validation rows."""

    deps: tuple[str, ...] = ()
    stage: str = "tuned-merge"


@dataclass(frozen=True)
class Reference:
    """Random and expert play of one game (every retention's floor and the bar)."""

    game: str
    deps: tuple[str, ...] = ()

    @property
    def stage(self) -> str:
        return f"eval/reference/{self.game}"


@dataclass(frozen=True)
class Selection:
    """Every game played with one routed adapter chosen per step by ``rule``."""

    rule: str
    deps: tuple[str, ...] = ()

    @property
    def stage(self) -> str:
        return f"eval/select/{self.rule}"


@dataclass(frozen=True)
class Activations:
    """LoRA activation norms of the first game's ``kind`` adapter."""

    kind: str
    game: str
    deps: tuple[str, ...] = ()

    @property
    def stage(self) -> str:
        return f"analysis/{self.kind}/{self.game}"


@dataclass(frozen=True)
class Interference:
    """Interference in activations between the routed adapters and in each final merge."""

    merges: tuple[str, ...]
    deps: tuple[str, ...] = ()
    stage: str = "analysis/interference"


StageSpec = AdapterSpec | MergeSpec | EvalSpec | GameData | GeneralData | Grams | TunedMerge | Reference | Selection | Activations | Interference


@dataclass
class Plan:
    """Every stage of one replicate after ``base``.

    Attributes:
        adapters, merges, evals: the trained adapters, the merges, the played models.
        others: the remaining stages (data, Grams, references, selection, analyses, tuned merge).
    """

    adapters: tuple[AdapterSpec, ...]
    merges: tuple[MergeSpec, ...]
    evals: tuple[EvalSpec, ...]
    others: tuple[StageSpec, ...] = ()
    _by_model: dict[str, StageSpec] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_model = {s.name: s for s in (*self.adapters, *self.merges)}
        self._by_model.update({s.stage: s for s in self.others if isinstance(s, (Grams, TunedMerge))})

    def specs(self) -> list[StageSpec]:
        """Every spec: data first, then adapters, merges, the other stages and the evaluations."""
        data = [s for s in self.others if isinstance(s, (GameData, GeneralData))]
        rest = [s for s in self.others if not isinstance(s, (GameData, GeneralData))]
        return [*data, *self.adapters, *self.merges, *rest, *self.evals]

    def model(self, name: str) -> StageSpec:
        """The spec producing model ``name`` (an adapter, a merge, a Grams folder, the tuned merge).

        Raises:
            KeyError: no such model in this plan.
        """
        try:
            return self._by_model[name]
        except KeyError:
            raise KeyError(f"no model named {name!r} in this experiment") from None

    def stage_of(self, model: str) -> str:
        """The stage that produced ``model``."""
        return self.model(model).stage


def stage_kind(spec: StageSpec) -> str:
    """What a compute summary counts ``spec``'s stage under: ``data``, ``train/<family>``, ``merge``,
    ``tuned-merge``, ``grams``, ``eval`` (play and scoring) or ``analysis``."""
    match spec:
        case GameData() | GeneralData():
            return "data"
        case AdapterSpec():
            return f"train/{spec.family}"
        case MergeSpec():
            return "merge"
        case TunedMerge():
            return "tuned-merge"
        case Grams():
            return "grams"
        case EvalSpec() | Reference() | Selection():
            return "eval"
        case Activations() | Interference():
            return "analysis"
    raise TypeError(f"not a stage spec: {spec!r}")


def final_merges(merges: Iterable[MergeSpec]) -> list[str]:
    """The merges of every game's routed adapter: one-shot, and the last step of each iterative order."""
    return [m.name for m in merges if m.kind == "oneshot" or (m.kind == "iterative" and not m.intermediate)]


def iterative_name(method: str, order: list[str], k: int) -> str:
    """The model after merging the first ``k`` games of ``order`` one at a time with ``method``
    (I-LoRA's keep the names of earlier runs: ``iter/<order>/<k>``)."""
    prefix = "iter" if method == "ilora" else f"iter-{method}"
    return f"{prefix}/{'-'.join(order)}/{k}"


def continual_adapters(cfg: ExperimentConfig) -> list[str]:
    """The continual adapter of each game in order: the first game's is its routed adapter (a
    continual adapter with nothing to fold in is trained exactly like it)."""
    games = list(cfg.games)
    return [f"routed/{games[0]}", *[f"continual/{g}" for g in games[1:]]]


def adapter_specs(cfg: ExperimentConfig) -> list[AdapterSpec]:
    """Every adapter the experiment trains, each after the adapters it folds or starts from."""
    t, games = cfg.train, tuple(cfg.games)
    plain, routed = t.loss_weights.plain(), t.loss_weights
    factor = len(games) if t.joint_steps_factor is None else t.joint_steps_factor

    def spec(family: AdapterFamily, name: str, task: tuple[str, ...], weights: LossWeights, **kwargs) -> AdapterSpec:
        others = tuple(g for g in games if g not in task) if weights.routed else ()
        deps = ["base", *[f"data/{g}" for g in task + others], *(["data/general"] if weights.routed else [])]
        starts_from = [*kwargs.get("fold", ()), *([kwargs["init"]] if kwargs.get("init") else [])]
        deps += [f"train/{m}" for m in starts_from]  # only adapters are folded or continued
        return AdapterSpec(name, family, task, weights, others, deps=tuple(deps), **kwargs)

    specs = [spec("joint", "joint", games, plain, steps=int(t.max_steps * factor))] if cfg.adapters.joint else []
    specs += [spec("plain", f"plain/{g}", (g,), plain) for g in games]
    specs += [spec("routed", f"routed/{g}", (g,), routed) for g in cfg.routed_games()]
    for variant, weights in cfg.ablations.loss_weights(t).items():
        specs += [spec("ablation", f"ablation/{variant}/{g}", (g,), weights) for g in cfg.ablations.games]
    if cfg.refit.enabled:
        specs += [
            spec("refit", f"refit/{g}", (g,), routed, fold=tuple(f"routed/{o}" for o in games if o != g), init=f"routed/{g}",
                 steps_share=cfg.refit.steps_share)
            for g in games
        ]
    if cfg.continual.enabled:
        continual = continual_adapters(cfg)
        specs += [spec("continual", continual[k], (g,), routed, fold=tuple(continual[:k])) for k, g in enumerate(games) if k > 0]
    return specs


def merge_inputs(cfg: ExperimentConfig, method: str, games: list[str], kind: str = "routed") -> list[str]:
    """The ``kind`` adapters of ``games`` as a merge reads them: the routed ones with their Grams
    for a data-aware method.

    Raises:
        IloraError: a data-aware method for adapters other than the routed ones.
    """
    from ilora.merge.registry import method_class

    if method_class(method).needs_grams:
        if kind != "routed":
            raise IloraError(f"{kind}.methods: {method} needs input Grams, which are measured for routed adapters only")
        kind = "grams"
    if kind == "continual":
        return continual_adapters(cfg)
    return [f"{kind}/{g}" for g in games]


def merge_options(cfg: ExperimentConfig, method: str) -> dict[str, Any]:
    """The experiment's options for a merge method (I-LoRA's keep ratio; the registry's defaults otherwise)."""
    return {"keep": cfg.merge.keep} if method == "ilora" else {}


def merge_specs(cfg: ExperimentConfig, stage_of: dict[str, str]) -> list[MergeSpec]:
    """Every merge, each after the merges it reads.

    Args:
        cfg: the experiment's settings.
        stage_of: model name -> its stage, for every trained adapter and Grams folder.

    Returns:
        The merges; ``stage_of`` gains each merge's name.
    """
    m, games = cfg.merge, tuple(cfg.games)
    specs: list[MergeSpec] = []

    def add(name: str, inputs: list[str], method: str, options: dict, kind: MergeKind, merged: tuple[str, ...],
            intermediate: bool = False) -> None:
        deps = ("base", *[stage_of[i] for i in inputs])
        specs.append(MergeSpec(name, tuple(inputs), method, options, kind, merged, intermediate, deps))
        stage_of[name] = name

    for method in m.methods:
        add(f"merge/{method}", merge_inputs(cfg, method, list(games)), method, merge_options(cfg, method), "oneshot", games)
    for method in cfg.refit.methods if cfg.refit.enabled else ():
        inputs = merge_inputs(cfg, method, list(games), kind="refit")
        add(f"merge-refit/{method}", inputs, method, merge_options(cfg, method), "refit", games)
    for method in cfg.continual.methods if cfg.continual.enabled else ():
        inputs = merge_inputs(cfg, method, list(games), kind="continual")
        add(f"merge-continual/{method}", inputs, method, merge_options(cfg, method), "continual", games)
    routed = [f"routed/{g}" for g in games]
    for keep in m.keep_sweep:
        if keep != m.keep:
            add(f"keep/{keep:g}", routed, "ilora", {"keep": keep}, "keep", games)
    sequences = [("ilora", order) for order in [list(games)] + [list(o) for o in m.orders]] if m.iterative else []
    sequences += [(method, list(games)) for method in m.iterative_methods]
    for method, order in sequences:
        inputs = merge_inputs(cfg, method, order)
        previous = inputs[0]
        for k in range(2, len(order) + 1):
            name = iterative_name(method, order, k)
            add(name, [previous, inputs[k - 1]], method, merge_options(cfg, method), "iterative", tuple(order[:k]),
                intermediate=k < len(order))
            previous = name
    pair = tuple(cfg.ablation_pair())
    variants = {"plain": "plain", "routed": "routed", **{v: f"ablation/{v}" for v in cfg.ablations.variants}}
    for variant, prefix in variants.items() if pair else ():
        add(f"ablation-merge/{variant}", [f"{prefix}/{g}" for g in pair], "ilora", {"keep": m.keep}, "ablation", pair)
    return specs


def eval_specs(cfg: ExperimentConfig, adapters: list[AdapterSpec], merges: list[MergeSpec],
               stage_of: dict[str, str]) -> list[EvalSpec]:
    """Which games each model is played on: every model on every game, except continual adapters
    (each acts with the earlier ones: played in their merges only), the ablation pair's models (on
    the pair), iterative merges (on the games merged so far; intermediate ones only with
    ``merge.play_intermediate``) and, without ``eval.cross_games``, single-game adapters (on their game).
    """
    games, e = tuple(cfg.games), cfg.eval
    general = ("data/general",)

    def spec(model: str, played: tuple[str, ...], own_game: str | None = None, blank: bool = False) -> EvalSpec:
        reads = () if model == "base" else (stage_of[model],)
        return EvalSpec(model, played, own_game, blank, ("base", *reads, *[f"data/{g}" for g in played], *general))

    specs = [spec("base", games)]
    for a in adapters:
        if a.name.startswith("continual/"):
            continue
        if a.name.startswith("ablation/"):
            specs.append(spec(a.name, tuple(cfg.ablation_pair())))
            continue
        own = a.task[0] if a.name.startswith(("plain/", "routed/")) else None
        played = a.task if a.name != "joint" and not e.cross_games else games  # single-game adapters
        specs.append(spec(a.name, played, own, blank=e.blank_check and a.name.startswith("routed/")))
    for m in merges:
        if m.kind == "iterative" and m.intermediate and not cfg.merge.play_intermediate:
            continue
        specs.append(spec(m.name, m.games if m.kind in ("iterative", "ablation") else games))
    if cfg.tuned_merge.enabled:
        specs.append(spec("tuned-merge", games))
    return specs


def build_plan(cfg: ExperimentConfig) -> Plan:
    """The stages of one replicate of ``cfg`` after ``base`` (which every stage reads).

    Raises:
        IloraError: a merge method the settings cannot honour (a data-aware one on refit adapters).
    """
    games = list(cfg.games)
    data = tuple(f"data/{g}" for g in games)
    adapters = adapter_specs(cfg)
    stage_of = {a.name: a.stage for a in adapters}
    routed_stages = tuple(f"train/routed/{g}" for g in games)
    others: list[StageSpec] = [GameData(g) for g in games] + [GeneralData()]
    grams = [Grams(g, ("base", f"train/routed/{g}", f"data/{g}", "data/general")) for g in games] if cfg.adapters.routed else []
    stage_of.update({g.stage: g.stage for g in grams})
    merges = merge_specs(cfg, stage_of)
    others += [*grams, *[Reference(g) for g in games]]
    if cfg.tuned_merge.enabled:
        others.append(TunedMerge(("base", "data/general", *data, *routed_stages)))
        stage_of["tuned-merge"] = "tuned-merge"
    others += [Selection(rule, ("base", *data, *routed_stages)) for rule in cfg.selection.rules]
    for kind in ("plain", "routed") if cfg.routed_games() else ("plain",):
        others.append(Activations(kind, games[0], ("base", f"train/{kind}/{games[0]}", "data/general", *data)))
    if cfg.adapters.routed:
        interference = final_merges(merges)
        deps = (*[g.stage for g in grams], *[stage_of[m] for m in interference])
        others.append(Interference(tuple(interference), deps))
    evals = eval_specs(cfg, adapters, merges, stage_of)
    return Plan(tuple(adapters), tuple(merges), tuple(evals), tuple(others))
