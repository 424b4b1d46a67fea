"""The merge engine end to end on a tiny Qwen2 LM: I-LoRA rules, iteration, outputs, bad input."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from merge_helpers import build_tiny_lm, make_adapter
from safetensors.torch import load_file, save_file

from ilora.cli import main
from ilora.errors import IloraError
from ilora.merge import LoraAdapter, load_merged_state, merge_adapters, ops


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tiny base and adapters: a, b, c (r=8), small (r=4), bf16 (r=8 stored in bfloat16)."""
    root = tmp_path_factory.mktemp("merge_zoo")
    base = build_tiny_lm(root / "base")
    paths = {"base": base, "root": root}
    for seed, name in enumerate(["a", "b", "c"], start=1):
        paths[name] = make_adapter(base, root / name, seed)
    paths["small"] = make_adapter(base, root / "small", 7, r=4, alpha=4)
    paths["bf16"] = make_adapter(base, root / "bf16", 8, dtype=torch.bfloat16)
    return paths


def exact_truncation(delta: torch.Tensor, keep_above: float | None = None, top: int | None = None) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    n = int((s > keep_above).sum()) if top is None else top
    return ((u[:, :n] * s[:n]) @ vh[:n]).float()


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()


def test_single_adapter_merged_alone_is_its_truncation(zoo):
    adapter = LoraAdapter(zoo["a"])
    state = merge_adapters([zoo["a"]], progress=False)
    assert set(state.deltas) == {f"{m}.weight" for m in adapter.modules}
    for module in adapter.modules:
        expected = exact_truncation(adapter.load(module).dense(), top=math.ceil(0.8 * 8))
        torch.testing.assert_close(state.deltas[f"{module}.weight"], expected, atol=1e-4, rtol=1e-4)
        assert state.deltas[f"{module}.weight"].dtype == torch.float32


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.8, 1.0])
def test_exactly_ceil_keep_r_values_kept(zoo, keep):
    state = merge_adapters([zoo["a"], zoo["small"]], keep=keep, progress=False)
    for record in state.records.values():
        a, small = record["inputs"]
        assert a["kept"] == math.ceil(keep * 8) and small["kept"] == math.ceil(keep * 4)
    module = "model.layers.1.mlp.up_proj"
    delta = LoraAdapter(zoo["a"]).load(module).dense()
    assert torch.linalg.matrix_rank(exact_truncation(delta, top=math.ceil(keep * 8))) == math.ceil(keep * 8)


def test_merged_state_keeps_values_above_new_tau(zoo):
    merged = merge_adapters([zoo["a"], zoo["b"]], progress=False)
    folded = merge_adapters([merged, zoo["c"]], progress=False)
    new = LoraAdapter(zoo["c"])
    for module, record in folded.records.items():
        m_rec, c_rec = record["inputs"]
        m = merged.deltas[f"{module}.weight"]
        s_c = torch.linalg.svdvals(new.load(module).dense().double())
        tau = float(s_c[math.ceil(0.8 * 8) - 1])
        assert c_rec["tau"] == pytest.approx(tau, rel=1e-4)
        assert m_rec["threshold"] == c_rec["tau"]
        assert m_rec["kept"] == int((torch.linalg.svdvals(m.double()) > m_rec["threshold"]).sum())
        expected = ops.max_magnitude(
            [exact_truncation(m, keep_above=m_rec["threshold"]), exact_truncation(new.load(module).dense(), top=7)]
        )
        torch.testing.assert_close(folded.deltas[f"{module}.weight"], expected, atol=2e-4, rtol=1e-3)


def test_n_way_merge_is_order_free(zoo):
    abc = merge_adapters([zoo["a"], zoo["b"], zoo["c"]], progress=False)
    cab = merge_adapters([zoo["c"], zoo["a"], zoo["b"]], progress=False)
    for key in abc.deltas:
        assert torch.equal(abc.deltas[key], cab.deltas[key])


def test_iterative_merge_from_disk_equals_in_memory(zoo, tmp_path):
    in_memory = merge_adapters([merge_adapters([zoo["a"], zoo["b"]], progress=False), zoo["c"]], progress=False)
    merge_adapters([zoo["a"], zoo["b"]], out=tmp_path / "ab", progress=False)
    on_disk = merge_adapters([tmp_path / "ab", zoo["c"]], out=tmp_path / "abc", progress=False)
    assert set(on_disk.deltas) == set(in_memory.deltas)
    for key in in_memory.deltas:
        assert torch.equal(on_disk.deltas[key], in_memory.deltas[key])
    reloaded = load_merged_state(tmp_path / "abc")
    assert reloaded.meta["inputs"][0]["kind"] == "merged" and reloaded.meta["method"] == "ilora"
    on_file = load_file(tmp_path / "abc" / "delta.safetensors")  # plain safetensors, base weight names
    assert set(on_file) == set(in_memory.deltas) and all(t.dtype == torch.float32 for t in on_file.values())


def test_same_inputs_give_identical_bytes(zoo, tmp_path):
    for name in ("one", "two"):
        merge_adapters([zoo["a"], zoo["b"]], out=tmp_path / name, export_lora_rank=4, progress=False)
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")


def test_sharded_state_round_trips(zoo, tmp_path):
    whole = merge_adapters([zoo["a"], zoo["b"]], progress=False)
    sharded = merge_adapters([zoo["a"], zoo["b"]], out=tmp_path / "s", shard_bytes=20_000, progress=False)
    assert len(list((tmp_path / "s").glob("delta-*.safetensors"))) > 1
    for key in whole.deltas:
        assert torch.equal(sharded.deltas[key], whole.deltas[key])


@pytest.mark.parametrize("method", ["magmax", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "pcb"])
def test_delta_baselines_use_true_products(zoo, method):
    adapters = [LoraAdapter(zoo["a"]), LoraAdapter(zoo["b"])]
    state = merge_adapters(adapters, method, progress=False)
    again = merge_adapters(adapters, method, progress=False)
    module = "model.layers.0.self_attn.v_proj"
    da, db = (a.load(module).dense() for a in adapters)
    got = state.deltas[f"{module}.weight"]
    assert torch.equal(got, again.deltas[f"{module}.weight"])  # seeded: deterministic
    if method == "magmax":
        torch.testing.assert_close(got, torch.where(db.abs() >= da.abs(), db, da), atol=1e-6, rtol=1e-5)
    elif method == "task_arithmetic":
        torch.testing.assert_close(got, da + db)
    elif method == "magnitude_prune":
        assert int((got != 0).sum()) <= da.numel()  # half of each kept, then summed
        assert got.count_nonzero() < (da + db).count_nonzero()


def test_bf16_adapter_is_upcast(zoo):
    state = merge_adapters([zoo["bf16"]], keep=1.0, progress=False)
    adapter = LoraAdapter(zoo["bf16"])
    module = "model.layers.0.mlp.down_proj"
    stored = load_file(zoo["bf16"] / "adapter_model.safetensors")
    assert stored[f"base_model.model.{module}.lora_A.weight"].dtype == torch.bfloat16
    expected = adapter.scale(module) * stored[f"base_model.model.{module}.lora_B.weight"].float() @ stored[
        f"base_model.model.{module}.lora_A.weight"
    ].float()
    torch.testing.assert_close(state.deltas[f"{module}.weight"], expected, atol=1e-4, rtol=1e-4)


def test_merged_model_equals_base_plus_delta(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    state = merge_adapters([zoo["a"], zoo["b"]], out=tmp_path / "m", base=zoo["base"], save_model=True, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "model")
    by_hand = AutoModelForCausalLM.from_pretrained(zoo["base"])
    assert type(merged) is type(by_hand)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in by_hand.parameters())
    with torch.no_grad():
        params = dict(by_hand.named_parameters())
        for key in state.deltas:
            params[key] += state.deltas[key]
        ids = torch.arange(12).reshape(2, 6)
        torch.testing.assert_close(merged(ids).logits, by_hand(ids).logits, atol=1e-5, rtol=1e-5)


def test_export_lora_round_trip(zoo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    state = merge_adapters([zoo["a"], zoo["b"]], out=tmp_path / "m", export_lora_rank=5, progress=False)
    folder = tmp_path / "m" / "lora_rank5"
    report = json.loads((folder / "export_report.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["base"]), folder)
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            delta = state.deltas[f"{name}.weight"]
            best = exact_truncation(delta, top=5)  # Eckart-Young: the export is the optimal rank-5 fit
            torch.testing.assert_close(module.get_delta_weight("default"), best, atol=2e-4, rtol=1e-3)
            expected_err = float(torch.linalg.matrix_norm(delta - best) / torch.linalg.matrix_norm(delta))
            assert report["modules"][name] == pytest.approx(expected_err, abs=1e-4)
    assert 0 < report["relative_error"] < 1
    full = merge_adapters([state], "magmax", out=tmp_path / "full", export_lora_rank=64, progress=False)
    assert json.loads((tmp_path / "full" / "lora_rank64" / "export_report.json").read_text())["relative_error"] < 1e-5
    assert set(full.deltas) == set(state.deltas)


def test_inputs_are_never_modified(zoo, tmp_path):
    before = {n: tree_digest(zoo[n]) for n in ("a", "c")}
    merge_adapters([zoo["a"], zoo["c"]], out=tmp_path / "x", progress=False)
    ab_digest = tree_digest(tmp_path / "x")
    merge_adapters([tmp_path / "x", zoo["a"]], out=tmp_path / "y", progress=False)
    assert before == {n: tree_digest(zoo[n]) for n in ("a", "c")}
    assert tree_digest(tmp_path / "x") == ab_digest


# ---------------------------------------------------------------- bad input


def copy_adapter(src: Path, dst: Path, edit_config=None, edit_tensors=None) -> Path:
    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / "adapter_config.json").read_text())
        edit_config(config)
        (dst / "adapter_config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(dst / "adapter_model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def set_nan(tensors):
    key = min(tensors)
    tensors[key][0, 0] = float("nan")


def grow_one_module(tensors):
    key = next(k for k in sorted(tensors) if k.endswith("q_proj.lora_B.weight"))
    tensors[key] = torch.randn(tensors[key].shape[0] + 4, tensors[key].shape[1])


def corrupt(path: Path) -> Path:
    (path / "adapter_model.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    return path


BAD_INPUTS = {
    "other_base": lambda z, d: copy_adapter(z["a"], d, lambda c: c.update(base_model_name_or_path="someone/else")),
    "shape": lambda z, d: copy_adapter(z["a"], d, edit_tensors=grow_one_module),
    "missing": lambda z, d: (copy_adapter(z["a"], d), (d / "adapter_model.safetensors").unlink())[0],
    "corrupt": lambda z, d: corrupt(copy_adapter(z["a"], d)),
    "dora": lambda z, d: copy_adapter(z["a"], d, lambda c: c.update(use_dora=True)),
    "pissa": lambda z, d: copy_adapter(z["a"], d, lambda c: c.update(init_lora_weights="pissa")),
    "nan": lambda z, d: copy_adapter(z["a"], d, edit_tensors=set_nan),
    "not_an_adapter": lambda z, d: (d.mkdir(), d)[1],
}
MESSAGES = {
    "other_base": "differs",
    "shape": "shape",
    "missing": "missing safetensors",
    "corrupt": "corrupt safetensors",
    "dora": "use_dora",
    "pissa": "pissa",
    "nan": "NaN",
    "not_an_adapter": "neither a PEFT adapter",
}


def assert_refused(argv: list[str], out: Path, capsys, *needles: str) -> None:
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors  # one line (a progress bar may precede it)
    err = errors[0].split("\r")[-1]
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_adapter_is_refused_naming_the_file(zoo, tmp_path, capsys, kind):
    bad = BAD_INPUTS[kind](zoo, tmp_path / f"bad_{kind}")
    out = tmp_path / "outputs" / "merged"
    out.parent.mkdir()
    assert_refused(["merge", str(zoo["b"]), str(bad), "--out", str(out)], out, capsys, str(bad), MESSAGES[kind])


def test_nan_found_while_streaming_leaves_no_output(zoo, tmp_path):
    bad = copy_adapter(zoo["a"], tmp_path / "late_nan", edit_tensors=lambda t: t[max(t)].fill_(float("inf")))
    with pytest.raises(IloraError, match="NaN or Inf"):
        merge_adapters([zoo["b"], bad], out=tmp_path / "o" / "m", progress=False)
    assert list((tmp_path / "o").iterdir()) == []


def test_unequal_ranks_refused_for_peft_stacking_types(zoo, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["merge", str(zoo["a"]), str(zoo["small"]), "--method", "peft:ties", "--base", str(zoo["base"]), "--out", str(out)]
    assert_refused(argv, out, capsys, "equal rank", str(zoo["small"]))


def test_existing_out_needs_overwrite(zoo, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(zoo["a"]), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["merge", str(zoo["a"]), "--out", str(out), "--overwrite"]) == 0
    assert (out / "delta.safetensors").is_file() and not (out / "keep.txt").exists()


def test_merged_state_mixed_with_other_base_is_refused(zoo, tmp_path, capsys):
    merge_adapters([zoo["a"], zoo["b"]], out=tmp_path / "ab", progress=False)
    other = copy_adapter(zoo["c"], tmp_path / "other", lambda c: c.update(base_model_name_or_path="other/model"))
    out = tmp_path / "abc"
    assert_refused(["merge", str(tmp_path / "ab"), str(other), "--out", str(out)], out, capsys, str(other), "differs")


def test_peft_methods_and_save_model_need_base(zoo, tmp_path, capsys):
    out = tmp_path / "merged"
    assert_refused(["merge", str(zoo["a"]), "--method", "peft:svd", "--out", str(out)], out, capsys, "--base")
    assert_refused(["merge", str(zoo["a"]), "--save-model", "--out", str(out)], out, capsys, "--base")
    assert_refused(["merge", str(zoo["a"]), "--method", "nope", "--out", str(out)], out, capsys, "unknown merge method")
    assert_refused(["merge", str(zoo["a"]), "--option", "bogus=1", "--out", str(out)], out, capsys, "bogus")


def test_cli_merges_and_exports(zoo, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["merge", str(zoo["a"]), str(zoo["b"]), "--out", str(out), "--keep", "0.5", "--export-lora", "3"]) == 0
    printed = capsys.readouterr().out
    # one summary with the worst few modules, not a line per module
    assert "overall relative error" in printed and "worst modules: model.layers." in printed
    assert len(printed.strip().splitlines()) == 3
    record = json.loads((out / "merge_record.json").read_text())
    assert record["options"]["keep"] == 0.5 and record["method"] == "ilora"
    assert [i["sha256"] for i in record["inputs"]] == [
        hashlib.sha256((zoo[n] / "adapter_model.safetensors").read_bytes()).hexdigest() for n in ("a", "b")
    ]


def test_every_method_file_is_imported_by_the_registry():
    """A method file the registry does not import would offer no method, silently: the names
    ``@register`` declares in the merge package's source are the registry's, in a fresh process."""
    import ast
    import subprocess
    import sys

    import ilora.merge
    from ilora.merge.peft_types import PEFT_TYPES

    declared = {f"peft:{t}" for t in PEFT_TYPES}  # registered in a loop, by an f-string
    for path in Path(ilora.merge.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            named = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register" and node.args
            if named and isinstance(node.args[0], ast.Constant):
                declared.add(node.args[0].value)
    code = "from ilora.merge.registry import available_methods; print(' '.join(available_methods()))"
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(listed) == declared and len(declared) > 20


def test_merge_flags_come_from_the_method_fields(capsys):
    """One flag per method option, its default read from the method's field (keep=0.8 lives in ilora.py)."""
    from ilora.merge.cli import method_option_fields
    from ilora.merge.ilora import ILoRAMerge

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    keep = ILoRAMerge.__dataclass_fields__["keep"].default
    assert "--keep KEEP ilora, ilora_truncate: fraction of each adapter's rank kept" in help_text
    assert f"(default {keep})" in help_text
    for option in method_option_fields():
        assert f"--{option.replace('_', '-')} " in help_text
    assert "--rule" not in help_text  # fixed by every method name that has it
