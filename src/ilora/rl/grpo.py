"""GRPO on the agent's action distribution: group-normalised advantages, a clipped ratio, a KL.

The policy is the agent's own: at a state ``s`` the action distribution is
``softmax(score(s, a) / temperature)`` over the game's action names, where ``score`` is the
log-likelihood of the direct answer ``Action: NAME`` (its tokens, end of turn included) that
:class:`ilora.atari.agent.VLMAgent` plays with. Rollouts score with the agent's prompt-prefix
KV cache (no gradient); the loss scores the same prompts with a second agent on the same
model without the cache, so the gradient also runs through the game's rules and actions
text (the cached prefix is computed without one).

Per update, for G continuations ``i`` of each start state ``s_g`` with first actions ``a_gi``
and returns ``R_gi`` (``ilora.rl.env``):

- advantage ``A_gi = (R_gi - mean_g R) / std_g R`` (GRPO's group normalisation, TRL's
  ``scale_rewards="group"``; sample std), and exactly 0 for a group whose returns are all
  equal: it says nothing about which action is better, and a float mean of equal values
  may differ from them by rounding;
- ratio ``ρ_gi = π_θ(a_gi | s_g) / π_old(a_gi | s_g)``, one per action (its answer tokens
  together, normalised over the action set), ``π_old`` the policy before the update's first
  gradient step;
- loss ``-mean min(ρ A, clip(ρ, 1 - clip_low, 1 + clip_high) A) + beta · KL(π_θ ‖ π_ref)``
  (+ the routing terms on general rows, when given), with ``π_ref`` the weights the run
  started from: the base model for a new adapter (its ``lora_B`` is 0), or the adapter
  it continues (``--init-adapter``).

Where the parts come from. TRL's GRPO loss (``GRPOTrainer._compute_loss``, ``loss_type="grpo"``:
``-min(coef_1·A, clamp(coef_1, 1-epsilon, 1+epsilon_high)·A)``, old log-probs equal to the
detached new ones when ``num_iterations == 1``) is the loss written above, with TRL's names in
:class:`~ilora.rl.config.GRPOSettings`; it is not imported because it is a trainer method
bound to generated text completions and vocabulary-wide token log-probs, and this policy is a
distribution over a game's few action names. For the same reason the KL is exact, summed
over the action set, where TRL estimates it from the sampled tokens (its ``k3`` estimator).
The routing terms are routing tuning's own (``RoutingTrainer.routing_terms``). Written here:
sampling, the loss above, and the update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ilora.atari.agent import VLMAgent
from ilora.atari.envs import Observation
from ilora.atari.games import Game
from ilora.errors import IloraError
from ilora.rl.config import GRPOSettings
from ilora.rl.env import GroupBatch


def group_advantages(returns: torch.Tensor) -> torch.Tensor:
    """GRPO advantages: each group's returns minus their mean, over their sample std.

    Args:
        returns: ``[groups, group_size]`` (``group_size >= 2``).

    Returns:
        Float32 ``[groups, group_size]``: per group mean 0 and sample std 1; all 0 for a
        group whose returns are equal.
    """
    returns = returns.double()
    spread = returns.amax(1, keepdim=True) - returns.amin(1, keepdim=True)
    centred = returns - returns.mean(1, keepdim=True)
    scale = returns.std(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(spread > 0, centred / scale, torch.zeros_like(centred)).float()


def action_log_probs(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[batch, n_actions]`` log-probabilities of the policy ``softmax(scores / temperature)``."""
    return torch.log_softmax(scores.float() / temperature, dim=-1)


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate as GRPO uses it, averaged over every continuation.

    Args:
        logp: ``[groups, group_size]`` log-probabilities of the taken actions (with gradient).
        old_logp: the same under the policy that sampled them (no gradient).
        advantages: ``[groups, group_size]``.
        clip_low, clip_high: the ratio's clip range ``[1 - clip_low, 1 + clip_high]``.

    Returns:
        ``(loss, clip_fraction)``: the scalar loss, and the share of continuations whose
        clipped term is the one taken (ratio past the bound on the side the advantage pushes).
    """
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).mean()
    is_clipped = ((ratio < 1 - clip_low) & (advantages < 0)) | ((ratio > 1 + clip_high) & (advantages > 0))
    return loss, is_clipped.float().mean()


def policy_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Mean over states of the exact ``KL(π ‖ π_ref)`` over the action set (``[batch, n_actions]`` log-probs)."""
    return (logp.exp() * (logp - ref_logp)).sum(-1).mean()


def policy_entropy(logp: torch.Tensor) -> torch.Tensor:
    """Mean over states of the policy's entropy (nats)."""
    return -(logp.exp() * logp).sum(-1).mean()


class StartWeights:
    """The trainable weights as they were when this object was made, swapped in for a no-grad pass.

    The KL's reference is the adapter the run starts from; keeping a copy of its (LoRA-only)
    weights costs far less than a second model.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """A no-grad block in which the model has its start weights."""
        with torch.no_grad():
            current = [p.detach().clone() for p in self.params]
            for p, start in zip(self.params, self.start):
                p.copy_(start)
            try:
                yield
            finally:
                for p, now in zip(self.params, current):
                    p.copy_(now)


class GeneralRowTerms:
    """Routing tuning's terms on general rows: ``KL(p_base ‖ p_lora)`` on their answer tokens and the
    LoRA-B output norm, computed by :meth:`ilora.routing.trainer.RoutingTrainer.routing_terms`
    (the trainer is only used for that; it never trains).

    Args:
        model: the PEFT model being trained.
        processor: its processor.
        rows: general example rows (``images``, ``prompt``, ``answer``), any indexable.
        settings: ``eps_kl``, ``eps_norm``, ``general_rows`` (rows per call) and ``seed`` are used.
        scratch_dir: the trainer's ``output_dir`` (it writes nothing there).
    """

    def __init__(self, model, processor, rows: Sequence[dict], settings: GRPOSettings, scratch_dir: str) -> None:
        from ilora.routing.collator import RoutingCollator, Source, mix_sources
        from ilora.routing.trainer import RoutingConfig, RoutingTrainer

        if settings.eps_kl == 0 and settings.eps_norm == 0:
            raise IloraError("general rows given but eps_kl = eps_norm = 0: they would get no loss")
        config = RoutingConfig(
            output_dir=scratch_dir, eps_kl=settings.eps_kl, eps_norm=settings.eps_norm, save_strategy="no",
            report_to="none", disable_tqdm=True, use_cpu=settings.device == "cpu",
        )
        self.trainer = RoutingTrainer(model, config, processing_class=processor)
        self.collator = RoutingCollator(processor)
        self.rows = mix_sources([], [Source(rows, "general", name="general")], seed=settings.seed)
        self.per_call = settings.general_rows
        self.weights = {"kl": settings.eps_kl, "norm": settings.eps_norm}
        self.position = 0  # rows drawn so far (the order cycles)

    def terms(self) -> dict[str, torch.Tensor]:
        """The next ``general_rows`` rows' terms (``kl`` and/or ``norm``, those with a weight)."""
        indices = [(self.position + k) % len(self.rows) for k in range(self.per_call)]
        self.position += self.per_call
        batch = self.collator([self.rows[i] for i in indices])
        return self.trainer.routing_terms(self.trainer.model, batch)


@dataclass
class UpdateTargets:
    """One update's fixed inputs to every gradient step.

    Attributes:
        observations: ``[groups]`` start states.
        actions: long ``[groups, group_size]`` taken first actions.
        advantages: ``[groups, group_size]`` (:func:`group_advantages`).
        ref_logp: ``[groups, n_actions]`` the reference policy's log-probabilities.
        old_logp: ``[groups, group_size]`` the taken actions' log-probabilities before the first
            step (set by it).
    """

    observations: Sequence[Observation]
    actions: torch.Tensor
    advantages: torch.Tensor
    ref_logp: torch.Tensor
    old_logp: torch.Tensor | None = None


class GRPOLearner:
    """The policy, its optimiser and the GRPO update, for a PEFT model with one trainable LoRA adapter.

    Args:
        model: the PEFT model (only LoRA parameters require a gradient); kept in eval mode (no
            dropout), so the ratio is exactly 1 before an update's first step.
        processor: its processor.
        game: the game played.
        settings: the run's settings.
        general: routing terms on general rows, or ``None``.
    """

    def __init__(self, model, processor, game: Game | str, settings: GRPOSettings, general: GeneralRowTerms | None = None):
        self.model = model.eval()
        self.settings = settings
        self.policy = VLMAgent(model, processor, game, object_text=settings.object_text)
        self.scorer = VLMAgent(model, processor, game, object_text=settings.object_text, prefix_cache=False)
        self.action_names = self.policy.action_names
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise IloraError("the model has no trainable parameter (expected a trainable LoRA adapter)")
        self.reference = StartWeights(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.learning_rate, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.general = general

    def log_probs(self, observations: Sequence[Observation]) -> torch.Tensor:
        """``[batch, n_actions]`` policy log-probabilities, differentiable in the LoRA weights."""
        return action_log_probs(self.scorer.score_observations(observations), self.settings.temperature)

    def sample(self, observations: Sequence[Observation]) -> list[int]:
        """One sampled action index per observation (the rollouts' policy, no gradient)."""
        with torch.inference_mode():
            logp = action_log_probs(self.policy.score_observations(observations), self.settings.temperature)
        return torch.multinomial(logp.exp().cpu(), 1, generator=self.generator).squeeze(1).tolist()

    def prepare(self, batch: GroupBatch) -> UpdateTargets:
        """What an update's gradient steps hold fixed: advantages, taken actions, reference log-probs."""
        device = self.policy.device
        with self.reference.active():
            ref_logp = self.log_probs(batch.observations)
        return UpdateTargets(batch.observations, batch.actions.to(device), group_advantages(batch.returns).to(device), ref_logp)

    def loss(self, targets: UpdateTargets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The GRPO loss of one gradient step (the first call sets ``targets.old_logp``).

        Returns:
            ``(loss, terms)``: the scalar to minimise, and its detached parts (``policy_loss``,
            ``clip_fraction``, ``kl``, ``entropy``, and ``general_kl`` / ``general_norm`` with
            routing terms).
        """
        s = self.settings
        logp_all = self.log_probs(targets.observations)
        logp = logp_all.gather(1, targets.actions)
        if targets.old_logp is None:
            targets.old_logp = logp.detach()
        policy_loss, clip_fraction = clipped_policy_loss(logp, targets.old_logp, targets.advantages, s.clip_low, s.clip_high)
        kl = policy_kl(logp_all, targets.ref_logp)
        loss = policy_loss + s.beta * kl
        terms = {"policy_loss": policy_loss, "clip_fraction": clip_fraction, "kl": kl, "entropy": policy_entropy(logp_all)}
        if self.general is not None:
            for name, value in self.general.terms().items():
                loss = loss + self.general.weights[name] * value.to(loss.device)
                terms[f"general_{name}"] = value
        return loss, {name: value.detach() for name, value in terms.items()}

    def update(self, batch: GroupBatch) -> dict[str, float]:
        """``epochs`` gradient steps on one batch of groups.

        Returns:
            The update's numbers: ``loss``, ``policy_loss``, ``clip_fraction``, ``grad_norm``
            (means over the epochs), ``kl`` (to the reference) and ``entropy`` (before the first
            step), ``return`` / ``return_std`` (of the continuations), ``informative_groups``
            (share of groups whose returns differ), and ``general_kl`` / ``general_norm`` with
            routing terms.
        """
        s = self.settings
        targets = self.prepare(batch)
        sums: dict[str, float] = {}
        first: dict[str, float] = {}
        for epoch in range(s.epochs):
            loss, terms = self.loss(targets)
            if epoch == 0:
                first = {"kl": float(terms.pop("kl")), "entropy": float(terms.pop("entropy"))}
            else:
                del terms["kl"], terms["entropy"]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm if s.max_grad_norm > 0 else float("inf"))
            self.optimizer.step()
            terms.update(loss=loss.detach(), grad_norm=norm)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value)
        self.policy.clear_prefix_cache()  # the weights changed: the cached prefix is stale
        returns = batch.returns
        return {
            **{name: total / s.epochs for name, total in sums.items()},
            **first,
            "return": float(returns.mean()),
            "return_std": float(returns.std()),
            "informative_groups": float((returns.amax(1) > returns.amin(1)).float().mean()),
        }

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable (LoRA) parameters by name, detached copies (for checkpoints)."""
        return {name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put saved trainable parameters back (names must match exactly)."""
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        if set(params) != set(state):
            missing = sorted(set(params) ^ set(state))
            raise IloraError(f"checkpoint weights do not match the model's LoRA parameters (e.g. {missing[0]})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])
        self.policy.clear_prefix_cache()

    def state(self) -> dict:
        """Optimiser, sampler and general-row position, for a checkpoint."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "general_position": None if self.general is None else self.general.position,
        }

    def load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if self.general is not None:
            self.general.position = state["general_position"]

