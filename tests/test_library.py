"""The skill library (``ilora library``): add/remove invariants, atomic changes, the lock, the op log,
one-line refusals, and composition for a new task."""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import pytest
import torch
from merge_helpers import build_tiny_lm, make_adapter
from routing_helpers import make_rows, random_lora_vlm
from safetensors.torch import load_file, save_file

from ilora.cli import main
from ilora.fileio import file_sha256, folder_sha256
from ilora.library.store import (
    LIBRARY_FILE,
    OPLOG_FILE,
    SkillLibrary,
    init_library,
    merge_settings,
)
from ilora.merge import LoraAdapter, load_merged_state, merge_adapters

pytestmark = pytest.mark.usefixtures("one_thread")
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny causal LM and four rank-4 LoRA adapters of it (random A and B)."""
    root = tmp_path_factory.mktemp("library-lm")
    base = build_tiny_lm(root / "base")
    return base, [make_adapter(base, root / f"adapter{i}", seed=i, r=4) for i in range(4)]


def new_library(tmp_path: Path, base: Path, adapters: list[Path], method: str = "ilora", **options) -> SkillLibrary:
    library = init_library(tmp_path / "lib", str(base), merge_settings(method, options))
    for i, adapter in enumerate(adapters):
        library.add(f"s{i}", adapter)
    return library


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (``None`` for folders)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def dense(state_dir: Path) -> dict[str, torch.Tensor]:
    state = load_merged_state(state_dir)
    return {key: state.deltas[key] for key in state.deltas}


def adapter_delta64(adapter: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapter's ΔW in float64, and ``s·|B|·|A|`` (what bounds a float32 product's rounding)."""
    delta = LoraAdapter(adapter).load(module)
    lora_B, lora_A = delta.lora_B.double(), delta.lora_A.double()
    return delta.scale * lora_B @ lora_A, delta.scale * lora_B.abs() @ lora_A.abs()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what earlier steps printed (progress bars) is not this command's
    code = main(["library", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- add / remove


def test_linear_method_add_then_remove_returns_the_delta_exactly(tmp_path, lm):
    base, adapters = lm
    library = new_library(tmp_path, base, adapters[:2], "task_arithmetic")
    before = dense(library.merged_state())
    assert library.add("s2", adapters[2])["how"] == "folded"
    entry = library.remove("s2")
    assert (entry["how"], entry["skills"]) == ("subtracted", ["s0", "s1"])
    after = dense(library.merged_state())
    assert set(after) == set(before)
    for key, value in after.items():
        module = key.removesuffix(".weight")
        parts = [adapter_delta64(a, module) for a in adapters[:3]]
        reference = parts[0][0] + parts[1][0]
        # Float32 products and sums: each entry within a few roundings of the magnitudes involved.
        bound = 16 * EPS32 * sum(magnitude for _, magnitude in parts)
        assert bool(((value.double() - reference).abs() <= bound).all()), key
        assert bool(((before[key].double() - reference).abs() <= bound).all()), key


def test_factored_sum_remove_rebuilds_the_same_bytes(tmp_path, lm):
    base, adapters = lm
    library = new_library(tmp_path, base, adapters[:2], "sum")
    state_before = load_merged_state(library.merged_state())
    before = {m: state_before.load(m) for m in state_before.modules}
    library.add("s2", adapters[2])
    entry = library.remove("s2")
    assert entry["how"] == "rebuilt"
    state_after = load_merged_state(library.merged_state())
    for module, stored in before.items():
        now = state_after.load(module)
        assert torch.equal(now.lora_B, stored.lora_B) and torch.equal(now.lora_A, stored.lora_A), module


def test_ilora_add_folds_and_remove_equals_a_fresh_build(tmp_path, lm):
    base, adapters = lm
    library = new_library(tmp_path / "one", base, adapters[:3])
    hows = [e["how"] for e in library.operations() if e["op"] == "add"]
    assert hows == ["rebuilt", "rebuilt", "folded"]  # s0 alone, s0 with s1, then s2 folded in
    state_before_add = shutil.copytree(library.merged_state(), tmp_path / "before-add")  # the add deletes it
    assert library.add("s3", adapters[3])["how"] == "folded"
    folded = merge_adapters([state_before_add, adapters[3]], "ilora", progress=False)
    # The fold is the I-LoRA step on the previous state (the engine gives the same bytes for the same inputs).
    assert all(torch.equal(dense(library.merged_state())[k], folded.deltas[k]) for k in folded.deltas)

    entry = library.remove("s1")
    assert (entry["how"], entry["skills"]) == ("rebuilt", ["s0", "s2", "s3"])
    fresh = init_library(tmp_path / "fresh", str(base))
    for name, adapter in (("s0", adapters[0]), ("s2", adapters[2]), ("s3", adapters[3])):
        fresh.add(name, adapter)
    rebuilt, built = dense(library.merged_state()), dense(fresh.merged_state())
    assert set(rebuilt) == set(built)
    assert all(torch.equal(rebuilt[k], built[k]) for k in built)
    # ... and both are the iterative merge written out by hand.
    first_two = merge_adapters([adapters[0], adapters[2]], "ilora", progress=False)
    by_hand = merge_adapters([first_two, adapters[3]], "ilora", progress=False)
    assert all(torch.equal(built[k], by_hand.deltas[k]) for k in built)
    assert not (library.root / "skills" / "s1").exists()


def test_one_shot_settings_rebuild_on_add_and_build_changes_settings(tmp_path, lm):
    base, adapters = lm
    library = new_library(tmp_path, base, adapters[:3], "ties", density=0.5)
    library.build(merge_settings("ties", {"density": 0.5}, iterative=False))
    assert library.add("s3", adapters[3])["how"] == "rebuilt"
    one_shot = merge_adapters(adapters, "ties", density=0.5, progress=False)
    merged = dense(library.merged_state())
    assert all(torch.equal(merged[k], one_shot.deltas[k]) for k in one_shot.deltas)
    assert json.loads((library.root / LIBRARY_FILE).read_text())["merge"] == {
        "method": "ties", "options": {"density": 0.5}, "iterative": False
    }
    assert library.remove("s0")["how"] == "rebuilt"
    library.remove("s1")
    library.remove("s2")
    entry = library.remove("s3")
    assert entry["how"] == "emptied" and library.merged_state() is None
    assert list((library.root / "merged").iterdir()) == [] and list((library.root / "skills").iterdir()) == []


# ---------------------------------------------------------------------------- atomicity, lock, log


def test_a_failed_add_leaves_the_library_byte_identical(tmp_path, lm, monkeypatch):
    base, adapters = lm
    library = new_library(tmp_path, base, adapters[:2])
    before = snapshot(library.root)
    written = []

    def commit_fails(self, state, entry):
        written.extend(p for p in (self.root / "skills" / "s2", self.root / entry["merged"]) if p.is_dir())
        raise RuntimeError("killed before library.json was replaced")

    monkeypatch.setattr(SkillLibrary, "_commit", commit_fails)
    with pytest.raises(RuntimeError):
        SkillLibrary(library.root).add("s2", adapters[2])
    assert len(written) == 2  # the skill's folder and the new merged state had been written
    assert snapshot(library.root) == before
    monkeypatch.undo()

    import ilora.merge.engine as engine

    real_merge = engine.merge_adapters

    def merge_then_interrupt(*args, **kwargs):
        real_merge(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "merge_adapters", merge_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        SkillLibrary(library.root).add("s2", adapters[2])
    assert snapshot(library.root) == before


def test_an_add_interrupted_right_after_its_commit_is_kept(tmp_path, lm, monkeypatch):
    from ilora.library import store

    base, adapters = lm
    library = new_library(tmp_path, base, adapters[:2])
    real_write = store.atomic_write_text

    def write_then_interrupt(path, text):
        real_write(path, text)
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "atomic_write_text", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        SkillLibrary(library.root).add("s2", adapters[2])
    monkeypatch.undo()
    reread = SkillLibrary(library.root)  # checks that every folder library.json names exists
    assert [s.name for s in reread.skills()] == ["s0", "s1", "s2"]
    assert reread.operations()[-1]["skill"] == "s2"
    reread.remove("s2")  # the next change writes the lost log line and deletes the old merged state
    assert [json.loads(line)["seq"] for line in (library.root / OPLOG_FILE).read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert [p.name for p in (library.root / "merged").iterdir()] == ["op-000005"]


def test_a_killed_change_leaves_readable_state_and_the_next_change_cleans_up(tmp_path, lm):
    base, adapters = lm
    library = new_library(tmp_path, base, adapters[:2])
    # What a change killed outright leaves: a skill folder and a merged state no library.json names,
    # a temporary library.json, and (killed just after its commit) no log line for the last operation.
    shutil.copytree(library.root / "skills" / "s1", library.root / "skills" / "ghost")
    shutil.copytree(library.merged_state(), library.root / "merged" / "op-999999")
    (library.root / ".library.json.tmp").write_text("{")
    lines = (library.root / OPLOG_FILE).read_text().splitlines()
    (library.root / OPLOG_FILE).write_text("\n".join(lines[:-1]) + "\n")

    reread = SkillLibrary(library.root)
    assert [s.name for s in reread.skills()] == ["s0", "s1"]
    assert [e["seq"] for e in reread.operations()] == [1, 2, 3]
    reread.add("s2", adapters[2])
    assert sorted(p.name for p in (library.root / "skills").iterdir()) == ["s0", "s1", "s2"]
    assert [p.name for p in (library.root / "merged").iterdir()] == ["op-000004"]
    assert not (library.root / ".library.json.tmp").exists()
    logged = [json.loads(line)["seq"] for line in (library.root / OPLOG_FILE).read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


def test_a_second_change_is_refused_while_one_runs(tmp_path, lm, capsys):
    base, adapters = lm
    library = new_library(tmp_path, base, adapters[:1])
    before = snapshot(library.root)
    # Another process's change holds the lock exclusively; a compose holds it shared.
    for mode in (fcntl.LOCK_EX, fcntl.LOCK_SH):
        with open(library.root / ".lock") as other:
            fcntl.flock(other, mode | fcntl.LOCK_NB)
            code, _, err = run_cli(capsys, "add", library.root, "s1", adapters[1])
        assert code == 2 and len(err.strip().splitlines()) == 1 and "another `ilora library` command" in err
        assert snapshot(library.root) == before
    with library.reading(), SkillLibrary(library.root).reading():  # two composes at once may share it
        pass
    library.add("s1", adapters[1])  # the lock was released with the other file


def test_the_operation_log_records_inputs_by_hash(tmp_path, lm):
    base, adapters = lm
    heldout = tmp_path / "heldout"
    from datasets import Dataset

    Dataset.from_list(make_rows(5, 0)).save_to_disk(str(heldout))
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"summary": {"mean": 3.5, "episodes": 2}, "records": []}))
    library = init_library(tmp_path / "lib", str(base))
    library.add("s0", adapters[0], heldout=heldout, scores=scores)
    library.add("s1", adapters[1])
    entries = library.operations()
    assert [e["seq"] for e in entries] == [1, 2, 3] and [e["op"] for e in entries] == ["init", "add", "add"]
    inputs = entries[1]["inputs"]
    assert inputs["adapter"]["sha256"] == file_sha256(adapters[0] / "adapter_model.safetensors")
    assert inputs["adapter_config"]["sha256"] == file_sha256(adapters[0] / "adapter_config.json")
    assert inputs["heldout"]["sha256"] == folder_sha256(heldout)
    assert inputs["scores"]["sha256"] == file_sha256(scores)
    assert entries[2]["merged_record_sha256"] == file_sha256(library.merged_state() / "merge_record.json")
    skill = library.skill("s0")
    assert skill.adapter_sha256 == inputs["adapter"]["sha256"]
    assert skill.heldout.is_dir() and skill.data["heldout_rows"] == 5
    assert skill.data["heldout_sha256"] == folder_sha256(heldout)
    assert skill.scores == {"mean": 3.5, "episodes": 2} and skill.grams is None
    assert library.skill("s1").heldout is None
    removed = library.remove("s0")["inputs"]["adapter"]
    assert removed["sha256"] == skill.adapter_sha256


# ---------------------------------------------------------------------------- refusals


def wrong_shape_adapter(source: Path, out: Path) -> Path:
    """A copy of ``source`` whose first module reads 16 inputs instead of the base's width."""
    shutil.copytree(source, out)
    tensors = load_file(out / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    tensors[key] = tensors[key][:, :16].contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


@pytest.fixture(scope="module")
def zoo(lm, tmp_path_factory):
    """A library with one skill, and bad inputs beside it."""
    base, adapters = lm
    root = tmp_path_factory.mktemp("library-zoo")
    library = init_library(root / "lib", str(base))
    library.add("s0", adapters[0])
    (root / "notjson.json").write_text("{")
    (root / "empty").mkdir()
    return {
        "lib": library.root,
        "base": base,
        "a0": adapters[0],
        "a1": adapters[1],
        "wide": wrong_shape_adapter(adapters[1], root / "wide"),
        "notjson": root / "notjson.json",
        "empty": root / "empty",
        "missing": root / "missing",
    }


@pytest.mark.parametrize(
    "command, needle",
    [
        (["init", "{lib}", "--base", "{base}"], "already exists"),
        (["init", "{missing}", "--base", "{missing}"], "no such model folder"),
        (["init", "{missing}", "--base", "{base}", "--method", "nope"], "unknown merge method"),
        (["init", "{missing}", "--base", "{base}", "--option", "weights=[1]"], "--option weights"),
        (["init", "{missing}", "--base", "{base}", "--method", "tsv", "--iterative"], "takes LoRA adapters only"),
        (["add", "{missing}", "s1", "{a1}"], "no such library folder"),
        (["add", "{empty}", "s1", "{a1}"], "not a skill library"),
        (["add", "{lib}", "../x", "{a1}"], "skill name '../x'"),
        (["add", "{lib}", "s0", "{a1}"], "already has a skill named 's0'"),
        (["add", "{lib}", "copy", "{a0}"], "the same weights as skill 's0'"),
        (["add", "{lib}", "s1", "{missing}"], "no such adapter folder"),
        (["add", "{lib}", "s1", "{empty}"], "not a PEFT adapter folder"),
        (["add", "{lib}", "s1", "{wide}"], "in the base model"),
        (["add", "{lib}", "s1", "{a1}", "--data", "{empty}"], "--data"),
        (["add", "{lib}", "s1", "{a1}", "--grams"], "missing Grams file"),
        (["add", "{lib}", "s1", "{a1}", "--scores", "{notjson}"], "notjson.json: not readable JSON"),
        (["remove", "{lib}", "nope"], "no skill named 'nope'"),
        (["build", "{lib}", "--method", "regmean"], "skill 's0' has no Grams"),
        (["build", "{lib}", "--keep", "2"], "--keep"),
        (["show", "{lib}", "--ops", "-1"], "--ops -1"),
        (["compose", "{lib}", "--task-data", "{empty}", "--out", "{missing}"], "--task-data"),
        (["compose", "{lib}", "--task-data", "{empty}", "--out", "{missing}", "--steps", "0"], "--steps 0"),
        (["compose", "{lib}", "--task-data", "{empty}", "--out", "{missing}", "--skills", "s0,zz"], "named 'zz'"),
        (["compose", "{lib}", "--task-data", "{empty}", "--out", "{empty}"], "--out"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(zoo, capsys, command, needle):
    before = snapshot(zoo["lib"])
    code, _, err = run_cli(capsys, *(part.format(**zoo) for part in command))
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert snapshot(zoo["lib"]) == before
    assert not zoo["missing"].exists()


def test_a_bad_library_file_is_named_with_its_key(zoo, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(zoo["lib"], broken)
    record = json.loads((broken / LIBRARY_FILE).read_text())
    record["ops"] = "many"
    (broken / LIBRARY_FILE).write_text(json.dumps(record))
    code, _, err = run_cli(capsys, "list", broken)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "library.json.ops = 'many'" in err


# ---------------------------------------------------------------------------- skills on the VLM, compose


def random_vlm_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A rank-4 LoRA adapter of the tiny VLM with random B (a non-zero delta)."""
    random_lora_vlm(model_dir, seed)[0].save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vlm(tiny_vlm_dir, tmp_path_factory):
    """Two VLM skills (the first with its Grams and held-out rows) in a library, and a new task's rows."""
    from datasets import Dataset

    from ilora.routing.grams import compute_adapter_grams

    root = tmp_path_factory.mktemp("library-vlm")
    adapters = [random_vlm_adapter(tiny_vlm_dir, root / f"a{i}", seed=i) for i in range(2)]
    data = {}
    for name, seed in (("heldout", 1), ("task", 2)):
        data[name] = root / name
        Dataset.from_list(make_rows(12, seed, answer_len=2)).save_to_disk(str(data[name]))
    compute_adapter_grams(tiny_vlm_dir, adapters[0], make_rows(4, 3))
    library = init_library(root / "lib", str(tiny_vlm_dir))
    library.add("a", adapters[0], heldout=data["heldout"], grams=True)
    library.add("b", adapters[1])
    return {"root": root, "library": library, "adapters": adapters, "base": tiny_vlm_dir, **data}


def test_skill_records_keep_grams_and_heldout_rows(vlm):
    from datasets import load_from_disk

    from ilora.merge.grams import load_grams

    a, b = vlm["library"].skills()
    assert (a.name, b.name) == ("a", "b")
    assert a.grams is not None and load_grams(a.adapter).path == a.grams  # fresh: measured with these weights
    assert len(load_from_disk(str(a.heldout))) == a.data["heldout_rows"] == 12
    assert b.grams is None and b.heldout is None and b.scores is None
    assert a.adapter.is_absolute() and (a.adapter / "adapter_model.safetensors").is_file()


def test_a_data_aware_library_keeps_grams_and_refuses_skills_without(vlm, tmp_path, capsys):
    library = init_library(tmp_path / "lib", str(vlm["base"]), merge_settings("regmean"))
    library.add("a", vlm["adapters"][0], grams=True)
    merged = dense(library.merged_state())
    alone = merge_adapters([vlm["adapters"][0]], "regmean", progress=False)
    assert all(torch.equal(merged[k], alone.deltas[k]) for k in alone.deltas)
    code, _, err = run_cli(capsys, "add", library.root, "b", vlm["adapters"][1])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "needs the adapter's Grams" in err


def composed_delta64(record: dict, library: SkillLibrary, module: str, new_adapter: Path | None):
    skills = [(s["weight"], library.skill(s["name"]).adapter) for s in record["skills"]]
    reference = sum(weight * adapter_delta64(adapter, module)[0] for weight, adapter in skills)
    return reference + (adapter_delta64(new_adapter, module)[0] if new_adapter is not None else 0)


@pytest.mark.parametrize("new_rank", [0, 2])
def test_compose_fits_weights_and_writes_their_exact_sum(vlm, capsys, new_rank):
    from ilora.library.compose import COMPOSE_RECORD, NEW_ADAPTER, mean_answer_loss
    from ilora.models.load import load_vlm
    from ilora.routing.collator import RoutingCollator
    from ilora.routing.lora import load_adapter

    out = vlm["root"] / f"composed-{new_rank}"
    code, stdout, err = run_cli(
        capsys, "compose", vlm["library"].root, "--task-data", vlm["task"], "--out", out,
        "--steps", 25, "--batch-size", 4, "--lr", 0.1, "--new-rank", new_rank, "--new-lr", 0.01,
    )
    assert code == 0, err
    record = json.loads((out / COMPOSE_RECORD).read_text())
    assert [s["name"] for s in record["skills"]] == ["a", "b"]
    assert record["loss"]["fitted"] < record["loss"]["start"]  # the fit lowers the loss it minimises
    new_adapter = out / NEW_ADAPTER if new_rank else None
    assert (new_adapter is not None) == (out / NEW_ADAPTER).is_dir()
    # The written adapter is the fitted composition: its ΔW is Σ w_i ΔW_i (+ the new adapter's) ...
    exported = LoraAdapter(out)
    for module in exported.modules:
        ours, bound = adapter_delta64(out, module)
        reference = composed_delta64(record, vlm["library"], module, new_adapter)
        assert bool(((ours - reference).abs() <= 16 * EPS32 * bound + 1e-12).all()), module
    # ... and the base model with it has the loss the fit ended on.
    model, processor = load_vlm(vlm["base"])
    from datasets import load_from_disk

    rows = load_from_disk(str(vlm["task"]))
    loss = mean_answer_loss(load_adapter(model, out), RoutingCollator(processor), rows, 4, "cpu")
    assert loss == pytest.approx(record["loss"]["fitted"], rel=1e-4)
    assert f"fitted {record['loss']['fitted']:.4f}" in stdout
