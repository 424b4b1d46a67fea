"""LoRA-native merges (sum, Core Space, KnOTS, TSV-M, OPCM, I-LoRA's parts) against float64
references written here from the definitions, and factored merged states end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from merge_helpers import build_tiny_lm, make_adapter
from peft.utils import merge_utils

from ilora.errors import IloraError
from ilora.merge import LoraAdapter, apply_merged_state, export_lora, load_merged_state, merge_adapters
from ilora.merge.io import DenseDelta, LowRankDelta, MergedState


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tiny base and adapters a, b, c (r=8, alpha 16) and small (r=4, alpha 4): mixed ranks."""
    root = tmp_path_factory.mktemp("lora_native_zoo")
    base = build_tiny_lm(root / "base")
    paths = {"base": base}
    for seed, name in enumerate(["a", "b", "c"], start=1):
        paths[name] = make_adapter(base, root / name, seed)
    paths["small"] = make_adapter(base, root / "small", 7, r=4, alpha=4)
    return paths


def exact_deltas(path) -> dict[str, torch.Tensor]:
    """Every module's ``s·B@A`` in float64."""
    adapter = LoraAdapter(path)
    out = {}
    for module in adapter.modules:
        d = adapter.load(module)
        out[module] = d.scale * d.lora_B.double() @ d.lora_A.double()
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(got.double() - want) / torch.linalg.matrix_norm(want))


def top_truncation(delta: torch.Tensor, n: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :n] * s[:n]) @ vh[:n]


# ---------------------------------------------------------------- exact factored sum


def test_sum_is_exact_factored_and_exports_without_error(zoo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    weights = [1.0, -0.5, 2.0]
    names = ["a", "b", "small"]
    state = merge_adapters([zoo[n] for n in names], "sum", weights=weights, out=tmp_path / "s", progress=False)
    refs = [exact_deltas(zoo[n]) for n in names]
    record = json.loads((tmp_path / "s" / "merge_record.json").read_text())
    assert record["version"] == 2 and set(record["factored"]) == set(refs[0])
    for module, rank in record["factored"].items():
        assert rank == 8 + 8 + 4
        stored = state.load(module)
        assert isinstance(stored, LowRankDelta) and stored.merged and stored.rank == 20
        want = sum(w * ref[module] for w, ref in zip(weights, refs))
        assert relative_error(state.deltas[f"{module}.weight"], want) < 1e-6
    dense_ta = merge_adapters([zoo[n] for n in names], "task_arithmetic", weights=weights, progress=False)
    for key in dense_ta.deltas:
        torch.testing.assert_close(state.deltas[key], dense_ta.deltas[key], atol=1e-5, rtol=1e-5)

    report = export_lora(state, tmp_path / "lora")  # the state's own rank, 20
    assert report["rank"] == 20 and report["relative_error"] <= 1e-6
    assert sorted(report["from_factors"]) == sorted(record["factored"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["base"]), tmp_path / "lora")
    checked = 0
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            want = state.deltas[f"{name}.weight"].double()
            assert relative_error(module.get_delta_weight("default").detach(), want) <= 1e-6
            checked += 1
    assert checked == len(record["factored"])


def test_factored_export_below_its_rank_is_the_best_approximation(zoo, tmp_path):
    state = merge_adapters([zoo["a"], zoo["b"]], "sum", out=tmp_path / "s", export_lora_rank=5, progress=False)
    report = json.loads((tmp_path / "s" / "lora_rank5" / "export_report.json").read_text())
    assert report["from_factors"] == []
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "s" / "lora_rank5" / "adapter_model.safetensors")
    for module in state.modules:
        delta = state.deltas[f"{module}.weight"].double()
        best = top_truncation(delta, 5)  # Eckart-Young
        key = f"base_model.model.{module}"
        got = tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
        assert relative_error(got, best) < 1e-5
        expected_err = float(torch.linalg.matrix_norm(delta - best) / torch.linalg.matrix_norm(delta))
        assert report["modules"][module] == pytest.approx(expected_err, rel=1e-4, abs=1e-6)


def test_iterative_sum_equals_one_shot_and_stays_factored(zoo, tmp_path):
    merge_adapters([zoo["a"], zoo["small"]], "sum", out=tmp_path / "first", progress=False)
    folded = merge_adapters([tmp_path / "first", zoo["c"]], "sum", out=tmp_path / "then", progress=False)
    one_shot = merge_adapters([zoo["a"], zoo["small"], zoo["c"]], "sum", progress=False)
    for module in one_shot.modules:
        assert folded.load(module).rank == 8 + 4 + 8
        torch.testing.assert_close(folded.deltas[f"{module}.weight"], one_shot.deltas[f"{module}.weight"], atol=1e-6, rtol=1e-6)


def test_sum_with_a_dense_state_is_dense_and_exact(zoo):
    dense = merge_adapters([zoo["a"], zoo["b"]], "task_arithmetic", progress=False)
    state = merge_adapters([dense, zoo["c"]], "sum", progress=False)
    ref_c = exact_deltas(zoo["c"])
    for module in state.modules:
        assert isinstance(state.load(module), DenseDelta)
        want = dense.deltas[f"{module}.weight"].double() + ref_c[module]
        assert relative_error(state.deltas[f"{module}.weight"], want) < 1e-6


def test_factored_state_applies_to_the_model(zoo, tmp_path):
    from ilora.models.load import load_model

    state = merge_adapters([zoo["a"], zoo["b"]], "sum", out=tmp_path / "s", progress=False)
    base, merged = load_model(zoo["base"], dtype="float32"), load_model(zoo["base"], dtype="float32")
    apply_merged_state(merged, load_merged_state(tmp_path / "s"))
    params, base_params = dict(merged.named_parameters()), dict(base.named_parameters())
    for key in state.deltas:
        torch.testing.assert_close(params[key] - base_params[key], state.deltas[key], atol=1e-5, rtol=1e-4)
    assert [tuple(v.shape) for v in state.deltas.values()] == list(state.modules.values())  # a full Mapping


# ---------------------------------------------------------------- Core Space


def test_core_ta_equals_full_space_task_arithmetic_with_mixed_ranks(zoo):
    weights = [1.0, 0.3, -0.7]
    names = ["a", "small", "c"]
    state = merge_adapters([zoo[n] for n in names], "core_ta", weights=weights, progress=False)
    refs = [exact_deltas(zoo[n]) for n in names]
    for module in state.modules:
        assert isinstance(state.load(module), LowRankDelta)
        want = sum(w * ref[module] for w, ref in zip(weights, refs))
        assert relative_error(state.deltas[f"{module}.weight"], want) < 1e-6


def test_core_rules_of_one_adapter_give_the_adapter(zoo):
    """One task: TIES at density 1 keeps it whole, TSV-M keeps all its triplets (polar factors of orthonormal sets)."""
    ref = exact_deltas(zoo["a"])
    for method in ("core_ties", "core_tsv"):
        options = {"density": 1.0} if method == "core_ties" else {}
        state = merge_adapters([zoo["a"]], method, progress=False, **options)
        for module, want in ref.items():
            assert relative_error(state.deltas[f"{module}.weight"], want) < 1e-5, method


def test_core_iso_flattens_the_spectrum_within_the_span(zoo):
    state = merge_adapters([zoo["a"], zoo["b"]], "core_iso", progress=False)
    refs = [exact_deltas(zoo[n]) for n in ("a", "b")]
    for module in state.modules:
        total = refs[0][module] + refs[1][module]
        s_sum = torch.linalg.svdvals(total)
        k = min(16, *total.shape)  # the core is min(out, 16) x min(in, 16)
        s = torch.linalg.svdvals(state.deltas[f"{module}.weight"].double())
        torch.testing.assert_close(s[:k], torch.full((k,), float(s_sum[:k].mean()), dtype=torch.float64), rtol=1e-4, atol=0)


# ---------------------------------------------------------------- KnOTS


def knots_reference(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """KnOTS-TIES in float64 on the dense concatenation [ΔW_1 … ΔW_T] (along the input dim)."""
    u, s, vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    kept = int((s > 1e-5 * s[0]).sum())
    blocks = (s[:kept, None] * vh[:kept]).split(deltas[0].shape[1], dim=1)
    merged = merge_utils.ties(list(blocks), torch.ones(len(deltas), dtype=torch.float64), density)
    return u[:, :kept] @ merged


def test_knots_ties_matches_its_definition(zoo):
    names = ["a", "b", "small"]
    state = merge_adapters([zoo[n] for n in names], "knots_ties", density=0.4, progress=False)
    refs = [exact_deltas(zoo[n]) for n in names]
    for module in state.modules:
        stored = state.load(module)
        assert isinstance(stored, LowRankDelta) and stored.rank <= 20
        want = knots_reference([ref[module] for ref in refs], 0.4)
        assert relative_error(state.deltas[f"{module}.weight"], want) < 1e-4


def test_knots_dare_ties_at_full_density_is_knots_ties(zoo):
    ties = merge_adapters([zoo["a"], zoo["small"]], "knots_ties", density=1.0, progress=False)
    dare = merge_adapters([zoo["a"], zoo["small"]], "knots_dare_ties", density=1.0, progress=False)
    for key in ties.deltas:
        torch.testing.assert_close(dare.deltas[key], ties.deltas[key], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- TSV-M


def tsv_reference(deltas: list[torch.Tensor], ranks: list[int], alpha: float) -> torch.Tensor:
    """TSV-M in float64 from dense SVDs: top min(⌊min(m,n)/T⌋, r_t) triplets, orthogonalised stacks."""
    per_task = min(deltas[0].shape) // len(deltas)
    us, ss, vs = [], [], []
    for delta, r in zip(deltas, ranks):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(per_task, r)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)

    def orthogonalised(x):
        p, _, qh = torch.linalg.svd(x, full_matrices=False)
        return p @ qh

    u_perp, v_perp = orthogonalised(torch.cat(us, dim=1)), orthogonalised(torch.cat(vs, dim=1))
    return alpha * (u_perp * torch.cat(ss)) @ v_perp.T


def test_tsv_matches_its_definition_with_mixed_ranks(zoo):
    names, ranks = ["a", "b", "small"], [8, 8, 4]
    state = merge_adapters([zoo[n] for n in names], "tsv", alpha=0.7, progress=False)
    refs = [exact_deltas(zoo[n]) for n in names]
    for module in state.modules:
        assert isinstance(state.load(module), LowRankDelta)
        want = tsv_reference([ref[module] for ref in refs], ranks, 0.7)
        assert relative_error(state.deltas[f"{module}.weight"], want) < 1e-5


# ---------------------------------------------------------------- OPCM


def opcm_reference(deltas: list[torch.Tensor], alpha: float = 0.5) -> tuple[torch.Tensor, float]:
    """OPCM in float64 with full SVDs: P's diagonal (over τ_m's nonzero σ) and top-left k x k zeroed."""
    merged, lam = deltas[0], 1.0
    for new in deltas[1:]:
        u, s, vh = torch.linalg.svd(merged, full_matrices=True)
        rank = int((s > 1e-5 * s[0]).sum())
        frac = s[:rank].cumsum(0) / s[:rank].sum()
        k = int(torch.nonzero(frac > alpha)[0])
        p = u.T @ new @ vh.T
        p[:k, :k] = 0
        p[range(rank), range(rank)] = 0
        numerator = lam * merged + u @ p @ vh
        lam = float(torch.linalg.matrix_norm(numerator) / torch.linalg.matrix_norm(merged))
        merged = numerator / lam
    return merged, lam


def test_opcm_all_at_once_and_iterative_match_the_reference(zoo, tmp_path):
    names = ["a", "small", "c"]
    refs = [exact_deltas(zoo[n]) for n in names]
    at_once = merge_adapters([zoo[n] for n in names], "opcm", progress=False)
    merge_adapters([zoo["a"], zoo["small"]], "opcm", out=tmp_path / "ab", progress=False)
    folded = merge_adapters([tmp_path / "ab", zoo["c"]], "opcm", out=tmp_path / "abc", progress=False)
    for module in at_once.modules:
        want, lam = opcm_reference([ref[module] for ref in refs])
        for state in (at_once, folded):
            assert isinstance(state.load(module), LowRankDelta)
            assert relative_error(state.deltas[f"{module}.weight"], want) < 1e-4
            assert state.records[module]["lambda"] == pytest.approx(lam, rel=1e-4)
            assert state.records[module]["tasks"] == 3


def test_opcm_refuses_other_merged_states(zoo, tmp_path):
    other = merge_adapters([zoo["a"], zoo["b"]], "sum", progress=False)
    with pytest.raises(IloraError, match="only its own merged states"):
        merge_adapters([other, zoo["c"]], "opcm", progress=False)
    own = merge_adapters([zoo["a"], zoo["b"]], "opcm", progress=False)
    with pytest.raises(IloraError, match="given first"):
        merge_adapters([zoo["c"], own], "opcm", progress=False)


# ---------------------------------------------------------------- I-LoRA in its parts


def test_ilora_truncate_is_the_sum_of_truncations(zoo):
    names, ranks = ["a", "small"], [8, 4]
    state = merge_adapters([zoo[n] for n in names], "ilora_truncate", progress=False)
    refs = [exact_deltas(zoo[n]) for n in names]
    for module in state.modules:
        assert state.load(module).rank == math.ceil(0.8 * 8) + math.ceil(0.8 * 4)
        want = sum(top_truncation(ref[module], math.ceil(0.8 * r)) for ref, r in zip(refs, ranks))
        assert relative_error(state.deltas[f"{module}.weight"], want) < 1e-5


def test_ilora_maxmag_is_magmax_on_adapters(zoo):
    parts = merge_adapters([zoo["a"], zoo["b"], zoo["small"]], "ilora_maxmag", progress=False)
    magmax = merge_adapters([zoo["a"], zoo["b"], zoo["small"]], "magmax", progress=False)
    for module, record in parts.records.items():
        assert [i["kept"] for i in record["inputs"]] == [8, 8, 4]
        # Same rule on the same deltas (rebuilt from their SVDs): equal up to rounding.
        torch.testing.assert_close(parts.deltas[f"{module}.weight"], magmax.deltas[f"{module}.weight"], atol=1e-5, rtol=1e-5)


def test_ilora_folds_a_factored_state_like_its_dense_copy(zoo):
    factored = merge_adapters([zoo["a"], zoo["b"]], "sum", progress=False)
    dense = MergedState({key: factored.deltas[key] for key in factored.deltas}, meta=factored.meta)
    from_factors = merge_adapters([factored, zoo["c"]], "ilora", progress=False)
    from_dense = merge_adapters([dense, zoo["c"]], "ilora", progress=False)
    for module, record in from_factors.records.items():
        assert record["inputs"][0]["kept"] == from_dense.records[module]["inputs"][0]["kept"]
        torch.testing.assert_close(
            from_factors.deltas[f"{module}.weight"], from_dense.deltas[f"{module}.weight"], atol=2e-4, rtol=1e-3
        )
