"""How much an element-wise max-magnitude merge disturbs each adapter's delta (a diagnostic).

A merged delta keeps each adapter's function only where the other adapters' entries that
replaced its own act weakly on its inputs. This module measures the weight-space side of
that: per adapter, the share of merged entries taken from it and how far the merged delta
is from its own (relative Frobenius distance), plus the adapters' pairwise cosines.

The activation side uses each adapter's input Grams (``ilora.merge.grams``): with ``G`` the
mean Gram of task i's inputs at a module, ``‖ΔW X_i‖_F² / count = tr(ΔW G ΔWᵀ)``, so
``‖ΔW_j X_i‖ / ‖ΔW_i X_i‖`` says how loud adapter j is on task i next to task i's own adapter,
and ``‖(ΔW_M − ΔW_i) X_i‖ / ‖ΔW_i X_i‖`` how much a merged state M changes task i's outputs.

    ilora analyze merge runs/pong runs/breakout --keep 0.8
    ilora analyze interference runs/pong runs/breakout --data Pong=data/pong --data Breakout=data/breakout \
        --merged merged/two
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence

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


def output_energy(delta: ops.Candidate, gram: torch.Tensor) -> float:
    """``tr(ΔW G ΔWᵀ)``: the mean squared output norm ``‖ΔW X‖_F² / count`` for ``G = XᵀX / count``.

    Args:
        delta: ``ΔW`` dense (``out x n``) or a low-rank pair ``(left, right)`` standing for
            ``left @ right``; a pair costs ``O(r·n² + r²·out)`` as ``tr((leftᵀleft)(right G rightᵀ))``.
        gram: ``n x n`` symmetric mean input Gram.

    Returns:
        The energy, computed in float64.
    """
    gram = gram.double()
    if isinstance(delta, tuple):
        left, right = (t.double() for t in delta)
        return float(((left.T @ left) * (right @ gram @ right.T)).sum())
    dense = delta.double()
    return float(((dense @ gram) * dense).sum())


def delta_difference(a: ops.Candidate, b: ops.Candidate) -> ops.Candidate:
    """``a − b``: a low-rank pair (factors side by side) when both are pairs, else dense.

    Args:
        a: dense ``out x n`` or a pair ``(left, right)``.
        b: the same.

    Returns:
        The difference as a pair of rank ``r_a + r_b``, or a dense ``out x n`` tensor.
    """
    if isinstance(a, tuple) and isinstance(b, tuple):
        return torch.cat([a[0], -b[0]], 1), torch.cat([a[1], b[1]], 0)

    def dense(c: ops.Candidate) -> torch.Tensor:
        return c[0] @ c[1] if isinstance(c, tuple) else c

    return dense(a) - dense(b)


def _ratio(energy: float, own: float) -> float | None:
    """``sqrt(energy / own)``; ``None`` when the own output is zero (the ratio is undefined)."""
    return math.sqrt(energy / own) if own > 0 else None


def activation_interference(
    modules: Sequence[str],
    adapters: Sequence[Callable[[str], ops.Candidate]],
    task_grams: Sequence[Callable[[str], torch.Tensor]],
    merged: Mapping[str, Callable[[str], ops.Candidate | None]] | None = None,
) -> dict:
    """Interference in activations between adapters, and of merged states, on each task's inputs.

    Streams module by module: every callable reads one module when asked.

    Args:
        modules: the modules, all adapted by every adapter.
        adapters: per adapter i, ``module -> ΔW_i`` (dense or a low-rank pair).
        task_grams: per adapter i, ``module -> G_i``, the mean input Gram of task i's rows.
        merged: per merged state name, ``module -> ΔW_M`` (``None``: the state leaves it unchanged).

    Returns:
        ``{"ratio": [[‖ΔW_j X_i‖ / ‖ΔW_i X_i‖]], "merged": {name: [‖(ΔW_M − ΔW_i) X_i‖ /
        ‖ΔW_i X_i‖]], "own": [‖ΔW_i X_i‖² / count], "modules": {module: {"ratio", "merged",
        "own"}}}``: the top level aggregates the modules (squared norms summed before the
        ratio); a ratio is ``None`` where task i's own output is zero.
    """
    merged = dict(merged or {})
    n = len(adapters)
    if len(task_grams) != n:
        raise IloraError(f"{n} adapters but {len(task_grams)} Gram sets")
    cross = torch.zeros(n, n, dtype=torch.float64)  # cross[i, j] = Σ_m tr(ΔW_j G_i ΔW_jᵀ)
    change = {name: torch.zeros(n, dtype=torch.float64) for name in merged}
    per_module = {}
    for module in modules:
        deltas = [load(module) for load in adapters]
        energies = torch.zeros(n, n, dtype=torch.float64)
        changes = {name: torch.zeros(n, dtype=torch.float64) for name in merged}
        states = {name: load(module) for name, load in merged.items()}
        for i in range(n):
            gram = task_grams[i](module)
            for j in range(n):
                energies[i, j] = output_energy(deltas[j], gram)
            for name, state in states.items():
                diff = deltas[i] if state is None else delta_difference(state, deltas[i])
                changes[name][i] = output_energy(diff, gram)
        cross += energies
        for name in merged:
            change[name] += changes[name]
        per_module[module] = _ratios(energies, changes)
    return {**_ratios(cross, change), "modules": per_module}


def _ratios(energies: torch.Tensor, changes: Mapping[str, torch.Tensor]) -> dict:
    own = energies.diagonal().tolist()
    n = len(own)
    return {
        "ratio": [[_ratio(float(energies[i, j]), own[i]) for j in range(n)] for i in range(n)],
        "merged": {name: [_ratio(float(c[i]), own[i]) for i in range(n)] for name, c in changes.items()},
        "own": own,
    }


def adapter_interference(
    adapters: Sequence[str | os.PathLike], merged: Sequence[str | os.PathLike] = ()
) -> dict:
    """``activation_interference`` of PEFT LoRA adapters on their own task Grams (each adapter's
    ``grams.safetensors``), and of merged states against each of them.

    Args:
        adapters: adapter folders, each with its Grams (``ilora grams``); all adapt the same modules.
        merged: merged-state folders (``ilora merge``); a module they leave out is an unchanged one.

    Returns:
        ``activation_interference``'s result with ``"adapters"`` and ``"merged_states"`` (the paths).
    """
    from ilora.merge.io import LoraAdapter, load_merged_state

    sources = [LoraAdapter(a) for a in adapters]
    grams = [source.grams() for source in sources]  # refuses missing, stale or corrupt Grams first
    shapes = sources[0].modules
    for source in sources[1:]:
        if source.modules != shapes:
            raise IloraError(f"{source.path}: adapts other modules or shapes than {sources[0].path}")
    states = {str(m): load_merged_state(m) for m in merged}
    for name, state in states.items():
        for module, shape in state.modules.items():
            if module not in shapes:
                raise IloraError(f"{name}: module {module!r} is adapted by none of the adapters; no Gram for it")
            if tuple(shape) != tuple(shapes[module]):
                raise IloraError(f"{name}: module {module!r} has shape {tuple(shape)}, the adapters {shapes[module]}")

    def state_delta(state):
        return lambda module: state.load(module).candidate() if module in state.modules else None

    stats = activation_interference(
        list(shapes),
        [lambda module, s=source: s.load(module).candidate() for source in sources],
        [g.task for g in grams],
        {name: state_delta(state) for name, state in states.items()},
    )
    return {"adapters": [str(a) for a in adapters], "merged_states": list(states), **stats}


def format_activation_interference(names: Sequence[str], stats: dict) -> str:
    """A plain-text table: ``‖ΔW_j X_i‖ / ‖ΔW_i X_i‖`` (row i: task, column j: adapter), then one
    row per merged state with ``‖(ΔW_M − ΔW_i) X_i‖ / ‖ΔW_i X_i‖`` per task."""

    def cell(value: float | None) -> str:
        return f"{value:9.3f}" if value is not None else f"{'n/a':>9s}"

    width = max([len(n) for n in names] + [len(m) for m in stats["merged"]] + [16])
    header = "  ".join(f"{n[:9]:>9s}" for n in names)
    lines = [f"{'task / adapter':{width}s}  {header}   (||dW_j X_i|| / ||dW_i X_i||)"]
    for name, row in zip(names, stats["ratio"]):
        lines.append(f"{name:{width}s}  " + "  ".join(cell(v) for v in row))
    if stats["merged"]:
        lines.append("")
        lines.append(f"{'merged / task':{width}s}  {header}   (||(dW_M - dW_i) X_i|| / ||dW_i X_i||)")
        for state, row in stats["merged"].items():
            lines.append(f"{state:{width}s}  " + "  ".join(cell(v) for v in row))
    return "\n".join(lines)
