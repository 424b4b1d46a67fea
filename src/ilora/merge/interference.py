"""How much an element-wise max-magnitude merge disturbs each adapter's delta (a diagnostic).

A merged delta keeps each adapter's function only where the other adapters' entries that
replaced its own act weakly on its inputs. This module measures the weight-space side of
that: per adapter, the share of merged entries taken from it and how far the merged delta
is from its own (relative Frobenius distance), plus the adapters' pairwise cosines.

    ilora analyze merge runs/pong runs/breakout --keep 0.8
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from ilora.errors import IloraError
from ilora.merge import ops


def interference_stats(deltas: Sequence[dict[str, torch.Tensor]]) -> dict:
    """Weight-space interference of a max-magnitude merge (SPEC §2.4) of dense deltas.

    Args:
        deltas: per adapter, ``{module: out x in delta}``; every adapter has the same modules
            and shapes.

    Returns:
        ``{"norm": [‖Δ_i‖], "share": [entries the merge takes from i / all entries],
        "change": [‖M - Δ_i‖ / ‖Δ_i‖], "cosine": [[<Δ_i, Δ_j> / (‖Δ_i‖ ‖Δ_j‖)]]}``, norms and
        inner products summed over modules; ties go to the later adapter, as in the merge.
    """
    n = len(deltas)
    if n < 2:
        raise IloraError(f"interference needs at least two adapters, got {n}")
    modules = sorted(deltas[0])
    for i, d in enumerate(deltas[1:], 1):
        if sorted(d) != modules:
            raise IloraError(f"adapter {i} adapts other modules than adapter 0")
    dots = torch.zeros(n, n, dtype=torch.float64)
    dist = torch.zeros(n, dtype=torch.float64)
    taken = torch.zeros(n, dtype=torch.float64)
    total = 0
    for m in modules:
        stack = torch.stack([d[m].float() for d in deltas])
        flat = stack.flatten(1).double()
        dots += flat @ flat.T
        # Which adapter each merged entry comes from: the last index of the largest magnitude
        # (the later adapter wins ties, as in ops.max_magnitude), and the merge is that pick.
        owner = n - 1 - stack.abs().flip(0).argmax(0)
        merged = stack.gather(0, owner.unsqueeze(0))
        dist += (stack - merged).flatten(1).double().pow(2).sum(1)
        taken += torch.bincount(owner.flatten(), minlength=n).double()
        total += owner.numel()
    norm = dots.diagonal().sqrt()
    safe = norm.clamp_min(1e-30)
    return {
        "norm": norm.tolist(),
        "share": (taken / total).tolist(),
        "change": (dist.sqrt() / safe).tolist(),
        "cosine": (dots / torch.outer(safe, safe)).tolist(),
    }


def truncated_deltas(adapter: str | os.PathLike, keep: float) -> dict[str, torch.Tensor]:
    """Every module's delta of a PEFT LoRA adapter after I-LoRA's single-adapter truncation."""
    from ilora.merge.io import LoraAdapter

    if not 0 < keep <= 1:
        raise IloraError(f"--keep {keep}: must be in (0, 1]")
    source = LoraAdapter(adapter)
    out = {}
    for module in source.modules:
        d = source.load(module)
        (left, right), _ = ops.truncated_lora(d.lora_B, d.lora_A, d.scale, keep)
        out[module] = left @ right
    return out


def format_interference(names: Sequence[str], stats: dict) -> str:
    """A plain-text table: one row per adapter, then the cosine matrix."""
    width = max(len(n) for n in names)
    lines = [f"{'adapter':{width}s}  {'|delta|':>9s}  {'share of merged entries':>23s}  {'|merged - delta| / |delta|':>26s}"]
    for name, norm, share, change in zip(names, stats["norm"], stats["share"], stats["change"]):
        lines.append(f"{name:{width}s}  {norm:9.4g}  {share:23.3f}  {change:26.3f}")
    lines.append("")
    lines.append(f"{'cosine':{width}s}  " + "  ".join(f"{i:>7d}" for i in range(len(names))))
    for i, (name, row) in enumerate(zip(names, stats["cosine"])):
        cells = "  ".join(f"{c:7.3f}" if math.isfinite(c) else f"{'n/a':>7s}" for c in row)
        lines.append(f"{i:<{width}d}  {cells}")
    return "\n".join(lines)
