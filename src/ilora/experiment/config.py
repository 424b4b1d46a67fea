"""The end-to-end experiment's settings (one YAML preset per scale in ``configs/``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ilora.config import field, to_dict
from ilora.errors import IloraError
from ilora.experiment.tune_merge import TuneSettings
from ilora.merge.ilora import ILoRAMerge
from ilora.routing.select import SELECTION_RULES, GateConfig

DEFAULT_GAMES = ["Pong", "Breakout", "Freeway", "Boxing"]


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The routing loss's weights, ``eps_lm·L_lm + eps_kl·L_kl + eps_norm·L_norm``
    (:class:`ilora.routing.trainer.RoutingConfig` takes them as keyword arguments)."""

    eps_lm: float = 1.0
    eps_kl: float = 0.0
    eps_norm: float = 0.0

    @property
    def routed(self) -> bool:
        """Whether general rows get a loss (plain LoRA: neither KL nor norm)."""
        return self.eps_kl > 0 or self.eps_norm > 0

    def plain(self) -> LossWeights:
        """These weights without the general rows' terms (plain LoRA)."""
        return dataclasses.replace(self, eps_kl=0.0, eps_norm=0.0)


@dataclasses.dataclass
class DataSettings:
    """Expert data per game and general data."""

    episodes: int = field(4, help="expert episodes collected per game for training")
    heldout_episodes: int = field(1, help="further expert episodes per game, for offline action agreement")
    max_steps: int = field(1500, help="agent-step cap per collected episode")
    object_text: bool = field(True, help="object-state text in the prompt (the small world's default; off = pixels only)")
    reasoning: bool = field(False, help="answers give reasoning before 'Action: NAME' (needs generate-mode play)")
    general_rows: int = field(3000, help="general vision-language training rows (general route)")
    general_eval_rows: int = field(300, help="held-out general rows for the general benchmark")
    other_game_rows: int = field(1000, help="rows of each other game in a routed adapter's general route")


@dataclasses.dataclass
class TrainSettings:
    """Adapter training: shared by plain, routed, joint and ablation adapters."""

    max_steps: int = field(300, help="optimiser steps per adapter (a plain one; see match_task_rows)")
    match_task_rows: bool = field(
        True,
        help="routed adapters take more steps so they see as many task rows as a plain one (their batches also "
        "carry general rows; the paper trains both for the same epochs of task data)",
    )
    batch_size: int = field(16, help="rows per step")
    learning_rate: float = field(2e-3, help="peak learning rate (linear decay)")
    lora_r: int = field(16, help="LoRA rank")
    lora_alpha: float = field(32.0, help="LoRA alpha")
    lora_dropout: float = field(0.0, help="LoRA dropout")
    lora_parts: list[str] = field(default_factory=lambda: ["vision", "projector", "language"], help="VLM parts with LoRA")
    eps_lm: float = field(1.0, help="routed adapters: LM loss weight")
    eps_kl: float = field(0.01, help="routed adapters: KL(base || lora) weight on general rows")
    eps_norm: float = field(2.0, help="routed adapters: LoRA-B output norm weight on general rows")
    general_share: float = field(0.5, help="general rows per task row in a routed adapter's mix")
    joint_steps_factor: float | None = field(
        None,
        help="the joint adapter's steps as a multiple of max_steps; None: the number of games, so it sees as many "
        "task rows as the single-game adapters together",
    )
    dtype: str = field("float32", help="model dtype for training and play")

    @property
    def loss_weights(self) -> LossWeights:
        """The routed adapters' loss weights."""
        return LossWeights(self.eps_lm, self.eps_kl, self.eps_norm)

    def read_by_adapter(self, routed: bool) -> dict[str, Any]:
        """The settings one adapter's training reads (its stage's cache key, with its loss weights):
        the loss weights and the joint adapter's step factor reach a stage through its own spec, and
        a plain adapter reads none of the general rows' settings."""
        skipped = {"eps_lm", "eps_kl", "eps_norm", "joint_steps_factor"}
        if not routed:
            skipped |= {"general_share", "match_task_rows"}
        return {k: v for k, v in to_dict(self).items() if k not in skipped}


@dataclasses.dataclass
class AdapterSettings:
    """Which adapter families the experiment trains besides each game's plain (single-task) adapter,
    every retention's denominator."""

    routed: bool = field(
        True,
        help="every game's routed adapter (false: only the first game's, when continual routing builds on it); the "
        "merges of routed adapters, refit, the ablation pair and the interference analysis need them all",
    )
    joint: bool = field(True, help="the joint multi-task LoRA baseline (steps: train.joint_steps_factor)")


@dataclasses.dataclass
class AblationSettings:
    """Loss ablations and the ε sweep, run on a pair of games and merged with I-LoRA."""

    games: list[str] = field(
        default_factory=lambda: ["Pong", "Breakout"],
        help="the pair the ablations train on and whose plain and routed adapters are merged (none unless two of the "
        "experiment's games)",
    )
    variants: dict[str, dict[str, float]] = field(
        default_factory=lambda: {
            "kl_only": {"eps_kl": 0.01, "eps_norm": 0.0},
            "norm_only": {"eps_kl": 0.0, "eps_norm": 2.0},
            "norm_x10": {"eps_kl": 0.01, "eps_norm": 20.0},
            "norm_x50": {"eps_kl": 0.01, "eps_norm": 100.0},
        },
        help="name -> loss weights eps_kl and eps_norm (an unset one is 0; eps_lm is train.eps_lm); plain (0, 0) and "
        "the main routed weights are always in the table",
    )

    def __post_init__(self) -> None:
        allowed = {"eps_kl", "eps_norm"}
        for name, weights in self.variants.items():
            unknown = sorted(set(weights) - allowed)
            if unknown:
                raise IloraError(f"ablations.variants.{name}: unknown loss weight(s) {unknown}; known: {sorted(allowed)}")

    def loss_weights(self, train: TrainSettings) -> dict[str, LossWeights]:
        """Variant -> its loss weights (``eps_lm`` from ``train``)."""
        return {name: LossWeights(train.eps_lm, **weights) for name, weights in self.variants.items()}


@dataclasses.dataclass
class MergeSettings:
    """Which merges of the routed adapters are built and played."""

    methods: list[str] = field(
        default_factory=lambda: ["ilora", "magmax", "task_arithmetic", "ties", "dare_ties", "pcb", "peft:linear", "peft:svd", "peft:ties", "peft:cat"],
        help="registry names merged all at once (ilora.merge.available_methods())",
    )
    keep: float = field(ILoRAMerge.keep, help="I-LoRA keep ratio of singular values")
    iterative: bool = field(True, help="also merge one game at a time with I-LoRA (Table 5)")
    iterative_methods: list[str] = field(
        default_factory=list,
        help="other registry methods also merged one game at a time, in the order of games (each must accept its own "
        "merged state as an input)",
    )
    orders: list[list[str]] = field(default_factory=list, help="other game orders for the iterative merge (order effect)")
    keep_sweep: list[float] = field(default_factory=lambda: [0.2, 0.5, 1.0], help="I-LoRA keep ratios for Figure 4 (besides keep)")
    grams_rows: int = field(
        256, help="task rows and general rows per routed adapter on which its input Grams are measured (data-aware "
        "merges such as regmean, and the interference analysis)"
    )
    play_intermediate: bool = field(True, help="play every step of an iterative merge (false: only the last)")


@dataclasses.dataclass
class RefitSettings:
    """Leak-aware refit (off by default): each game's routed adapter trained on, continuing from
    itself, on the base with the other games' routed adapters folded into its weights -- the model
    a summed merge puts it in -- so that it learns its game through their leaks and stays quiet on
    their rows with them present. The refit adapters are merged like the routed ones."""

    steps_share: float = field(0.0, help="refit steps as a share of a routed adapter's steps (0: no refit adapters)")
    methods: list[str] = field(
        default_factory=lambda: ["sum", "ilora", "tsv"],
        help="registry methods merging the refit adapters of all games (no data-aware ones: Grams are measured for "
        "the routed adapters)",
    )

    def __post_init__(self) -> None:
        if self.steps_share < 0:
            raise IloraError(f"refit.steps_share = {self.steps_share}: must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.steps_share > 0


@dataclasses.dataclass
class ContinualSettings:
    """Continual routing (off by default): in the order of games, each game's routed adapter is
    trained on the base with the earlier games' continual adapters folded into its weights. Its
    KL reference is that model, so it learns its game in the model it joins and keeps what that
    model does on the general rows and the other games' rows; the summed merge is then the model
    the last adapter was trained in. The first game's continual adapter is its routed adapter."""

    enabled: bool = field(False, help="train continual adapters (one routed training per game after the first)")
    methods: list[str] = field(
        default_factory=lambda: ["sum"], help="registry methods merging the continual adapters of all games"
    )


@dataclasses.dataclass
class SelectionSettings:
    """Skills chosen per input (off by default): every game's routed adapter loaded side by side as
    PEFT adapters and one chosen per step by a rule, no merge (``ilora.routing.select``). Each rule
    plays every game; its accuracy at picking the game's own adapter and its cost per decision
    against a merged model's are measured on the held-out rows the report scores agreement on."""

    rules: list[str] = field(
        default_factory=list,
        help="norm: the loudest adapter by its own LoRA output norm on the prompt (no training); gate: a classifier "
        "on the base's features; oracle: the game's own adapter",
    )
    gate_rows: int = field(64, help="validation rows of each game the gate is trained on (held-out rows the report does not score)")
    gate: GateConfig = field(default_factory=GateConfig, help="how the gate is trained")

    def __post_init__(self) -> None:
        bad = [r for r in self.rules if r not in SELECTION_RULES]
        if bad or len(set(self.rules)) != len(self.rules):
            raise IloraError(f"selection.rules = {self.rules}: expected distinct values among {', '.join(SELECTION_RULES)}")
        if self.gate_rows < 1:
            raise IloraError(f"selection.gate_rows = {self.gate_rows}: must be >= 1")


@dataclasses.dataclass
class TunedMergeSettings:
    """A merge of the routed adapters whose method, options and per-game weights are searched by a
    cheap reward on validation rows (``ilora tune-merge``; off by default): held-out rows the report
    does not score, and general rows, never the evaluation episodes. The best setting is merged
    and played like the untuned methods."""

    enabled: bool = field(False, help="search, merge with the best setting, play it")
    search: TuneSettings = field(default_factory=TuneSettings, help="the search (ilora tune-merge's settings)")


@dataclasses.dataclass
class EvalSettings:
    """Playing and scoring."""

    episodes: int = field(4, help="episodes per (model, game)")
    own_game_episodes: int | None = field(
        None,
        help="episodes of the random and expert references and of each single-game adapter (plain, routed) on its own "
        "game: the bar and every retention's denominator rest on these (None: episodes)",
    )
    n_envs: int = field(4, help="environments played side by side")
    max_frames: int = field(6000, help="episode cap in emulator frames (the paper: 108,000 = 30 min)")
    fire_on_reset: bool = field(True, help="FireReset: press FIRE after a reset / lost life (reported with every score)")
    blank_check: bool = field(True, help="also play routed single-game adapters with both frames blanked")
    cross_games: bool = field(True, help="also play each single-game adapter on the other games (forgetting)")
    agreement_rows: int = field(200, help="held-out expert rows per game for offline action agreement")
    activation_rows: int = field(64, help="rows per data type for the LoRA activation-norm analysis")

    def __post_init__(self) -> None:
        for name in ("episodes", "n_envs", "max_frames", "agreement_rows", "activation_rows"):
            if getattr(self, name) < 1:
                raise IloraError(f"{name} = {getattr(self, name)}: must be >= 1")
        if self.own_game_episodes is not None and self.own_game_episodes < 1:
            raise IloraError(f"own_game_episodes = {self.own_game_episodes}: must be >= 1 (or null: the episodes value)")


@dataclasses.dataclass
class ExperimentConfig:
    """The end-to-end experiment: data, adapters, merges, play, report."""

    run_dir: str = field("runs/default", help="where every stage writes; rerunning resumes")
    seed: int = field(0, help="seed for data, training and play (one replicate; see seeds)")
    seeds: list[int] | None = field(
        None,
        help="replicates: each seed gets its own expert data, training, merges and play in run_dir/seed-<s>, and the "
        "report gives means over seeds with intervals over seeds x episodes (null: the one replicate of seed)",
    )
    games: list[str] = field(default_factory=lambda: list(DEFAULT_GAMES), help="games (each needs an expert)")
    workers: int = field(2, help="processes running independent stages (trainings, evaluations) side by side")
    threads: int = field(1, help="torch CPU threads (1 is fastest for the tiny model on a shared 2-core CPU; 0: torch's default)")
    device: str = field("auto", help="device for play and scoring: auto (cuda when available), cpu, cuda")
    base: str = field("builtin", help="base VLM: 'builtin' (shipped tiny base), a folder or a hub id")
    data: DataSettings = field(default_factory=DataSettings, help="expert and general data")
    train: TrainSettings = field(default_factory=TrainSettings, help="adapter training")
    adapters: AdapterSettings = field(default_factory=AdapterSettings, help="adapter families trained")
    ablations: AblationSettings = field(default_factory=AblationSettings, help="loss ablations / ε sweep")
    merge: MergeSettings = field(default_factory=MergeSettings, help="merges")
    refit: RefitSettings = field(default_factory=RefitSettings, help="leak-aware refit of the routed adapters")
    continual: ContinualSettings = field(default_factory=ContinualSettings, help="continual routing, one game at a time")
    selection: SelectionSettings = field(default_factory=SelectionSettings, help="skills chosen per input")
    tuned_merge: TunedMergeSettings = field(default_factory=TunedMergeSettings, help="a merge tuned by reward")
    eval: EvalSettings = field(default_factory=EvalSettings, help="play and scoring")

    def ablation_pair(self) -> list[str]:
        """``ablations.games`` when it is a pair of two of ``games``, else ``[]`` (no ablation pair is merged)."""
        pair = list(self.ablations.games)
        return pair if len(set(pair)) == 2 == len(pair) and set(pair) <= set(self.games) else []

    def routed_consumers(self) -> dict[str, bool]:
        """Key -> whether that setting reads every game's routed adapter."""
        m = self.merge
        return {
            "merge.methods": bool(m.methods), "merge.iterative": m.iterative, "merge.iterative_methods": bool(m.iterative_methods),
            "merge.keep_sweep": any(k != m.keep for k in m.keep_sweep), "merge.orders": bool(m.orders),
            "refit.steps_share": self.refit.enabled, "ablations.games": bool(self.ablation_pair()),
            "selection.rules": bool(self.selection.rules), "tuned_merge.enabled": self.tuned_merge.enabled,
        }

    def routed_games(self) -> list[str]:
        """Games whose routed adapter is trained: all, or only the first when continual routing alone needs one."""
        if self.adapters.routed:
            return list(self.games)
        return list(self.games[:1]) if self.continual.enabled else []

    def __post_init__(self) -> None:
        """Refuse game lists the stages could not honour (each message names the key)."""
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise IloraError(f"seeds = {self.seeds}: need at least one seed, each once (or null)")
        games = list(self.games)
        if not games or len(set(games)) != len(games):
            raise IloraError(f"games = {games}: need at least one game, each once")
        ablation = list(self.ablations.games)
        if self.ablations.variants and not self.ablation_pair():
            raise IloraError(f"ablations.games = {ablation}: the ablations train and merge a pair of two of games {games}")
        for order in self.merge.orders:
            if sorted(order) != sorted(games):
                raise IloraError(f"merge.orders: {list(order)} is not an order of games {games}")
        if not self.adapters.routed:
            for key, uses in self.routed_consumers().items():
                if uses:
                    raise IloraError(f"adapters.routed = false: {key} needs every game's routed adapter")
        if self.train.max_steps < 1 or self.train.batch_size < 1:
            raise IloraError(f"train.max_steps = {self.train.max_steps}, train.batch_size = {self.train.batch_size}: both must be >= 1")
