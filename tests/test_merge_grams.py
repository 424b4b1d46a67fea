"""Input Grams of LoRA modules (``ilora grams``), interference in activations and answer margins."""

from __future__ import annotations

import json
import math

import pytest
import torch
from routing_helpers import make_rows, random_lora_vlm, tag

from ilora.cli import main
from ilora.errors import IloraError
from ilora.merge.grams import GRAMS_FILE, load_grams
from ilora.merge.interference import (
    activation_interference,
    delta_difference,
    output_energy,
)
from ilora.merge.io import LoraAdapter
from ilora.models.load import load_vlm
from ilora.routing.collator import RoutingCollator
from ilora.routing.grams import collect_grams
from ilora.routing.hooks import find_lora_layers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tiny_vlm_dir, tmp_path_factory):
    """Two saved adapters and saved task/general datasets."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("grams")
    paths = {}
    for name, seed, n_images in (("task_a", 0, 1), ("task_b", 1, 1), ("general", 2, 2)):
        paths[name] = root / name
        Dataset.from_list(make_rows(6, seed, n_images=n_images, answer_len=1 + seed)).save_to_disk(str(paths[name]))
    for name, seed in (("a", 0), ("b", 1)):
        peft_model, _ = random_lora_vlm(tiny_vlm_dir, seed)
        peft_model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def test_gram_is_mean_input_outer_product_without_padding(tiny_vlm_dir):
    peft_model, processor = random_lora_vlm(tiny_vlm_dir, 0)
    refs = {r.part: r for r in find_lora_layers(peft_model)}
    rows = make_rows(3, 5, n_images=(1, 2, 1), answer_len=3)
    rows[1]["prompt"] += " left right up down fire ball"  # rows of different lengths: padding
    recorded = {}
    handles = [
        ref.layer.register_forward_pre_hook(lambda m, args, part=part: recorded.setdefault(part, args[0].detach()))
        for part, ref in refs.items()
    ]
    grams = collect_grams(peft_model, processor, rows, batch_size=3)
    for h in handles:
        h.remove()
    mask = RoutingCollator(processor)(tag(rows, "general"))["attention_mask"].bool()
    assert not bool(mask.all())
    assert set(grams) == {r.name for r in find_lora_layers(peft_model)}
    for part, x in recorded.items():
        counted = x[mask] if part == "language" else x.reshape(-1, x.shape[-1])
        counted = counted.double()
        stat = grams[refs[part].name]
        assert stat.count == counted.shape[0]
        assert stat.gram.dtype == torch.float32
        torch.testing.assert_close(stat.gram.double(), counted.T @ counted / counted.shape[0], rtol=1e-6, atol=1e-7)
    assert grams[refs["language"].name].count == int(mask.sum())


def random_pair(out: int, n: int, r: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)


def random_gram(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(50, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x / 50


def test_output_energy_low_rank_equals_dense_and_hand_value():
    left, right = random_pair(12, 10, 3, 0)
    gram = random_gram(10, 1)
    dense = left @ right
    by_hand = float(torch.trace(dense @ gram @ dense.T))
    assert output_energy((left, right), gram) == pytest.approx(by_hand, rel=1e-12)
    assert output_energy(dense, gram) == pytest.approx(by_hand, rel=1e-12)
    other = random_pair(12, 10, 2, 2)
    diff = delta_difference((left, right), other)
    assert isinstance(diff, tuple) and diff[0].shape == (12, 5)
    torch.testing.assert_close(diff[0] @ diff[1], dense - other[0] @ other[1])
    torch.testing.assert_close(delta_difference(dense, other), dense - other[0] @ other[1])


def test_activation_interference_ratios():
    modules = ["m0", "m1"]
    pairs = [{m: random_pair(8, 6, 2, 10 * i + k) for k, m in enumerate(modules)} for i in range(2)]
    zero = {m: (torch.zeros(8, 2, dtype=torch.float64), torch.zeros(2, 6, dtype=torch.float64)) for m in modules}
    adapters = pairs + [zero]
    grams = [{m: random_gram(6, 100 + 10 * i + k) for k, m in enumerate(modules)} for i in range(3)]
    dense_merge = {m: pairs[0][m][0] @ pairs[0][m][1] for m in modules}  # equals adapter 0's delta
    stats = activation_interference(
        modules,
        [lambda m, a=a: a[m] for a in adapters],
        [lambda m, g=g: g[m] for g in grams],
        {"same as 0": dense_merge.__getitem__, "empty": lambda m: None},
    )

    def energy(d, g):
        dense = d[0] @ d[1]
        return float(torch.trace(dense @ g @ dense.T))

    own = sum(energy(pairs[0][m], grams[0][m]) for m in modules)
    cross = sum(energy(pairs[1][m], grams[0][m]) for m in modules)
    assert stats["ratio"][0][1] == pytest.approx(math.sqrt(cross / own), rel=1e-10)
    assert stats["ratio"][0][0] == pytest.approx(1.0)
    assert stats["ratio"][0][2] == 0.0  # a zero adapter is silent on every task
    assert stats["ratio"][2] == [None, None, None]  # task 2's own output is zero: no ratio
    one = stats["modules"]["m1"]["ratio"][1][0]
    assert one == pytest.approx(math.sqrt(energy(pairs[0]["m1"], grams[1]["m1"]) / energy(pairs[1]["m1"], grams[1]["m1"])))
    assert stats["merged"]["same as 0"][0] == pytest.approx(0.0, abs=1e-12)
    assert stats["merged"]["same as 0"][1] > 0
    assert stats["merged"]["empty"][:2] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert stats["modules"]["m0"]["merged"]["same as 0"][0] == pytest.approx(0.0, abs=1e-12)


def test_grams_cli_file_and_validation(saved, tiny_vlm_dir, tmp_path, capsys):
    argv = ["grams", str(saved["a"]), "--data", str(saved["task_a"]), "--general", str(saved["general"]), "--rows", "4"]
    assert main(argv + ["--base", str(tiny_vlm_dir)]) == 0
    grams = LoraAdapter(saved["a"]).grams()
    module = next(iter(grams.widths))
    n = grams.widths[module]
    assert grams.task(module).shape == (n, n) and grams.general(module).shape == (n, n)
    assert grams.rows == {"task": 4, "general": 4} and grams.count(module, "general") > 0
    assert not list(saved["a"].glob(".*tmp*"))
    # The task Gram is that of collect_grams on the same rows in base + adapter.
    from datasets import load_from_disk

    from ilora.routing.lora import load_adapter

    model, processor = load_vlm(tiny_vlm_dir)
    direct = collect_grams(load_adapter(model, saved["a"]), processor, load_from_disk(str(saved["task_a"])).select(range(4)))
    torch.testing.assert_close(grams.task(module), direct[module].gram)
    assert grams.count(module) == direct[module].count

    # Corrupt, wrong format, missing: one-line errors naming the file.
    good = (saved["a"] / GRAMS_FILE).read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good[:100])
    with pytest.raises(IloraError, match="bad.safetensors.*corrupt"):
        load_grams(saved["a"], bad)
    from safetensors.torch import save_file

    save_file({f"{module}.task": torch.zeros(n, n)}, str(bad), metadata={"format": "other"})
    with pytest.raises(IloraError, match="format 'other'"):
        load_grams(saved["a"], bad)
    with pytest.raises(IloraError, match="missing Grams file"):
        load_grams(saved["b"])
    capsys.readouterr()

    bad_inputs = [
        ["grams", str(tmp_path / "nothing"), "--data", str(saved["task_a"])],
        ["grams", str(saved["b"]), "--data", str(tmp_path / "nodata")],
        ["grams", str(saved["b"]), "--data", str(saved["task_b"]), "--rows", "0"],
        ["grams", str(saved["b"]), "--data", str(saved["task_b"]), "--base", str(tmp_path / "nobase")],
        ["analyze", "interference", str(saved["a"]), str(saved["b"]), "--data", f"x={saved['task_a']}"],
        ["analyze", "interference", str(saved["a"]), str(saved["b"]), "--data", f"A={saved['task_a']}",
         "--data", f"B={saved['task_b']}"],  # b has no Grams yet
    ]
    for bad_argv in bad_inputs:
        assert main(bad_argv) == 2, bad_argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (saved["b"] / GRAMS_FILE).exists()
    assert not list(saved["b"].glob(".*tmp*"))

    # Interference of both adapters and of their merge, through the CLI.
    assert main(["grams", str(saved["b"]), "--data", str(saved["task_b"]), "--rows", "4"]) == 0
    assert main(["merge", str(saved["a"]), str(saved["b"]), "--out", str(tmp_path / "merged")]) == 0
    out = tmp_path / "interference.json"
    argv = ["analyze", "interference", str(saved["a"]), str(saved["b"]), "--data", f"A={saved['task_a']}",
            "--data", f"B={saved['task_b']}", "--merged", str(tmp_path / "merged"), "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["games"] == ["A", "B"] and "merged" in printed
    assert record["ratio"][0][0] == pytest.approx(1.0) and record["ratio"][1][1] == pytest.approx(1.0)
    assert record["ratio"][0][1] > 0 and len(record["modules"]) == len(grams.widths)
    assert all(v is not None and v >= 0 for v in record["merged"][str(tmp_path / "merged")])

    # Stale: the adapter's weights changed after its Grams were measured.
    peft_model, _ = random_lora_vlm(tiny_vlm_dir, 7)
    peft_model.save_pretrained(saved["b"])
    with pytest.raises(IloraError, match="stale"):
        load_grams(saved["b"])


def test_answer_margins_on_fixed_scores():
    from ilora.experiment.evaluation import answer_margins

    class FixedScores:
        action_names = ("NOOP", "LEFT", "RIGHT")

        def score_rows(self, rows):
            return torch.tensor([r["scores"] for r in rows])

    rows = [
        {"action": "LEFT", "scores": [0.0, 2.0, 1.5]},
        {"action": "NOOP", "scores": [-1.0, 0.0, -3.0]},
        {"action": "RIGHT", "scores": [0.0, 1.0, 4.0]},
    ]
    result = answer_margins(FixedScores(), rows, n=3, batch_size=2)
    assert result["margins"] == pytest.approx([0.5, -1.0, 3.0])
    assert result["positive"] == pytest.approx(2 / 3) and result["mean"] == pytest.approx(2.5 / 3)
    assert answer_margins(FixedScores(), rows, n=0)["positive"] is None
