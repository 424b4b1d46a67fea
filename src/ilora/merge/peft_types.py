"""PEFT's own ``add_weighted_adapter`` combination types, run by PEFT on the base model.

The base model is loaded with every input adapter attached; PEFT builds the combined
adapter; its per-module ``get_delta_weight`` is the merged ``ΔW``. So the baseline numbers
are PEFT's, including its habit of combining ``A`` and ``B`` separately in the non-SVD types.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ilora.config import field
from ilora.errors import IloraError
from ilora.merge.io import LoraAdapter
from ilora.merge.method import MergeMethod, Source, input_weights, register

PEFT_TYPES = (
    "cat",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
# Types PEFT runs on stacked A and B factors: every adapter must have the same rank.
EQUAL_RANK_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_TYPES = tuple(t for t in PEFT_TYPES if t.startswith(("ties", "dare", "magnitude")))
MERGED_ADAPTER = "ilora_merged"


def peft_rank(adapter: LoraAdapter) -> int:
    """The rank PEFT's own check uses: ``r``, or the largest of ``rank_pattern``."""
    config = adapter.config
    return max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])


def build_peft_model(base: str, adapters: list[LoraAdapter]):
    """The base model (via ``ilora.models.load``) with every adapter loaded as ``a0, a1, ...``."""
    from peft import PeftModel

    from ilora.models.load import load_model

    model = load_model(base, dtype="float32")
    peft_model = PeftModel.from_pretrained(model, str(adapters[0].path), adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], start=1):
        peft_model.load_adapter(str(adapter.path), adapter_name=f"a{i}")
    return peft_model


def lora_deltas(peft_model, adapter_name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module, ΔW)`` for each LoRA layer of ``adapter_name``, names as in the base model."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module.get_delta_weight(adapter_name).detach().float()


@dataclass
class PeftWeightedAdapter(MergeMethod):
    """``PeftModel.add_weighted_adapter(combination_type=...)`` with PEFT's defaults.

    Weights default to 1.0 each (a plain sum, as task arithmetic); ``density`` (0.5) is
    passed only to the types that prune; ``svd_rank`` left unset is PEFT's default, the
    largest input rank. DARE's random masks come from torch's RNG, seeded with ``seed``.
    """

    accepts_merged = False
    needs_base = True

    combination_type: str = field("svd", help="PEFT combination type (fixed by the method name)")
    weights: list[float] | None = field(None, help="one weight per adapter (default 1.0 each)")
    density: float = field(0.5, help="fraction kept by the pruning types")
    svd_rank: int | None = field(None, help="rank of the *_svd result (default: PEFT's, the largest input rank)")
    majority_sign_method: str = field("total", help="TIES sign election: 'total' or 'frequency'")
    seed: int = field(0, help="torch seed set before PEFT draws DARE masks")

    def check(self, inputs: list[Source]) -> None:
        super().check(inputs)
        self.n_inputs = len(inputs)
        if self.combination_type in EQUAL_RANK_TYPES:
            ranks = {str(a.path): peft_rank(a) for a in inputs}
            if len(set(ranks.values())) > 1:
                listing = ", ".join(f"{p} (r={r})" for p, r in ranks.items())
                raise IloraError(f"--method {self.name} needs adapters of equal rank; got {listing}")

    def options(self) -> dict:
        """The options plus the exact ``add_weighted_adapter`` arguments they resolve to."""
        resolved = self.peft_kwargs(self.n_inputs) if hasattr(self, "n_inputs") else None
        return {**super().options(), "add_weighted_adapter": resolved}

    def peft_kwargs(self, n_inputs: int) -> dict:
        """The exact arguments given to ``add_weighted_adapter`` (besides the adapter names)."""
        kwargs = {
            "weights": input_weights(self.weights, n_inputs, self.name),
            "combination_type": self.combination_type,
            "svd_rank": self.svd_rank,
            "majority_sign_method": self.majority_sign_method,
        }
        if self.combination_type in DENSITY_TYPES:
            kwargs["density"] = self.density
        return kwargs

    def run(
        self, inputs: list[Source], modules: dict[str, tuple[int, int]], base: str | None = None
    ) -> Iterator[tuple[str, torch.Tensor, dict]]:
        model = build_peft_model(base, inputs)
        names = [f"a{i}" for i in range(len(inputs))]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model.add_weighted_adapter(names, adapter_name=MERGED_ADAPTER, **self.peft_kwargs(len(inputs)))
        with torch.no_grad():
            for module, delta in lora_deltas(model, MERGED_ADAPTER):
                yield module, delta, {"peft_rank": model.peft_config[MERGED_ADAPTER].r}


for _type in PEFT_TYPES:
    register(f"peft:{_type}", combination_type=_type)(PeftWeightedAdapter)
