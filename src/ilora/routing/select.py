"""Skills chosen per input: several routed LoRA adapters kept apart, one chosen for each row.

No single merged delta keeps every game, while switching to each game's routed adapter does.
This module makes that switch from the input itself (PSEC's context-aware module, in its
simplest form): all adapters sit on one base model as PEFT adapters (nothing merged), and for
every row a :class:`SkillSelector` picks the adapter that then scores the actions exactly as
the agent does (:class:`~ilora.atari.agent.VLMAgent`: prompt-prefix cache, ``score_rows``,
``decide_rows``). Rules (:data:`SelectionRule`):

- ``"norm"``, no training at all: each adapter's own LoRA activation norm on the prompt, the
  quantity routing tuning keeps small off its task (Table 6: the mean over LoRA layers of the
  mean over the prompt's positions of ``‖scaling · lora_B(x)‖²``, with that adapter active),
  measured per row; the loudest adapter acts. One prompt forward per adapter.
- ``"gate"``: a small classifier (:class:`SkillGate`, logistic regression or a one-hidden-layer
  MLP) trained on rows of each skill (:meth:`SkillSelector.fit_gate`), on the base model's last
  hidden state pooled over the prompt (one base forward) or on the vector of adapter norms.
- ``"oracle"``: the row's own game (its ``game`` field); the reference the others are scored by.

:class:`SkillPolicy` plays a game with a selector (any :func:`~ilora.atari.evaluate.play_episodes`
loop), and :func:`selection_accuracy` measures how often a rule picks the row's own game's
adapter on held-out rows, and its cost per decision beside a single merged model's.
"""

from __future__ import annotations

import dataclasses
import os
import time
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ilora.atari.agent import AgentDecision, VLMAgent
from ilora.atari.envs import Observation
from ilora.atari.games import Game, get_game
from ilora.config import field
from ilora.errors import IloraError
from ilora.models.cache import cache_argument
from ilora.models.inputs import encode_rows
from ilora.models.scoring import PromptPrefix, left_padded_positions
from ilora.routing.hooks import LoraLayerRef, find_lora_layers
from ilora.routing.lora import AdapterSwitch

SelectionRule = Literal["norm", "gate", "oracle"]
SELECTION_RULES: tuple[str, ...] = typing.get_args(SelectionRule)
GateFeatures = Literal["hidden", "norms"]
GATE_FEATURES: tuple[str, ...] = typing.get_args(GateFeatures)


def check_rule(rule: str) -> SelectionRule:
    """``rule`` if it is a selection rule, else an ``IloraError`` listing them."""
    if rule not in SELECTION_RULES:
        raise IloraError(f"selection rule {rule!r}: expected one of {', '.join(SELECTION_RULES)}")
    return typing.cast(SelectionRule, rule)


@dataclasses.dataclass
class GateConfig:
    """How the gate is trained (full-batch Adam on standardised features, cross-entropy)."""

    features: GateFeatures = field("hidden", help="'hidden': the base model's last hidden state pooled over the prompt "
                          "(one base forward per step); 'norms': log of every adapter's LoRA norm (one forward per adapter)")
    hidden_units: int = field(0, help="0: logistic regression; > 0: one hidden layer of this width (tanh)")
    steps: int = field(300, help="full-batch optimiser steps")
    learning_rate: float = field(0.05, help="Adam learning rate")
    weight_decay: float = field(1e-3, help="L2 penalty on the gate's weights (keeps separable data from diverging)")
    seed: int = field(0, help="seed of the gate's initialisation")

    def __post_init__(self) -> None:
        if self.features not in GATE_FEATURES:
            raise IloraError(f"gate features {self.features!r}: expected one of {', '.join(GATE_FEATURES)}")
        if self.hidden_units < 0:
            raise IloraError(f"gate hidden_units {self.hidden_units}: must be >= 0")
        if self.steps < 1:
            raise IloraError(f"gate steps {self.steps}: must be >= 1")
        if not self.learning_rate > 0 or not self.weight_decay >= 0:
            raise IloraError(f"gate learning_rate {self.learning_rate} must be > 0 and weight_decay {self.weight_decay} >= 0")


class SkillGate(nn.Module):
    """Skill logits from a feature vector: standardise, then a linear map or a one-hidden-layer MLP.

    Args:
        mean, scale: ``[F]`` per-feature mean and standard deviation of the training features.
        n_skills: number of skills (output logits).
        hidden_units: 0 for logistic regression, else the hidden layer's width.
    """

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, n_skills: int, hidden_units: int = 0) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("scale", scale.float().clone())
        n_features = mean.numel()
        if hidden_units:
            self.net = nn.Sequential(nn.Linear(n_features, hidden_units), nn.Tanh(), nn.Linear(hidden_units, n_skills))
        else:
            self.net = nn.Linear(n_features, n_skills)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features.float() - self.mean) / self.scale)


def fit_gate(features: torch.Tensor, labels: torch.Tensor, n_skills: int, config: GateConfig | None = None) -> SkillGate:
    """Train a :class:`SkillGate` on labelled feature vectors (deterministic for a given seed).

    Args:
        features: ``[N, F]`` finite features, one row per example.
        labels: ``[N]`` skill indices in ``[0, n_skills)``.
        n_skills: number of skills.
        config: training settings (default :class:`GateConfig`).

    Returns:
        The trained gate, in eval mode, on the CPU.

    Raises:
        IloraError: mismatched or empty inputs, non-finite features, a label out of range.
    """
    config = config or GateConfig()
    with torch.inference_mode(False):  # features measured under inference mode are copied into plain tensors
        features, labels = features.detach().float().cpu().clone(), labels.detach().long().cpu().clone()
    if features.ndim != 2 or labels.shape != features.shape[:1] or features.shape[0] == 0:
        raise IloraError(f"gate: features {tuple(features.shape)} and labels {tuple(labels.shape)} are not N x F and N")
    if not bool(torch.isfinite(features).all()):
        raise IloraError("gate: features contain NaN or Inf")
    if int(labels.min()) < 0 or int(labels.max()) >= n_skills:
        raise IloraError(f"gate: labels must lie in [0, {n_skills}), got {int(labels.min())}..{int(labels.max())}")
    mean = features.mean(0)
    # A constant feature (std 0) would divide by zero; it carries no information, any scale will do.
    scale = features.std(0, unbiased=False).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(config.seed)
        gate = SkillGate(mean, scale, n_skills, config.hidden_units)
        optimiser = torch.optim.Adam(gate.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        for _ in range(config.steps):
            optimiser.zero_grad()
            nn.functional.cross_entropy(gate(features), labels).backward()
            optimiser.step()
    return gate.eval().requires_grad_(False)


def load_skills(
    base: str | os.PathLike,
    adapters: Mapping[str, str | os.PathLike],
    dtype: str = "float32",
    device: str = "cpu",
):
    """The base VLM with every adapter loaded as its own PEFT adapter (none merged, none active but the first).

    Each adapter is checked first (plain LoRA, finite weights, modules and shapes of this base),
    as ``ilora play --adapter`` checks its one.

    Args:
        base: base model folder, ``builtin`` or a cached hub id.
        adapters: skill name -> PEFT LoRA adapter folder; names become PEFT adapter names.

    Returns:
        ``(peft_model, processor)``, the model in eval mode.

    Raises:
        IloraError: no adapter, a bad name, or an adapter that is bad or does not fit the base.
    """
    from peft import PeftModel

    from ilora.models.load import load_vlm

    check_skills(base, adapters)
    model, processor = load_vlm(base, dtype, device)
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapters[name]), adapter_name=name)
    return peft_model.eval(), processor


def check_skills(base: str | os.PathLike, adapters: Mapping[str, str | os.PathLike]) -> None:
    """Refuse bad skill names and any adapter that is not a plain, finite LoRA of ``base``'s modules
    (reads the adapters' tensors, not the model's weights)."""
    from ilora.models.adapter import check_lora_adapter, check_modules_fit
    from ilora.models.load import model_weight_shapes

    check_skill_names(list(adapters))
    shapes = model_weight_shapes(base)
    for path in adapters.values():
        check_modules_fit(check_lora_adapter(path), shapes, path, base)


def check_skill_names(names: Sequence[str]) -> None:
    """Refuse an empty list, a repeated name, or one PEFT cannot use as an adapter name."""
    if not names:
        raise IloraError("no skill adapters given")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise IloraError(f"skill name(s) {repeated} given twice")
    for name in names:
        # PEFT keys each layer's adapters by name in a ModuleDict: no dots, not empty.
        if not name or "." in name:
            raise IloraError(f"skill name {name!r}: must be non-empty and contain no '.'")


class _RowNorms:
    """Per row, the sums of ``‖scaling · lora_B(x)‖²`` and the position counts of every LoRA layer of
    the active adapter over one forward (hooks on every skill's ``lora_B``, idle outside :meth:`record`).

    Language layers count the tokens the forward's mask marks; vision and projector layers count
    every patch of each of the row's images (images are concatenated in row order).
    """

    def __init__(self, model: nn.Module, skills: Sequence[str]) -> None:
        self.layers = {skill: find_lora_layers(model, skill) for skill in skills}
        self._tokens: torch.Tensor | None = None
        self._image_rows: torch.Tensor | None = None
        self._n_rows = 0
        self._active = False
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self._handles = [
            ref.layer.lora_B[skill].register_forward_hook(self._hook_for(ref, skill))
            for skill, refs in self.layers.items()
            for ref in refs
        ]

    def _hook_for(self, ref: LoraLayerRef, skill: str):
        def hook(module, args, output):
            if not self._active:
                return
            squares = (output.float() * ref.scaling(skill)).pow(2).sum(-1)
            if ref.part == "language":
                mask = torch.ones_like(squares) if self._tokens is None else self._tokens
                if squares.shape != mask.shape:
                    raise IloraError(f"{ref.name}: LoRA-B output {tuple(output.shape)} does not match the tokens {tuple(mask.shape)}")
                sums, counts = (squares * mask).sum(1), mask.sum(1)
            else:
                rows = self._image_rows
                if rows is None or squares.ndim < 1 or squares.shape[0] != rows.numel():
                    raise IloraError(f"{ref.name}: LoRA-B output {tuple(output.shape)} is not one slice per image")
                per_image = squares.reshape(rows.numel(), -1)
                sums = torch.zeros(self._n_rows, device=squares.device).index_add_(0, rows, per_image.sum(1))
                counts = torch.zeros(self._n_rows, device=squares.device).index_add_(
                    0, rows, torch.full((rows.numel(),), float(per_image.shape[1]), device=squares.device)
                )
            self.sums[ref.name] = self.sums.get(ref.name, 0) + sums
            self.counts[ref.name] = self.counts.get(ref.name, 0) + counts

        return hook

    def record(self, n_rows: int, tokens: torch.Tensor | None, image_rows: torch.Tensor | None) -> _RowNorms:
        """Start recording a forward of ``n_rows`` rows (previous records cleared).

        Args:
            tokens: ``[B, T]`` 0/1 mask of the counted tokens of this forward (``None``: all).
            image_rows: ``[n_images]`` row index of each image (``None``: no images).
        """
        self.sums, self.counts = {}, {}
        self._n_rows, self._tokens, self._image_rows = n_rows, None if tokens is None else tokens.float(), image_rows
        self._active = True
        return self

    def stop(self) -> None:
        self._active = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclasses.dataclass
class _Probe:
    """What one prompt forward measures for a batch of rows, as per-row sums and counts.

    ``norm_sums`` / ``norm_counts``: layer name -> ``[B]`` (empty for the base model);
    ``hidden_sum``: ``[B, H]`` last hidden states summed over the prompt; ``tokens``: ``[B]``.
    """

    norm_sums: dict[str, torch.Tensor]
    norm_counts: dict[str, torch.Tensor]
    hidden_sum: torch.Tensor
    tokens: torch.Tensor

    def plus(self, prefix: _Probe) -> _Probe:
        """These rows' measures with a shared prefix's (batch 1) added to every row."""
        zero = torch.zeros_like(self.tokens)
        layers = self.norm_sums.keys() | prefix.norm_sums.keys()
        return _Probe(
            {k: self.norm_sums.get(k, zero) + prefix.norm_sums.get(k, zero) for k in layers},
            {k: self.norm_counts.get(k, zero) + prefix.norm_counts.get(k, zero) for k in layers},
            self.hidden_sum + prefix.hidden_sum,
            self.tokens + prefix.tokens,
        )

    def norms(self) -> torch.Tensor:
        """``[B]``: the mean over LoRA layers (those with positions in the row) of the mean squared norm."""
        sums = torch.stack([self.norm_sums[k] for k in sorted(self.norm_sums)])
        counts = torch.stack([self.norm_counts[k] for k in sorted(self.norm_sums)])
        has = counts > 0
        return ((sums / counts.clamp_min(1)) * has).sum(0) / has.sum(0).clamp_min(1)

    def pooled(self) -> torch.Tensor:
        """``[B, H]``: the last hidden state averaged over each row's prompt tokens."""
        return self.hidden_sum / self.tokens.clamp_min(1)[:, None]


class SkillSelector:
    """Chooses one skill (a routed LoRA adapter) per row and scores the actions with it.

    Args:
        model: a PEFT model holding every skill as a named adapter (:func:`load_skills`).
        processor: its processor.
        skills: the adapter names, in skill-index order (skill names are games for ``"oracle"``
            and for the accuracy of a rule).
        rule: how a skill is chosen (:data:`SelectionRule`); ``"gate"`` needs :meth:`fit_gate` first.
        object_text: the agents' prompts carry the RAM object-state text (play only: rows from
            a dataset bring their own prompts).
    """

    def __init__(self, model, processor, skills: Sequence[str], rule: SelectionRule = "norm", *, object_text: bool = False) -> None:
        check_skill_names(list(skills))
        missing = [s for s in skills if s not in getattr(model, "peft_config", {})]
        if missing:
            raise IloraError(f"skills {missing} are not adapters of the model (it has {sorted(getattr(model, 'peft_config', {}))})")
        self.model = model
        self.processor = processor
        self.skills = list(skills)
        self.rule = check_rule(rule)
        self.object_text = object_text
        self.gate: SkillGate | None = None
        self.gate_config: GateConfig | None = None
        self.norm_hooks = _RowNorms(model, self.skills)
        self._switch = AdapterSwitch(model)
        self._cache_arg = cache_argument(model)
        self._prefixes: dict[tuple[str | None, str | None], tuple[PromptPrefix, _Probe] | None] = {}
        self._agents: dict[tuple[str, str], VLMAgent] = {}
        self._active: str | None = None

    @classmethod
    def load(
        cls,
        base: str | os.PathLike,
        adapters: Mapping[str, str | os.PathLike],
        rule: SelectionRule = "norm",
        *,
        object_text: bool = False,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> SkillSelector:
        """A selector over ``adapters`` (skill name -> folder) on ``base`` (see :func:`load_skills`)."""
        check_rule(rule)
        model, processor = load_skills(base, adapters, dtype, device)
        return cls(model, processor, list(adapters), rule, object_text=object_text)

    # ----- which adapter acts ----------------------------------------------------------------------

    def _activate(self, skill: str) -> None:
        if skill != self._active:  # set_adapter walks every module: only when it changes
            self.model.set_adapter(skill, inference_mode=True)
            self._active = skill

    def agent(self, skill: str, game: Game | str) -> VLMAgent:
        """The score-mode agent of ``skill`` on ``game`` (one per pair, sharing the model; its prefix
        cache is built, and every call made, with that skill's adapter active)."""
        game = get_game(game)
        key = (skill, game.name)
        if key not in self._agents:
            self._agents[key] = VLMAgent(self.model, self.processor, game, mode="score", object_text=self.object_text)
        return self._agents[key]

    # ----- measuring the prompt --------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, batch: dict[str, torch.Tensor], past, n_images: list[int], hidden: bool) -> _Probe:
        """One prompt forward (continuing ``past`` when given), recorded per row."""
        device, dtype = self._device(), next(self.model.parameters()).dtype
        batch = {k: v.to(device) for k, v in batch.items() if v is not None}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        tokens = mask[:, -ids.shape[1] :]
        image_rows = torch.arange(len(n_images), device=device).repeat_interleave(torch.tensor(n_images, device=device))
        extra = {self._cache_arg: past} if past is not None else {}
        self.norm_hooks.record(ids.shape[0], tokens, image_rows if image_rows.numel() else None)
        try:
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask)[:, -ids.shape[1] :],
                pixel_values=batch.get("pixel_values"), use_cache=past is not None, logits_to_keep=1,
                output_hidden_states=hidden, **extra,
            )
        finally:
            self.norm_hooks.stop()
        if hidden:
            hidden_sum = (out.hidden_states[-1].float() * tokens[..., None]).sum(1)
        else:
            hidden_sum = torch.zeros(ids.shape[0], 1, device=device)
        return _Probe(dict(self.norm_hooks.sums), dict(self.norm_hooks.counts), hidden_sum, tokens.sum(1).float())

    def _prefix(self, adapter: str | None, row: dict, hidden: bool) -> tuple[PromptPrefix, _Probe] | None:
        """The cached prefix of ``row``'s context under ``adapter`` (``None``: the base) and its
        measures (one forward over the prefix alone); ``None`` where the fast encoding is not exact."""
        key = (adapter, row.get("context"))
        if key not in self._prefixes:
            prefix = PromptPrefix.build(self.model, self.processor, row)
            if isinstance(prefix, str):
                self._prefixes[key] = None
            else:
                ids = torch.tensor([prefix.ids])
                probe = self._forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None, [0], hidden=True)
                self._prefixes[key] = (prefix, probe)
        return self._prefixes[key]

    def _probe(self, rows: Sequence[dict], adapter: str | None, hidden: bool) -> _Probe:
        """Per-row measures of the prompts of ``rows`` (one context) under ``adapter`` (``None``: the base)."""
        n_images = [len(row.get("images") or []) for row in rows]
        cached = self._prefix(adapter, rows[0], hidden)
        if cached is None:
            batch = encode_rows(self.processor, rows, with_answer=False, padding_side="left")
            return self._forward(batch, None, n_images, hidden)
        prefix, prefix_probe = cached
        return self._forward(prefix.encode(rows), prefix.cache(len(rows)), n_images, hidden).plus(prefix_probe)

    def _by_context(self, rows: Sequence[dict], measure) -> torch.Tensor:
        """``measure(rows of one context)`` for each context, put back in row order."""
        groups: dict[str | None, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.get("context"), []).append(i)
        parts = {tuple(idx): measure([rows[i] for i in idx]) for idx in groups.values()}
        first = next(iter(parts.values()))
        out = torch.empty((len(rows), *first.shape[1:]), dtype=first.dtype, device=first.device)
        for idx, value in parts.items():
            out[list(idx)] = value
        return out

    @torch.inference_mode()
    def adapter_norms(self, rows: Sequence[dict]) -> torch.Tensor:
        """``[B, K]``: each skill's own LoRA activation norm on each row's prompt (mean over LoRA
        layers of the mean squared ``scaling · lora_B`` output over the prompt's positions, with
        only that adapter active)."""

        def measure(group: list[dict]) -> torch.Tensor:
            columns = []
            for skill in self.skills:
                self._activate(skill)
                columns.append(self._probe(group, skill, hidden=False).norms())
            return torch.stack(columns, 1)

        return self._by_context(rows, measure)

    @torch.inference_mode()
    def pooled_hidden(self, rows: Sequence[dict]) -> torch.Tensor:
        """``[B, H]``: the base model's (adapters off) last hidden state averaged over each row's prompt."""

        def measure(group: list[dict]) -> torch.Tensor:
            with self._switch.disabled():
                return self._probe(group, None, hidden=True).pooled()

        return self._by_context(rows, measure)

    def features(self, rows: Sequence[dict], kind: str) -> torch.Tensor:
        """The gate's input for ``rows``: pooled base hidden states, or the log of the adapter norms."""
        if kind == "hidden":
            return self.pooled_hidden(rows)
        # log: norms span orders of magnitude (quiet adapters are near 0); the floor keeps a zero finite
        return self.adapter_norms(rows).clamp_min(1e-12).log()

    # ----- choosing ---------------------------------------------------------------------------------

    def fit_gate(
        self, rows_by_skill: Mapping[str, Sequence[dict]], config: GateConfig | None = None, batch_size: int = 16
    ) -> dict[str, Any]:
        """Train the gate on rows of each skill (row of skill ``s`` -> label ``s``).

        Args:
            rows_by_skill: skill name -> its rows (``images``, ``context``, ``prompt``); every skill
                needs rows. Use rows apart from those the rule is later measured on.
            config: training settings (default :class:`GateConfig`).
            batch_size: rows per model call when computing features.

        Returns:
            ``{"rows": per-skill row counts, "train_accuracy": share of training rows the gate
            assigns to their skill, "features": the feature kind}``.
        """
        config = config or GateConfig()
        unknown = sorted(set(rows_by_skill) - set(self.skills))
        empty = [s for s in self.skills if not len(rows_by_skill.get(s, ()))]
        if unknown or empty:
            raise IloraError(f"gate data: unknown skill(s) {unknown}, skill(s) without rows {empty}; skills: {self.skills}")
        feats, labels = [], []
        for index, skill in enumerate(self.skills):
            rows = rows_by_skill[skill]
            for start in range(0, len(rows), batch_size):
                batch = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
                feats.append(self.features(batch, config.features).cpu())
                labels += [index] * len(batch)
        features, target = torch.cat(feats), torch.tensor(labels)
        self.gate, self.gate_config = fit_gate(features, target, len(self.skills), config), config
        with torch.inference_mode():
            train_accuracy = float((self.gate(features).argmax(-1) == target).float().mean())
        return {"rows": {s: len(rows_by_skill[s]) for s in self.skills}, "train_accuracy": train_accuracy,
                "features": config.features}

    def select(self, rows: Sequence[dict]) -> list[int]:
        """The skill index chosen for each row by the selector's rule.

        Raises:
            IloraError: ``"gate"`` before :meth:`fit_gate`; ``"oracle"`` on a row whose ``game`` is
                missing or names no skill.
        """
        if not rows:
            return []
        if self.rule == "oracle":
            games = [row.get("game") for row in rows]
            unknown = sorted({str(g) for g in games if g not in self.skills})
            if unknown:
                raise IloraError(f"oracle: rows of game(s) {unknown} have no skill of that name; skills: {self.skills}")
            return [self.skills.index(g) for g in games]
        if self.rule == "norm":
            return self.adapter_norms(rows).argmax(-1).tolist()
        if self.gate is None or self.gate_config is None:
            raise IloraError("rule 'gate': the gate is not trained (call fit_gate with rows of each skill)")
        with torch.inference_mode():
            return self.gate(self.features(rows, self.gate_config.features).cpu()).argmax(-1).tolist()

    # ----- acting -----------------------------------------------------------------------------------

    def _groups(self, choices: Sequence[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i, skill in enumerate(choices):
            groups.setdefault(skill, []).append(i)
        return groups

    @torch.inference_mode()
    def score_rows(self, rows: Sequence[dict], game: Game | str, choices: Sequence[int] | None = None) -> torch.Tensor:
        """``[B, n_actions]`` answer log-likelihoods, each row scored by its chosen skill's agent
        (``choices``, default :meth:`select`), as :meth:`VLMAgent.score_rows` scores them."""
        choices = self.select(rows) if choices is None else choices
        out = None
        for skill, idx in self._groups(choices).items():
            self._activate(self.skills[skill])
            scores = self.agent(self.skills[skill], game).score_rows([rows[i] for i in idx])
            if out is None:
                out = torch.empty((len(rows), scores.shape[1]), dtype=scores.dtype, device=scores.device)
            out[idx] = scores
        return out

    def decide_rows(
        self, rows: Sequence[dict], game: Game | str, choices: Sequence[int] | None = None
    ) -> tuple[list[AgentDecision], list[int]]:
        """Each row's decision by its chosen skill's agent (:meth:`VLMAgent.decide_rows`), and the choices.

        Args:
            rows: prepared rows (``images``, ``context``, ``prompt``; ``game`` for ``"oracle"``).
            game: the game whose actions are scored.
            choices: skill index per row (default: :meth:`select`).
        """
        choices = self.select(rows) if choices is None else list(choices)
        decisions: list[AgentDecision | None] = [None] * len(rows)
        for skill, idx in self._groups(choices).items():
            self._activate(self.skills[skill])
            group = [rows[i] for i in idx]
            for i, decision in zip(idx, self.agent(self.skills[skill], game).decide_rows(group, batch_size=len(group))):
                decisions[i] = decision
        return typing.cast(list[AgentDecision], decisions), choices

    def remove_hooks(self) -> None:
        """Detach the norm hooks from the model (the selector cannot measure norms afterwards)."""
        self.norm_hooks.remove()


class SkillPolicy:
    """A batch policy for :func:`~ilora.atari.evaluate.play_episodes`: per step, the selector picks
    a skill for every environment and that skill's agent acts.

    Args:
        selector: the selector (its rule, and its gate when the rule is ``"gate"``).
        game: the game played.
        source: what the skills are (base model, adapter folders), for the result files.

    Attributes:
        chosen: how many decisions each skill took.
    """

    def __init__(self, selector: SkillSelector, game: Game | str, source: dict | None = None) -> None:
        self.selector = selector
        self.game = get_game(game)
        if selector.rule == "oracle" and self.game.name not in selector.skills:
            raise IloraError(f"oracle: {self.game.name} has no skill of that name; skills: {selector.skills}")
        self.source = dict(source or {})
        self.chosen = {skill: 0 for skill in selector.skills}
        self.seconds = 0.0

    @property
    def settings(self) -> dict:
        """What this policy is, for the result files."""
        gate = self.selector.gate_config
        return {
            "policy": "skill-selection",
            **self.source,
            "rule": self.selector.rule,
            "skills": list(self.selector.skills),
            "gate": None if gate is None or self.selector.rule != "gate" else dataclasses.asdict(gate),
            "mode": "score",
            "object_text": self.selector.object_text,
        }

    def act_batch(self, observations: Sequence[Observation]) -> list[AgentDecision]:
        """One decision per observation: the rows the agents build, a skill per row, its decision."""
        if not observations:
            return []
        start = time.perf_counter()
        rows = self.selector.agent(self.selector.skills[0], self.game).rows(observations)
        rows = [{**row, "game": self.game.name} for row in rows]
        decisions, choices = self.selector.decide_rows(rows, self.game)
        for skill in choices:
            self.chosen[self.selector.skills[skill]] += 1
        self.seconds += time.perf_counter() - start
        return decisions


def selection_accuracy(
    base: str | os.PathLike,
    adapters: Mapping[str, str | os.PathLike],
    heldout: Mapping[str, Sequence[dict]],
    rule: SelectionRule,
    *,
    gate_rows: Mapping[str, Sequence[dict]] | None = None,
    gate: GateConfig | None = None,
    rows_per_game: int | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
) -> dict[str, Any]:
    """How often ``rule`` picks each row's own game's adapter on held-out rows, how its decisions
    agree with the expert's, and what a decision costs beside a single merged model's.

    The merged model's cost is the base model's (a merged delta has the base's shape): a plain
    :class:`VLMAgent` deciding the same rows in the same batches. Both are timed after one
    untimed warm-up batch per game (which builds the prompt-prefix caches).

    Args:
        base: base model folder, ``builtin`` or a cached hub id.
        adapters: skill name (a game, for the accuracy) -> routed adapter folder.
        heldout: game -> held-out rows (``images``, ``context``, ``prompt``, ``action``, ``game``),
            e.g. a dataset written by ``ilora collect``; indexed, so a ``datasets.Dataset`` will do.
        rule: ``"norm"``, ``"gate"`` or ``"oracle"``.
        gate_rows: skill -> rows the gate is trained on (``"gate"`` only; keep them apart from ``heldout``).
        gate: gate training settings (default :class:`GateConfig`).
        rows_per_game: use the first this many rows of each game (default all).
        batch_size: rows per decision call (the play loop's number of environments).
        dtype, device: of the models.

    Returns:
        ``{"rule", "skills", "gate" (fit summary or None), "games": {game: {"rows", "accuracy"
        (share choosing the game's own skill; None when no skill is named for the game),
        "chosen" (skill -> rows), "agreement" (share of decisions equal to the row's action),
        "seconds_per_decision", "merged_seconds_per_decision"}}, "accuracy" (over all rows of
        games with a skill), "seconds_per_decision", "merged_seconds_per_decision", "cost_ratio"}``.

    Raises:
        IloraError: a bad rule, no held-out rows for a game, gate rows missing for ``"gate"``, or
            (from loading) a bad adapter or model.
    """
    from tqdm.auto import tqdm

    from ilora.models.load import load_vlm

    rule = check_rule(rule)
    check_skills(base, adapters)  # before the reference model is loaded and timed
    if rows_per_game is not None and rows_per_game < 1:
        raise IloraError(f"rows_per_game {rows_per_game}: must be >= 1")
    if batch_size < 1:
        raise IloraError(f"batch_size {batch_size}: must be >= 1")
    if rule == "gate" and not gate_rows:
        raise IloraError("rule 'gate' needs gate_rows: rows of each skill to train the gate on")
    if not heldout:
        raise IloraError("no held-out rows given")
    games = {get_game(g).name: rows for g, rows in heldout.items()}
    chunks: dict[str, list[list[dict]]] = {}
    for game, rows in games.items():
        n = len(rows) if rows_per_game is None else min(rows_per_game, len(rows))
        if n == 0:
            raise IloraError(f"held-out rows of {game}: none")
        rows = [{**rows[i], "game": rows[i].get("game") or game} for i in range(n)]
        chunks[game] = [rows[s : s + batch_size] for s in range(0, n, batch_size)]

    def timed(decide, batches: list[list[dict]]) -> tuple[float, list]:
        decide(batches[0])  # warm-up: the prefix caches
        start, results = time.perf_counter(), [decide(batch) for batch in batches]
        return time.perf_counter() - start, results

    # The merged model's cost: the base's forward, one agent per game.
    model, processor = load_vlm(base, dtype, device)
    merged_seconds = {}
    for game, batches in chunks.items():
        agent = VLMAgent(model, processor, game, mode="score")
        merged_seconds[game] = timed(lambda b, agent=agent: agent.decide_rows(b, batch_size=len(b)), batches)[0]
    del model, agent  # only one model in memory at a time

    selector = SkillSelector.load(base, adapters, rule, dtype=dtype, device=device)
    gate_summary = selector.fit_gate(gate_rows, gate, batch_size) if rule == "gate" else None
    out: dict[str, Any] = {"rule": rule, "skills": list(selector.skills), "gate": gate_summary, "games": {}}
    totals = {"rows": 0, "hits": 0, "scored": 0, "seconds": 0.0, "merged": 0.0}
    for game, batches in tqdm(chunks.items(), desc=f"selection ({rule})", unit="game"):
        seconds, results = timed(lambda b, game=game: selector.decide_rows(b, game), batches)
        rows = [row for batch in batches for row in batch]
        decisions = [d for ds, _ in results for d in ds]
        choices = [c for _, cs in results for c in cs]
        own = selector.skills.index(game) if game in selector.skills else None
        hits = sum(c == own for c in choices)
        n = len(rows)
        out["games"][game] = {
            "rows": n,
            "accuracy": None if own is None else hits / n,
            "chosen": {s: sum(c == i for c in choices) for i, s in enumerate(selector.skills)},
            "agreement": sum(d.valid and d.action == r["action"] for d, r in zip(decisions, rows)) / n,
            "seconds_per_decision": seconds / n,
            "merged_seconds_per_decision": merged_seconds[game] / n,
        }
        totals["rows"] += n
        totals["seconds"] += seconds
        totals["merged"] += merged_seconds[game]
        if own is not None:
            totals["hits"] += hits
            totals["scored"] += n
    selector.remove_hooks()
    out["accuracy"] = totals["hits"] / totals["scored"] if totals["scored"] else None
    out["seconds_per_decision"] = totals["seconds"] / totals["rows"]
    out["merged_seconds_per_decision"] = totals["merged"] / totals["rows"]
    out["cost_ratio"] = totals["seconds"] / max(totals["merged"], 1e-12)
    return out
