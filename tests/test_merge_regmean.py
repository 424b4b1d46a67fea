"""RegMean and regmean_lowrank on LoRA deltas: float64 references, iteration from stored sums, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ilora.errors import IloraError
from ilora.fileio import file_sha256
from ilora.merge import LoraAdapter, merge_adapters
from ilora.merge.grams import GRAMS_FILE, GRAMS_FORMAT, GRAMS_VERSION

# Two modules of different shapes (out, in); the inputs of each are drawn per task.
MODULES = {"layers.0.attn.q_proj": (6, 8), "layers.0.mlp.down_proj": (5, 12)}
RANK, LORA_ALPHA = 2, 4  # scale 2.0


def write_adapter(folder: Path, seed: int, modules: dict[str, tuple[int, int]] = MODULES) -> Path:
    """A PEFT LoRA adapter folder with random factors (no model needed)."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    tensors = {}
    for module, (out, inp) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, inp, generator=gen)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, RANK, generator=gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": LORA_ALPHA, "target_modules": ["q_proj", "down_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def mean_gram(rows: torch.Tensor) -> torch.Tensor:
    return (rows.double().T @ rows.double() / rows.shape[0]).float()


def write_grams(folder: Path, task: dict[str, torch.Tensor], general: dict[str, torch.Tensor] | None = None) -> None:
    """``grams.safetensors`` in the format ``ilora.merge.grams`` reads, from input rows per module."""
    kinds = {"task": task, **({"general": general} if general else {})}
    tensors = {f"{m}.{kind}": mean_gram(rows) for kind, per in kinds.items() for m, rows in per.items()}
    metadata = {
        "format": GRAMS_FORMAT,
        "version": GRAMS_VERSION,
        "counts": json.dumps({kind: {m: rows.shape[0] for m, rows in per.items()} for kind, per in kinds.items()}),
        "task_rows": "1",
        "general_rows": "1" if general else "0",
        "adapter_sha256": file_sha256(folder / "adapter_model.safetensors"),
    }
    save_file(tensors, str(folder / GRAMS_FILE), metadata=metadata)


def rows_for(seed: int, count: int = 40, columns: slice | None = None) -> dict[str, torch.Tensor]:
    """Input rows per module: correlated Gaussians (a random mixing), optionally on some columns only."""
    gen = torch.Generator().manual_seed(seed)
    rows = {}
    for module, (_, inp) in MODULES.items():
        x = torch.randn(count, inp, generator=gen) @ torch.randn(inp, inp, generator=gen)
        if columns is not None:
            x[:, [c for c in range(inp) if c not in range(inp)[columns]]] = 0
        rows[module] = x
    return rows


def delta_of(folder: Path, module: str) -> torch.Tensor:
    return LoraAdapter(folder).load(module).dense().double()


def reference(
    folders: list[Path],
    task: list[dict],
    general: list[dict | None],
    weights: list[float],
    alpha: float,
    general_weight: float,
    ridge: float,
) -> dict[str, torch.Tensor]:
    """RegMean's closed form in float64 from the rows themselves."""

    def stabilised(rows: torch.Tensor) -> torch.Tensor:
        gram = rows.double().T @ rows.double() / rows.shape[0]
        return alpha * gram + (1 - alpha) * torch.diag(gram.diagonal())

    merged = {}
    for module, (out, inp) in MODULES.items():
        rhs, system = (torch.zeros(out, inp, dtype=torch.float64), torch.zeros(inp, inp, dtype=torch.float64))
        for folder, rows, general_rows, w in zip(folders, task, general, weights):
            rhs += w * delta_of(folder, module) @ stabilised(rows[module])
            system += w * stabilised(rows[module])
            if general_rows is not None:
                system += general_weight * w * stabilised(general_rows[module])
        system += ridge * system.diagonal().mean() * torch.eye(inp, dtype=torch.float64)
        merged[module] = torch.linalg.solve(system, rhs.T).T
    return merged


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Adapters a, b, c with task and general Grams; ``rows`` keeps the rows they came from."""
    root = tmp_path_factory.mktemp("regmean_zoo")
    zoo = {"root": root, "task": {}, "general": {}}
    for seed, name in enumerate("abc", start=1):
        zoo[name] = write_adapter(root / name, seed)
        zoo["task"][name], zoo["general"][name] = (rows_for(10 + seed), rows_for(20 + seed))
        write_grams(zoo[name], zoo["task"][name], zoo["general"][name])
    return zoo


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """Float32 results against float64 references: relative to the reference's scale."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=rtol * scale)


def test_identity_grams_give_the_weighted_average(tmp_path):
    folders = []
    for seed in range(3):
        folder = write_adapter(tmp_path / f"a{seed}", seed)
        identity = {m: torch.eye(inp) * inp**0.5 for m, (_, inp) in MODULES.items()}  # Xᵀ X / n = I
        write_grams(folder, identity)
        folders.append(folder)
    weights = [1.0, 2.0, 0.5]
    state = merge_adapters(
        folders, "regmean", progress=False, alpha=1.0, ridge=0.0, general_weight=0.0, weights=weights
    )
    for module in MODULES:
        expected = sum(w * delta_of(f, module) for f, w in zip(folders, weights)) / sum(weights)
        assert_close64(state.deltas[f"{module}.weight"], expected, rtol=1e-5)
        assert state.records[module]["solver"] == "cholesky"


def test_disjoint_supports_keep_each_task_delta_on_its_own_inputs(tmp_path):
    # Task 0 uses the first half of each module's input columns, task 1 the second half.
    halves = [slice(0, None, 2), slice(1, None, 2)]
    folders, task_rows = [], []
    for i, columns in enumerate(halves):
        folder = write_adapter(tmp_path / f"t{i}", 30 + i)
        task_rows.append(rows_for(40 + i, columns=columns))
        write_grams(folder, task_rows[-1])
        folders.append(folder)
    state = merge_adapters(folders, "regmean", progress=False, alpha=1.0, ridge=0.0, general_weight=0.0)
    for module in MODULES:
        merged = state.deltas[f"{module}.weight"].double()
        for folder, rows in zip(folders, task_rows):
            x = rows[module].double()
            assert_close64(merged @ x.T, delta_of(folder, module) @ x.T)


@pytest.mark.parametrize("options", [{}, {"alpha": 1.0, "ridge": 0.0}, {"general_weight": 0.0, "alpha": 0.3}])
def test_matches_the_float64_closed_form_from_the_rows(zoo, options):
    weights = [1.0, 0.5, 2.0]
    state = merge_adapters([zoo[n] for n in "abc"], "regmean", progress=False, weights=weights, **options)
    alpha, ridge, general_weight = (
        options.get("alpha", 0.6),
        options.get("ridge", 1e-4),
        options.get("general_weight", 1.0),
    )
    expected = reference(
        [zoo[n] for n in "abc"],
        [zoo["task"][n] for n in "abc"],
        [zoo["general"][n] for n in "abc"],
        weights,
        alpha,
        general_weight,
        ridge,
    )
    for module in MODULES:
        assert_close64(state.deltas[f"{module}.weight"], expected[module])


def test_float32_solve_where_float64_does_not_fit(zoo):
    inputs = [zoo[n] for n in "abc"]
    wide = merge_adapters(inputs, "regmean", progress=False)
    narrow = merge_adapters(inputs, "regmean", progress=False, float64_solve_bytes=0)
    for module in MODULES:
        assert narrow.records[module]["dtype"] == "float32" and wide.records[module]["dtype"] == "float64"
        assert_close64(narrow.deltas[f"{module}.weight"], wide.deltas[f"{module}.weight"].double(), rtol=1e-3)


def test_sums_file_lists_every_module(zoo, tmp_path):
    state = merge_adapters([zoo["a"], zoo["b"]], "regmean", out=tmp_path / "ab", progress=False)
    record = json.loads((tmp_path / "ab" / "merge_record.json").read_text())
    assert set(record["extras_map"].values()) == {"regmean_sums.safetensors"}
    assert "regmean_sums.safetensors" in record["files"]
    with safe_open(tmp_path / "ab" / "regmean_sums.safetensors", "pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    expected = {}
    for module, (out, inp) in MODULES.items():
        expected |= {
            f"{module}.delta_gram": (out, inp),
            f"{module}.task_gram": (inp, inp),
            f"{module}.general_gram": (inp, inp),
        }
    assert shapes == expected
    assert set(state.extras) == set(expected)


@pytest.mark.parametrize("method", ["regmean", "regmean_lowrank"])
@pytest.mark.parametrize("on_disk", [True, False])
def test_folding_into_a_state_equals_merging_all_at_once(zoo, tmp_path, method, on_disk):
    out = tmp_path / "ab" if on_disk else None
    state = merge_adapters([zoo["a"], zoo["b"]], method, out=out, progress=False, weights=[1.0, 2.0])
    folded = merge_adapters([state, zoo["c"]], method, progress=False, weights=[1.0, 3.0])
    at_once = merge_adapters([zoo[n] for n in "abc"], method, progress=False, weights=[1.0, 2.0, 3.0])
    for module in MODULES:
        assert_close64(folded.deltas[f"{module}.weight"], at_once.deltas[f"{module}.weight"].double())


def test_lowrank_is_the_float64_minimiser_over_the_span_of_the_a_rows(zoo):
    names = "abc"
    state = merge_adapters(
        [zoo[n] for n in names], "regmean_lowrank", progress=False, alpha=1.0, ridge=0.0, general_weight=0.0
    )
    for module, (_, inp) in MODULES.items():
        a_rows = torch.cat([LoraAdapter(zoo[n]).load(module).lora_A.double() for n in names])
        # min over M of Σ_i ‖(M A_s − ΔW_i) X_iᵀ‖² / N_i: one least-squares problem M [P_1 … P_T] ≈ [D_1 … D_T].
        xs = [zoo["task"][n][module].double() / zoo["task"][n][module].shape[0] ** 0.5 for n in names]
        projected = torch.cat([a_rows @ x.T for x in xs], dim=1)
        targets = torch.cat([delta_of(zoo[n], module) @ x.T for n, x in zip(names, xs)], dim=1)
        core = torch.linalg.lstsq(projected.T, targets.T).solution.T
        merged = state.deltas[f"{module}.weight"]
        assert_close64(merged, core @ a_rows)
        assert state.records[module]["rank"] == min(len(a_rows), inp)
        assert torch.linalg.matrix_rank(merged.double(), rtol=1e-5) <= len(a_rows)


def test_lowrank_equals_dense_regmean_when_the_a_rows_span_everything(zoo):
    # 3 adapters x rank 2 = 6 rows span the 6 inputs of a module with in = 6; the restriction is void there.
    wide = {"layers.0.attn.q_proj": (5, 6)}
    folders = []
    for seed, name in enumerate("xyz"):
        folder = write_adapter(zoo["root"] / f"span_{name}", 50 + seed, wide)
        gen = torch.Generator().manual_seed(60 + seed)
        write_grams(folder, {m: torch.randn(30, inp, generator=gen) for m, (_, inp) in wide.items()})
        folders.append(folder)
    dense = merge_adapters(folders, "regmean", progress=False)
    lowrank = merge_adapters(folders, "regmean_lowrank", progress=False)
    key = "layers.0.attn.q_proj.weight"
    assert_close64(lowrank.deltas[key], dense.deltas[key].double(), rtol=1e-4)


def test_refuses_an_adapter_without_grams(zoo, tmp_path):
    bare = write_adapter(tmp_path / "bare", 99)
    with pytest.raises(IloraError) as err:
        merge_adapters([zoo["a"], bare], "regmean", out=tmp_path / "out", progress=False)
    assert str(bare) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_refuses_grams_of_the_wrong_shape(zoo, tmp_path):
    folder = write_adapter(tmp_path / "wrong", 98)
    write_grams(folder, {m: torch.randn(20, inp + 1) for m, (_, inp) in MODULES.items()})
    with pytest.raises(IloraError, match="shape") as err:
        merge_adapters([zoo["a"], folder], "regmean", progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("first", ["ilora", "task_arithmetic", "regmean"])
def test_refuses_a_merged_state_without_its_sums(zoo, tmp_path, first):
    # regmean_lowrank also needs the row basis, which a regmean state lacks.
    method = "regmean_lowrank" if first == "regmean" else "regmean"
    state = merge_adapters([zoo["a"], zoo["b"]], first, out=tmp_path / "state", progress=False)
    with pytest.raises(IloraError, match="lacks") as err:
        merge_adapters([state, zoo["c"]], method, out=tmp_path / "out", progress=False)
    assert "state" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_refuses_folding_with_another_alpha(zoo):
    state = merge_adapters([zoo["a"], zoo["b"]], "regmean", progress=False)
    with pytest.raises(IloraError, match="alpha=0.6"):
        merge_adapters([state, zoo["c"]], "regmean", progress=False, alpha=0.5)


def test_refuses_modules_of_another_shape(zoo, tmp_path):
    other = {"layers.0.attn.q_proj": (6, 9)}
    folder = write_adapter(tmp_path / "other", 97, other)
    write_grams(folder, {m: torch.randn(20, inp) for m, (_, inp) in other.items()})
    with pytest.raises(IloraError, match="shape") as err:
        merge_adapters([zoo["a"], folder], "regmean", progress=False)
    assert "\n" not in str(err.value)


def test_lowrank_is_stored_factored_and_exports_exactly(zoo, tmp_path):
    inputs = [zoo[n] for n in "abc"]
    state = merge_adapters(inputs, "regmean_lowrank", out=tmp_path / "lr", progress=False, export_lora_rank=6)
    record = json.loads((tmp_path / "lr" / "merge_record.json").read_text())
    assert record["factored"] == dict.fromkeys(MODULES, 6)
    report = json.loads((tmp_path / "lr" / "lora_rank6" / "export_report.json").read_text())
    assert report["relative_error"] < 1e-6
    for module, (out, _) in MODULES.items():
        assert torch.linalg.matrix_rank(state.deltas[f"{module}.weight"].double(), rtol=1e-5) == min(6, out)
