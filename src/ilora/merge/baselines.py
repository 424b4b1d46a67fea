"""Task arithmetic, TIES, DARE and magnitude pruning on the true deltas ``s·B@A``.

PEFT's non-SVD ``add_weighted_adapter`` types apply these rules to the ``A`` and ``B``
factors separately (PEFT issue 3004); here they act on the products, using PEFT's own
``merge_utils`` functions so the rules are exactly PEFT's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ilora.config import field
from ilora.errors import IloraError
from ilora.merge.io import ModuleDelta
from ilora.merge.method import MergeMethod, input_weights, module_generator, register

RULES = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def check_rule_options(density: float, majority_sign_method: str) -> None:
    """Refuse a pruning density outside [0, 1] or an unknown TIES sign election (one line each)."""
    if not 0 <= density <= 1:
        raise IloraError(f"--density {density}: must be in [0, 1]")
    if majority_sign_method not in ("total", "frequency"):
        raise IloraError(f"majority_sign_method {majority_sign_method!r}: expected 'total' or 'frequency'")


def apply_rule(
    rule: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: str,
    seed: int = 0,
) -> torch.Tensor:
    """One of ``RULES`` over same-shape tensors, by PEFT's ``merge_utils``.

    Args:
        rule: one of ``RULES``.
        tensors: the task tensors.
        weights: one weight per tensor.
        density: fraction of entries kept by pruning (ignored by ``task_arithmetic``).
        majority_sign_method: TIES sign election, ``"total"`` or ``"frequency"``.
        seed: torch seed of DARE's random drop masks (the global RNG is restored afterwards).

    Returns:
        The merged tensor.
    """
    # Imported here: every ilora command lists the merge methods, few of them run one.
    from peft.utils import merge_utils

    sign = {"majority_sign_method": majority_sign_method}
    if rule == "task_arithmetic":
        return merge_utils.task_arithmetic(tensors, weights)
    if rule == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, weights, density)
    if rule == "ties":
        return merge_utils.ties(tensors, weights, density, **sign)
    # DARE draws its masks from torch's global RNG: seed it, then restore it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if rule == "dare_linear":
            return merge_utils.dare_linear(tensors, weights, density)
        return merge_utils.dare_ties(tensors, weights, density, **sign)


@register("task_arithmetic", rule="task_arithmetic")
@register("ties", rule="ties")
@register("dare_linear", rule="dare_linear")
@register("dare_ties", rule="dare_ties")
@register("magnitude_prune", rule="magnitude_prune")
@dataclass
class DeltaRuleMerge(MergeMethod):
    """One of PEFT's ``merge_utils`` rules applied to the dense per-module deltas."""

    rule: str = field("task_arithmetic", help="which rule (fixed by the method name)")
    weights: list[float] | None = field(None, help="one weight per input (default 1.0 each)")
    density: float = field(0.5, help="fraction of entries kept by pruning (ties, dare_*, magnitude_prune)")
    majority_sign_method: str = field("total", help="TIES sign election: 'total' or 'frequency'")
    seed: int = field(0, help="seed of DARE's random drop masks (per module)")

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise IloraError(f"rule {self.rule!r}: expected one of {RULES}")
        check_rule_options(self.density, self.majority_sign_method)

    def merge_module(self, module: str, deltas: list[ModuleDelta | None]) -> tuple[torch.Tensor, dict]:
        weights = input_weights(self.weights, len(deltas), self.name)
        present = [(d.dense(), w) for d, w in zip(deltas, weights) if d is not None]
        tensors = [t for t, _ in present]
        w = torch.tensor([w for _, w in present])
        seed = int(module_generator(self.seed, module).initial_seed())  # DARE's masks: per module
        merged = apply_rule(self.rule, tensors, w, self.density, self.majority_sign_method, seed)
        return merged, {"n_inputs": len(present)}
